package daemon_test

// End-to-end tests of the promise that a stop or a delete, once asked, is
// the agent's to finish: whether or not the client that asked still waits,
// and across an agent SIGKILL. Real runc, as root.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// termless ignores SIGTERM (the shell and its child both): only the
// stop's SIGKILL ends it. It says "ready" once it ignores SIGTERM.
func termless() api.WorkloadSpec { return sh(`trap "" TERM; echo ready; sleep 1000`) }

// runTermless submits termless and waits until it ignores SIGTERM.
func runTermless(t *testing.T, c *client.Client) string {
	t.Helper()
	w, err := c.Submit(context.Background(), termless())
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, w.ID)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if out, _ := logs(t, c, w.ID); strings.Contains(out, "ready") {
			return w.ID
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s never said ready", w.ID)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startLifecycleAgent runs an agent in its own process (a test may
// SIGKILL it) without networks or VMs, and returns it with a client, its
// address and data dir.
func startLifecycleAgent(t *testing.T) (p *agentProcess, c *client.Client, addr, dataDir string) {
	t.Helper()
	requireRunc(t)
	dataDir = t.TempDir()
	addr = freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p = &agentProcess{t: t, config: cfgFile}
	c = p.start(addr)
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			deleteAll(t, c)
			p.kill()
		}
		if t.Failed() {
			t.Logf("agent stderr:\n%s", p.stderr)
		}
	})
	importBusybox(t, c)
	return p, c, addr, dataDir
}

// askAndLeave calls f with a context that ends after 100 ms, as a client
// that disconnects does, and checks that f did not answer before.
func askAndLeave(t *testing.T, what string, f func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := f(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("%s with a client that leaves after 100 ms: %v, want the client's deadline", what, err)
	}
}

// A stop whose client disconnects 100 ms after asking is carried out: the
// workload, which ignores SIGTERM, is killed (137) when its grace period
// ends.
func TestStopOutlivesItsClient(t *testing.T) {
	_, c, _, _ := startLifecycleAgent(t)
	id := runTermless(t, c)
	const grace, margin = 2 * time.Second, 8 * time.Second
	asked := time.Now()
	askAndLeave(t, "stop", func(ctx context.Context) error { _, err := c.Stop(ctx, id, grace); return err })

	ctx, cancel := context.WithTimeout(context.Background(), grace+margin)
	defer cancel()
	w, err := c.WaitExit(ctx, id)
	if err != nil {
		t.Fatalf("the workload did not end within the grace period (%v) and %v: %v", grace, margin, err)
	}
	if w.State != api.StateExited || exitCode(w) != 137 {
		t.Errorf("workload ended %s with exit %d (%q), want exited 137", w.State, exitCode(w), w.Error)
	}
	if w.FinishedAt == nil || w.FinishedAt.Before(asked.Add(grace-500*time.Millisecond)) {
		t.Errorf("workload finished at %v, before its grace period of %v from %v", w.FinishedAt, grace, asked)
	}
}

// A stop whose client disconnects, and whose agent is SIGKILLed right
// after, is carried out while no agent runs: the workload is killed when
// its grace period ends, and the next agent reports it exited 137.
func TestStopOutlivesItsClientAndAgent(t *testing.T) {
	p, c, addr, _ := startLifecycleAgent(t)
	id := runTermless(t, c)
	const grace, margin = 2 * time.Second, 5 * time.Second
	asked := time.Now()
	askAndLeave(t, "stop", func(ctx context.Context) error { _, err := c.Stop(ctx, id, grace); return err })
	p.kill()
	// No agent runs until well after the deadline: the task's own
	// supervisor must have enforced it.
	time.Sleep(time.Until(asked.Add(grace + margin)))
	c = p.start(addr)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := c.WaitExit(ctx, id)
	if err != nil {
		t.Fatalf("after the agent restart: %v", err)
	}
	if w.State != api.StateExited || exitCode(w) != 137 {
		t.Errorf("workload ended %s with exit %d (%q), want exited 137", w.State, exitCode(w), w.Error)
	}
	if w.FinishedAt == nil || w.FinishedAt.After(asked.Add(grace+margin)) {
		t.Errorf("workload finished at %v, more than %v after the stop was asked at %v (grace %v): the deadline waited for an agent",
			w.FinishedAt, grace+margin, asked, grace)
	}
}

// traces lists what a workload leaves on the node: task dir, runc state,
// logs, cgroups, mounts.
func traces(dataDir, id string) []string {
	var found []string
	for _, p := range []string{
		filepath.Join(dataDir, "containers", "tasks", id),
		filepath.Join(dataDir, "containers", "runc", id),
		filepath.Join(dataDir, "logs", id),
		filepath.Join(dataDir, "containers", "layers", id),
		"/sys/fs/cgroup/memory/berth/" + id,
		"/sys/fs/cgroup/pids/berth/" + id,
		"/sys/fs/cgroup/cpu/berth/" + id,
	} {
		if _, err := os.Stat(p); err == nil {
			found = append(found, p)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, id) {
			found = append(found, "mount: "+line)
		}
	}
	return found
}

// waitDeleting waits until the workload answers as deleting (or is gone).
func waitDeleting(t *testing.T, c *client.Client, id string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		w, _, err := c.Get(context.Background(), id, nil)
		if client.IsReason(err, api.ReasonNotFound) || err == nil && w.Deleting {
			return
		}
		if err != nil {
			t.Fatalf("get %s: %v", id, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s is %s and not deleting 10 s after a delete was sent", id, w.State)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitGone waits until the workload answers 404; until then it must
// answer as deleting (never vanish while it holds something).
func waitGone(t *testing.T, c *client.Client, id string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		w, _, err := c.Get(context.Background(), id, nil)
		switch {
		case client.IsReason(err, api.ReasonNotFound):
			return
		case err != nil:
			t.Fatalf("get %s while it is deleted: %v", id, err)
		case !w.Deleting:
			t.Fatalf("workload %s is %s and not deleting after its delete was asked", id, w.State)
		}
		if time.Now().After(deadline) {
			t.Fatalf("workload %s still there %v after its delete was asked: %s (%q)", id, within, w.State, w.Error)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A delete whose client disconnects is carried out: the workload answers
// as deleting, then 404, and nothing of it is left on the node. The same
// when the agent is SIGKILLed right after the client left (once the delete
// is recorded: one the agent never took is not a delete it owes).
func TestDeleteOutlivesItsClient(t *testing.T) {
	p, c, addr, dataDir := startLifecycleAgent(t)
	for _, killAgent := range []bool{false, true} {
		id := runTermless(t, c)
		if left := traces(dataDir, id); len(left) < 4 {
			t.Fatalf("a running workload should have a task dir, runc state, logs, cgroups and a mount; found only %v", left)
		}
		// The client hangs up as soon as its request is out, before any
		// answer: the agent handles it with its context already ended.
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fmt.Fprintf(conn, "DELETE /v1/workloads/%s?force=true HTTP/1.1\r\nHost: %s\r\n\r\n", id, addr); err != nil {
			t.Fatal(err)
		}
		conn.Close()
		waitDeleting(t, c, id)
		if killAgent {
			// Killed once the delete is recorded: a GET shows it as soon
			// as it is made, a few milliseconds before it is on disk, and
			// a delete whose client left before any answer is not owed
			// before then. The same delete asked again without waiting is
			// answered once the record is on disk (the agent writes in
			// order), and leaves nothing else to do.
			if _, err := c.RequestDelete(context.Background(), id, true); err != nil && !client.IsReason(err, api.ReasonNotFound) {
				t.Fatal(err)
			}
			p.kill()
			c = p.start(addr)
		}
		waitGone(t, c, id, 30*time.Second)
		if left := traces(dataDir, id); len(left) > 0 {
			t.Errorf("delete (agent killed: %v) left behind:\n%s", killAgent, strings.Join(left, "\n"))
		}
	}
}
