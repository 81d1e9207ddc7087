package daemon_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// ledger records what the agent acknowledged: those promises must hold
// after any crash.
type ledger struct {
	mu        sync.Mutex
	submitted map[string]string // name -> id, acknowledged creates
	deleted   map[string]bool   // id -> acknowledged delete
	stopped   map[string]bool   // id -> acknowledged stop
	tried     map[string]bool   // names whose submit was sent
	deleting  map[string]bool   // ids whose delete was sent
}

func newLedger() *ledger {
	return &ledger{submitted: map[string]string{}, deleted: map[string]bool{}, stopped: map[string]bool{}, tried: map[string]bool{}, deleting: map[string]bool{}}
}

func chaosSpec(name string) api.WorkloadSpec {
	return api.WorkloadSpec{Name: name, Image: testImage, Command: []string{"sh", "-c", "trap 'exit 0' TERM; echo up; sleep 2 & wait $!"},
		Labels: map[string]string{"chaos": "1"}}
}

// burst submits, stops and deletes workloads until ctx ends (the agent
// dies under it), recording every acknowledgement.
func burst(ctx context.Context, c *client.Client, l *ledger, round int, rng *rand.Rand) {
	var wg sync.WaitGroup
	for worker := range 4 {
		seed := rng.Uint64()
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, uint64(worker)))
			for i := 0; ctx.Err() == nil; i++ {
				name := fmt.Sprintf("chaos-r%d-w%d-%d", round, worker, i)
				l.mu.Lock()
				l.tried[name] = true
				l.mu.Unlock()
				w, err := c.Submit(ctx, chaosSpec(name))
				if err != nil {
					return
				}
				l.mu.Lock()
				l.submitted[name] = w.ID
				l.mu.Unlock()
				switch r.IntN(3) {
				case 0:
					if _, err := c.Stop(ctx, w.ID, time.Second); err != nil {
						return
					}
					l.mu.Lock()
					l.stopped[w.ID] = true
					l.mu.Unlock()
				case 1:
					l.mu.Lock()
					l.deleting[w.ID] = true
					l.mu.Unlock()
					if err := c.Delete(ctx, w.ID, true); err != nil {
						return
					}
					l.mu.Lock()
					l.deleted[w.ID] = true
					l.mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
}

// runcState is runc's view of a container: "running", "stopped", ... or
// "" when runc has no such container.
func runcState(t *testing.T, runcRoot, id string) string {
	out, err := exec.Command("runc", "--root", runcRoot, "state", id).Output()
	if err != nil {
		return ""
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("runc state %s: %v", id, err)
	}
	return st.Status
}

// TestChaosSIGKILL kills the agent at random points of a burst of
// submits, stops and deletes, twenty times. After each restart every
// acknowledged workload is there with its true state, acknowledged deletes
// and stops held, no name is duplicated, and no task exists that no
// workload owns.
func TestChaosSIGKILL(t *testing.T) {
	requireRunc(t)
	if testing.Short() {
		t.Skip("twenty agent crashes: not in -short")
	}
	rounds := 20
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))

	dataDir := t.TempDir()
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 1s\n  cpu: 0.01\n  memory_mb: 16\n", addr, dataDir)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	importBusybox(t, c)
	t.Cleanup(func() {
		if t.Failed() {
			// Leave nothing mounted or running behind a failed run.
			deleteAll(t, c)
		}
		p.kill()
	})
	l := newLedger()
	runcRoot := filepath.Join(dataDir, "containers", "runc")
	tasksDir := filepath.Join(dataDir, "containers", "tasks")

	for round := range rounds {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			burst(ctx, c, l, round, rng)
			close(done)
		}()
		time.Sleep(time.Duration(50+rng.IntN(700)) * time.Millisecond)
		p.kill()
		cancel()
		<-done

		c = p.start(addr)
		ctx = context.Background()
		list, _, err := c.List(ctx, api.ListFilter{Labels: map[string]string{"chaos": "1"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		byID := map[string]api.Workload{}
		names := map[string]int{}
		for _, w := range list {
			byID[w.ID] = w
			names[w.Name]++
		}
		l.mu.Lock()
		for name, n := range names {
			if n > 1 {
				t.Errorf("round %d: name %s appears %d times", round, name, n)
			}
			if !l.tried[name] {
				t.Errorf("round %d: workload %s was never submitted", round, name)
			}
		}
		for name, id := range l.submitted {
			w, ok := byID[id]
			switch {
			case l.deleted[id] && ok:
				t.Errorf("round %d: %s (%s) was deleted, acknowledged, and is back", round, name, id)
			case !l.deleting[id] && !ok:
				// (A delete that was sent but not answered may or may not
				// have happened.)
				t.Errorf("round %d: acknowledged workload %s (%s) is lost", round, name, id)
			case ok && l.stopped[id] && !w.State.Terminal():
				t.Errorf("round %d: %s was stopped, acknowledged, and is %s", round, id, w.State)
			}
		}
		// Resubmitting a name whose submit got no answer must not make a
		// second workload.
		for name := range l.tried {
			if _, acked := l.submitted[name]; acked || names[name] == 0 {
				continue
			}
			w, err := c.Submit(ctx, chaosSpec(name))
			if err != nil {
				t.Errorf("round %d: resubmit %s: %v", round, name, err)
				continue
			}
			for id, other := range byID {
				if other.Name == name && id != w.ID {
					t.Errorf("round %d: resubmitting %s made a second workload %s next to %s", round, name, w.ID, id)
				}
			}
			l.submitted[name] = w.ID
		}
		l.mu.Unlock()

		// True state: a running workload has a running container; one that
		// ended has none. Reads race with workloads ending on their own, so
		// a disagreement must persist before it counts.
		for id, w := range byID {
			if w.State == api.StateFailed {
				var files []string
				for _, f := range []string{"monitor.log", "runc.log", "status.json"} {
					data, _ := os.ReadFile(filepath.Join(tasksDir, id, f))
					files = append(files, f+": "+string(data))
				}
				t.Errorf("round %d: workload %s failed: %s\n%s", round, id, w.Error, strings.Join(files, "\n"))
			}
			if w.State != api.StateRunning && !w.State.Terminal() {
				continue
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				cur, _, err := c.Get(ctx, id, nil)
				if err != nil {
					break // deleted meanwhile by nobody: reported below
				}
				st := runcState(t, runcRoot, id)
				if (cur.State == api.StateRunning) == (st == "running") {
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("round %d: workload %s is %s but runc says %q", round, id, cur.State, st)
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		// No task without a workload for long: the start-up work (finishing
		// interrupted deletes, reconciling) runs in the background and
		// removes them.
		deadline := time.Now().Add(60 * time.Second)
		for {
			var strays []string
			entries, _ := os.ReadDir(tasksDir)
			for _, e := range entries {
				if _, _, err := c.Get(ctx, e.Name(), nil); client.IsReason(err, api.ReasonNotFound) {
					strays = append(strays, e.Name())
				}
			}
			if len(strays) == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("round %d: tasks without a workload a minute after the restart: %v", round, strays)
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if t.Failed() {
			t.Fatalf("agent stderr:\n%s", p.stderr)
		}
		// Clear out what has ended, so each round checks a bounded set.
		for id, w := range byID {
			if cur, _, err := c.Get(ctx, id, nil); err == nil && cur.State.Terminal() {
				if err := c.Delete(ctx, id, false); err != nil {
					t.Errorf("round %d: delete %s (%s): %v", round, id, w.Name, err)
					continue
				}
				l.mu.Lock()
				l.deleting[id], l.deleted[id] = true, true
				l.mu.Unlock()
			}
		}
	}

	// Finally everything goes, and nothing stays behind.
	deleteAll(t, c)
	entries, _ := os.ReadDir(tasksDir)
	for _, e := range entries {
		t.Errorf("task dir left after deleting everything: %s", e.Name())
	}
	runcEntries, _ := os.ReadDir(runcRoot)
	for _, e := range runcEntries {
		t.Errorf("runc state left after deleting everything: %s", e.Name())
	}
	if left := leftMounts(dataDir, cfgFile); len(left) > 0 {
		t.Errorf("mounts left under %s:\n%s", dataDir, strings.Join(left, "\n"))
	}
	l.mu.Lock()
	t.Logf("%d rounds: %d workloads acknowledged, %d stops, %d deletes", rounds, len(l.submitted), len(l.stopped), len(l.deleted))
	l.mu.Unlock()
}
