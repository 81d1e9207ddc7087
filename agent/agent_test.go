package agent

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
)

const testImage = "berth.test/busybox:latest"

// testCapacity is a node large enough that admission never gets in the
// way of tests that are not about it.
var testCapacity = &api.NodeResources{CPU: 1024, MemoryMB: 1 << 20}

type env struct {
	t     *testing.T
	dir   string
	node  *fake.Node
	ctr   *fake.Driver
	imgs  *image.Store
	agent *Agent
	// change, when set, changes the agent's options at every start (after
	// e.ctr is made).
	change func(*Options)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), node: fake.NewNode()}
	imgs, err := image.New(filepath.Join(e.dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(ociimage.WriteOCIArchive(pw, img, testImage)) }()
	if _, err := imgs.Import(context.Background(), pr, ""); err != nil {
		t.Fatal(err)
	}
	e.imgs = imgs
	e.start()
	t.Cleanup(func() {
		if e.agent != nil {
			for _, w := range e.agent.List(context.Background(), api.ListFilter{}) {
				_ = e.agent.Delete(context.Background(), w.ID, true)
			}
			e.agent.Close()
		}
	})
	return e
}

// start (re)creates the agent over the same data dir and fake node, as an
// agent restart does.
func (e *env) start() {
	e.t.Helper()
	e.ctr = fake.New("container", e.node)
	opts := Options{Capacity: testCapacity,
		DataDir:        e.dir,
		Drivers:        []driver.Driver{e.ctr},
		Images:         e.imgs,
		Defaults:       Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout:    2 * time.Second,
		RestartBackoff: 20 * time.Millisecond,
	}
	if e.change != nil {
		e.change(&opts)
	}
	a, err := New(context.Background(), opts)
	if err != nil {
		e.t.Fatal(err)
	}
	e.agent = a
}

func (e *env) restart() {
	e.t.Helper()
	if err := e.agent.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.start()
}

func (e *env) submit(spec api.WorkloadSpec) *api.Workload {
	e.t.Helper()
	if spec.Image == "" {
		spec.Image = testImage
	}
	w, created, err := e.agent.Submit(context.Background(), spec)
	if err != nil {
		e.t.Fatalf("Submit: %v", err)
	}
	if !created {
		e.t.Fatalf("Submit: not created")
	}
	return w
}

// waitState waits for the workload to reach state (or any terminal one).
func (e *env) waitFor(id string, ok func(*api.Workload) bool) *api.Workload {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		_, changed := e.agent.Index()
		w, err := e.agent.Get(ctx, id)
		if err != nil {
			e.t.Fatalf("Get(%s): %v", id, err)
		}
		if ok(w) {
			return w
		}
		select {
		case <-changed:
		case <-ctx.Done():
			e.t.Fatalf("workload %s stuck in %s: %+v", id, w.State, w)
		}
	}
}

func terminal(w *api.Workload) bool { return w.State.Terminal() }

func sh(script string) api.WorkloadSpec {
	return api.WorkloadSpec{Command: []string{"sh", "-c", script}}
}

func TestSubmitRunsToExitCode(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("echo hi; exit 7"))
	if w.State != api.StatePending || w.Isolation != api.IsolationContainer || w.Placement == nil {
		t.Errorf("admitted workload = %+v", w)
	}
	w = e.waitFor(w.ID, terminal)
	if w.State != api.StateExited || w.ExitCode == nil || *w.ExitCode != 7 {
		t.Fatalf("workload = %+v, want exited 7", w)
	}
	if w.StartedAt == nil || w.FinishedAt == nil {
		t.Errorf("timestamps missing: %+v", w)
	}
	var lines []string
	err := e.agent.Logs(context.Background(), w.ID, api.LogOptions{Tail: -1}, func(s string, l []byte, _ time.Time) error {
		lines = append(lines, s+":"+string(l))
		return nil
	})
	if err != nil || len(lines) != 1 || lines[0] != "stdout:hi" {
		t.Errorf("logs = %q, %v", lines, err)
	}
}

func TestSubmitByNameIsIdempotent(t *testing.T) {
	e := newEnv(t)
	spec := sh("sleep 1000")
	spec.Name = "web"
	w1 := e.submit(spec)
	spec.Image = testImage
	w2, created, err := e.agent.Submit(context.Background(), spec)
	if err != nil || created || w2.ID != w1.ID {
		t.Fatalf("resubmit = %v, created %v, err %v; want the same workload", w2, created, err)
	}
	spec.Command = []string{"sh", "-c", "sleep 2000"}
	if _, _, err := e.agent.Submit(context.Background(), spec); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("different spec, same name: %v, want ErrAlreadyExists", err)
	}
	if got := len(e.agent.List(context.Background(), api.ListFilter{})); got != 1 {
		t.Errorf("%d workloads, want 1", got)
	}
}

func TestStopRunning(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	got, err := e.agent.Stop(context.Background(), w.ID, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != api.StateExited || got.ExitCode == nil || *got.ExitCode != 143 {
		t.Errorf("after stop: %+v, want exited 143", got)
	}
}

func TestDeleteRunningNeedsForceAndRemovesEverything(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("echo x; sleep 1000"))
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	if err := e.agent.Delete(context.Background(), w.ID, false); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete running without force: %v, want ErrFailedPrecondition", err)
	}
	if err := e.agent.Delete(context.Background(), w.ID, true); err != nil {
		t.Fatal(err)
	}
	if _, err := e.agent.Get(context.Background(), w.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get after delete: %v", err)
	}
	if _, err := os.Stat(e.agent.logDir(w.ID)); !os.IsNotExist(err) {
		t.Errorf("log dir left behind: %v", err)
	}
	if ids, _ := e.ctr.List(context.Background()); len(ids) != 0 {
		t.Errorf("driver tasks left: %v", ids)
	}
	// And after a restart it stays gone.
	e.restart()
	if _, err := e.agent.Get(context.Background(), w.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get after restart: %v", err)
	}
}

func TestRestartOnFailure(t *testing.T) {
	e := newEnv(t)
	spec := sh("exit 3")
	spec.Restart = api.RestartSpec{Policy: api.RestartOnFailure, MaxRetries: 2}
	w := e.submit(spec)
	w = e.waitFor(w.ID, func(w *api.Workload) bool { return terminal(w) && w.RestartCount == 2 })
	if *w.ExitCode != 3 || w.LastExitCode == nil || *w.LastExitCode != 3 {
		t.Errorf("final = %+v", w)
	}
	starts := 0
	for _, c := range e.ctr.Calls() {
		if c.Method == "Start" && c.ID == w.ID {
			starts++
		}
	}
	if starts != 3 {
		t.Errorf("%d starts, want 3 (1 + 2 retries)", starts)
	}
}

func TestRecoverAfterRestart(t *testing.T) {
	e := newEnv(t)
	w := e.submit(sh("echo before; sleep 1; echo after; exit 4"))
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	e.restart()
	w = e.waitFor(w.ID, terminal)
	if w.State != api.StateExited || *w.ExitCode != 4 {
		t.Errorf("after restart: %+v, want exited 4", w)
	}
}

func TestStartFailureIsReported(t *testing.T) {
	e := newEnv(t)
	e.ctr.FailNext("Start", errors.New("runc exploded"))
	w := e.submit(sh("true"))
	w = e.waitFor(w.ID, terminal)
	if w.State != api.StateFailed || w.Error == "" {
		t.Errorf("workload = %+v, want failed with the error", w)
	}
}
