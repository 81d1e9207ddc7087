package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/drivertest"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
)

// faults are switches a test flips on the drivers of a lifeEnv. They
// outlive agent restarts, as a node's troubles do.
type faults struct {
	mu sync.Mutex
	// hangStart makes Start hang until its context ends; each hanging
	// start sends its id on starting.
	hangStart bool
	starting  chan string
	// hangWait makes Wait hang until its context ends: the task's end is
	// never seen by the supervisor.
	hangWait bool
	// destroyGate, when set, makes Destroy wait until it is closed (or its
	// context ends); destroyErr makes Destroy fail.
	destroyGate chan struct{}
	destroyErr  error
	// rebooted makes Recover find every task dead from an earlier boot;
	// recoverErr fails the next Recover.
	rebooted   bool
	recoverErr error
	// deepStart makes each Start grow its goroutine's stack by some
	// 256 KiB first, as deep call chains do.
	deepStart bool
	// starts counts Start calls by task id, hanging ones included.
	starts map[string]int
	// neverRan makes the tasks it names look made but never run: ended
	// with this error before they started, as a driver reports a start
	// called off or failed after the agent died.
	neverRan map[string]string
}

func (f *faults) set(fn func(f *faults)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *faults) startsOf(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.starts[id]
}

// ctl is the fake driver with a test's faults.
type ctl struct {
	*fake.Driver
	f *faults
}

func (c *ctl) Start(ctx context.Context, cfg *driver.TaskConfig) (*driver.Handle, error) {
	c.f.mu.Lock()
	c.f.starts[cfg.ID]++
	hang, ch, deep := c.f.hangStart, c.f.starting, c.f.deepStart
	c.f.mu.Unlock()
	if deep {
		growStack(256)
	}
	if hang {
		if ch != nil {
			ch <- cfg.ID
		}
		<-ctx.Done()
		return nil, fmt.Errorf("start %s: %w", cfg.ID, ctx.Err())
	}
	return c.Driver.Start(ctx, cfg)
}

func (c *ctl) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	c.f.mu.Lock()
	hang := c.f.hangWait
	why, never := c.f.neverRan[id]
	c.f.mu.Unlock()
	if never {
		return &driver.ExitResult{ExitCode: -1, Err: why}, nil
	}
	if hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return c.Driver.Wait(ctx, id)
}

// Ended follows Wait's faults: a task that never ran has ended, and with
// hangWait the end is never seen.
func (c *ctl) Ended(id string) (<-chan struct{}, error) {
	c.f.mu.Lock()
	hang := c.f.hangWait
	_, never := c.f.neverRan[id]
	c.f.mu.Unlock()
	switch {
	case never:
		done := make(chan struct{})
		close(done)
		return done, nil
	case hang:
		return make(chan struct{}), nil
	}
	return c.Driver.Ended(id)
}

func (c *ctl) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	c.f.mu.Lock()
	why, never := c.f.neverRan[id]
	c.f.mu.Unlock()
	if never {
		return &driver.TaskStatus{ID: id, State: driver.TaskExited, Exit: &driver.ExitResult{ExitCode: -1, Err: why}}, nil
	}
	return c.Driver.Inspect(ctx, id)
}

func (c *ctl) Destroy(ctx context.Context, id string) error {
	c.f.mu.Lock()
	gate, err := c.f.destroyGate, c.f.destroyErr
	c.f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	return c.Driver.Destroy(ctx, id)
}

func (c *ctl) Recover(ctx context.Context, h *driver.Handle) error {
	c.f.mu.Lock()
	rebooted, err := c.f.rebooted, c.f.recoverErr
	c.f.recoverErr = nil
	c.f.mu.Unlock()
	if err != nil {
		return err
	}
	if rebooted {
		// The reboot took the task; the driver released what was left.
		_ = c.Driver.Destroy(ctx, h.ID)
		return fmt.Errorf("task %s of boot 1234: %w", h.ID, driver.ErrRebooted)
	}
	return c.Driver.Recover(ctx, h)
}

// lifeEnv is an agent over a container and a vm fake driver with faults.
type lifeEnv struct {
	*env
	f  *faults
	vm *fake.Driver
}

func newLifeEnv(t *testing.T) *lifeEnv {
	t.Helper()
	e := &lifeEnv{env: newEnv(t), f: &faults{starts: map[string]int{}, neverRan: map[string]string{}}}
	e.change = func(o *Options) {
		e.vm = fake.New("vm", e.node)
		o.Drivers = []driver.Driver{&ctl{e.ctr, e.f}, &ctl{e.vm, e.f}}
	}
	e.restart()
	// Runs before newEnv's cleanup, which deletes every workload.
	t.Cleanup(func() {
		e.f.set(func(f *faults) {
			f.hangStart, f.hangWait, f.rebooted = false, false, false
			f.destroyGate, f.destroyErr, f.recoverErr = nil, nil, nil
		})
	})
	return e
}

// newLifeEnvInBoot is newLifeEnv on a node whose boot id is *boot: a test
// sets it to another before the agent's next start to simulate a reboot.
func newLifeEnvInBoot(t *testing.T, id string) (*lifeEnv, *string) {
	t.Helper()
	e := newLifeEnv(t)
	boot := id
	change := e.change
	e.change = func(o *Options) {
		change(o)
		o.BootID = boot
	}
	e.restart()
	return e, &boot
}

// interruptStart submits spec while the driver's starts hang, and closes
// the agent once the start is in the driver (as if the agent died there);
// starts no longer hang afterwards.
func (e *lifeEnv) interruptStart(spec api.WorkloadSpec) *api.Workload {
	e.t.Helper()
	e.f.set(func(f *faults) { f.hangStart, f.starting = true, make(chan string, 1) })
	w := e.submit(spec)
	<-e.f.starting
	if err := e.agent.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.f.set(func(f *faults) { f.hangStart = false })
	return w
}

// persisted is what the closed agent left in its state database: the
// records and the index.
func (e *lifeEnv) persisted() ([]*record, uint64) {
	e.t.Helper()
	st, err := openStore(e.dir)
	if err != nil {
		e.t.Fatal(err)
	}
	defer st.close()
	recs, index, err := st.loadAll()
	if err != nil {
		e.t.Fatal(err)
	}
	return recs, index
}

// ignoresTerm runs until it is killed: SIGTERM is ignored by the shell and
// by its child. It says "ready" once it ignores SIGTERM (runTermless).
func ignoresTerm() api.WorkloadSpec { return sh(`trap "" TERM; echo ready; sleep 1000`) }

// runTermless submits ignoresTerm and waits until it ignores SIGTERM.
func (e *env) runTermless() *api.Workload {
	e.t.Helper()
	w := e.submit(ignoresTerm())
	e.waitFor(w.ID, running)
	deadline := time.Now().Add(10 * time.Second)
	for {
		ready := false
		_ = e.agent.Logs(context.Background(), w.ID, api.LogOptions{Tail: -1}, func(_ string, line []byte, _ time.Time) error {
			ready = ready || string(line) == "ready"
			return nil
		})
		if ready {
			return w
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("workload %s never said ready", w.ID)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func running(w *api.Workload) bool { return w.State == api.StateRunning }

// waitGone waits until the workload is gone: 404, and its record removed.
func (e *env) waitGone(id string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		_, changed := e.agent.Index()
		w, err := e.agent.Get(ctx, id)
		if errors.Is(err, errdefs.ErrNotFound) && e.agent.record(id) == nil {
			return
		}
		if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			e.t.Fatal(err)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			e.t.Fatalf("workload %s is still there: %+v", id, w)
		}
	}
}

func exitOf(w *api.Workload) int {
	if w.ExitCode == nil {
		return -1
	}
	return *w.ExitCode
}

// A stop whose caller goes away goes on: the workload is killed when its
// grace period ends.
func TestStopGoesOnWhenTheCallerLeaves(t *testing.T) {
	e := newLifeEnv(t)
	w := e.runTermless()
	const grace = time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	asked := time.Now()
	if _, err := e.agent.Stop(ctx, w.ID, grace); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop with a caller that leaves after 100ms: %v, want its context's error", err)
	}
	w = e.waitFor(w.ID, terminal)
	took := time.Since(asked)
	if w.State != api.StateExited || exitOf(w) != 137 {
		t.Fatalf("after the stop: %s exit %d (%q), want exited 137", w.State, exitOf(w), w.Error)
	}
	// Margin: 5 s past the grace period.
	if took > grace+5*time.Second {
		t.Errorf("the stop took %v with a grace period of %v", took, grace)
	}
}

// RequestStop answers at once; the stop goes on.
func TestRequestStopAnswersAtOnce(t *testing.T) {
	e := newLifeEnv(t)
	w := e.runTermless()
	got, err := e.agent.RequestStop(context.Background(), w.ID, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != api.StateStopping {
		t.Errorf("RequestStop answered %s, want stopping", got.State)
	}
	if w = e.waitFor(w.ID, terminal); exitOf(w) != 137 {
		t.Errorf("after the stop: %s exit %d, want 137", w.State, exitOf(w))
	}
}

// A stop asked before the agent restarts resumes after it with what is
// left of its grace period: not from scratch, not the default, not at once.
func TestStopResumesAfterAgentRestart(t *testing.T) {
	e := newLifeEnv(t)
	w := e.runTermless()
	const grace = 4 * time.Second // the agent's default is 2 s
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	asked := time.Now()
	if _, err := e.agent.Stop(ctx, w.ID, grace); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop: %v, want its context's error", err)
	}
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	e.start()
	w = e.waitFor(w.ID, terminal)
	took := time.Since(asked)
	if w.State != api.StateExited || exitOf(w) != 137 {
		t.Fatalf("after the stop: %s exit %d (%q), want exited 137", w.State, exitOf(w), w.Error)
	}
	// Margins: half a second before, a second and a half after.
	if took < grace-500*time.Millisecond || took > grace+1500*time.Millisecond {
		t.Errorf("the workload ended %v after the stop was asked, want its grace period %v", took, grace)
	}
}

// A stop asked again with a shorter grace period is not held back by the
// first one's.
func TestSecondStopWithEarlierDeadline(t *testing.T) {
	e := newLifeEnv(t)
	w := e.runTermless()
	if _, err := e.agent.RequestStop(context.Background(), w.ID, time.Hour); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := e.agent.Stop(ctx, w.ID, 100*time.Millisecond)
	if err != nil {
		t.Fatalf("second stop: %v", err)
	}
	if exitOf(got) != 137 {
		t.Errorf("after the second stop: %s exit %d, want 137", got.State, exitOf(got))
	}
}

// A stop of a workload whose runtime hangs in its start cancels the start:
// the workload ends, and nothing of it is left running.
func TestStopCancelsAStartInProgress(t *testing.T) {
	e := newLifeEnv(t)
	e.f.set(func(f *faults) { f.hangStart, f.starting = true, make(chan string, 1) })
	w := e.submit(sh("sleep 1000"))
	select {
	case <-e.f.starting:
	case <-time.After(10 * time.Second):
		t.Fatal("the start never reached the driver")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := e.agent.Stop(ctx, w.ID, time.Second)
	if err != nil {
		t.Fatalf("Stop of a starting workload: %v", err)
	}
	if got.State != api.StateExited || got.ExitCode != nil || got.Error != msgStoppedStarting {
		t.Errorf("after the stop: %+v, want exited with %q", got, msgStoppedStarting)
	}
	if ids, _ := e.ctr.List(ctx); len(ids) != 0 {
		t.Errorf("tasks left: %v", ids)
	}
	// It stays stopped after a restart.
	e.f.set(func(f *faults) { f.hangStart = false })
	e.restart()
	if cur := e.waitFor(w.ID, terminal); cur.State != api.StateExited || e.f.startsOf(w.ID) != 1 {
		t.Errorf("after a restart: %s with %d starts, want exited and no second start", cur.State, e.f.startsOf(w.ID))
	}
}

// A delete whose caller goes away goes on, and the workload answers (as
// deleting) until everything it held is released.
func TestDeleteGoesOnWhenTheCallerLeaves(t *testing.T) {
	e := newLifeEnv(t)
	gate := make(chan struct{})
	e.f.set(func(f *faults) { f.destroyGate = gate })
	w := e.submit(sh("echo out; sleep 1000"))
	e.waitFor(w.ID, running)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := e.agent.Delete(ctx, w.ID, true); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Delete with a caller that leaves after 100ms: %v, want its context's error", err)
	}
	got, err := e.agent.Get(context.Background(), w.ID)
	if err != nil || !got.Deleting {
		t.Fatalf("Get while the delete is in progress: %+v, %v; want the workload, deleting", got, err)
	}
	listed := false
	for _, l := range e.agent.List(context.Background(), api.ListFilter{}) {
		listed = listed || (l.ID == w.ID && l.Deleting)
	}
	if !listed {
		t.Errorf("List while the delete is in progress does not show it deleting")
	}
	if _, err := os.Stat(e.agent.logDir(w.ID)); err != nil {
		t.Errorf("logs gone before the task: %v", err)
	}
	close(gate)
	e.waitGone(w.ID)
	if ids, _ := e.ctr.List(context.Background()); len(ids) != 0 {
		t.Errorf("tasks left: %v", ids)
	}
	if _, err := os.Stat(e.agent.logDir(w.ID)); !os.IsNotExist(err) {
		t.Errorf("log dir left: %v", err)
	}
}

// RequestDelete answers at once with the workload, deleting.
func TestRequestDeleteAnswersAtOnce(t *testing.T) {
	e := newLifeEnv(t)
	gate := make(chan struct{})
	e.f.set(func(f *faults) { f.destroyGate = gate })
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	got, err := e.agent.RequestDelete(context.Background(), w.ID, true)
	if err != nil || !got.Deleting {
		t.Fatalf("RequestDelete: %+v, %v", got, err)
	}
	if _, err := e.agent.RequestDelete(context.Background(), w.ID, false); err != nil {
		t.Errorf("asking again for a delete in progress: %v", err)
	}
	close(gate)
	e.waitGone(w.ID)
}

// A delete that fails in its driver is retried by the agent, with the
// error on the workload meanwhile; its caller gets the error.
func TestDeleteFailureIsRetriedAndShown(t *testing.T) {
	e := newLifeEnv(t)
	w := e.submit(sh("exit 0"))
	e.waitFor(w.ID, terminal)
	e.f.set(func(f *faults) { f.destroyErr = errors.New("disk on fire") })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := e.agent.Delete(ctx, w.ID, false)
	if !errors.Is(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("Delete with a failing driver: %v, want ErrUnavailable with the driver's error", err)
	}
	got, err := e.agent.Get(ctx, w.ID)
	if err != nil || !got.Deleting || !strings.Contains(got.Error, "disk on fire") {
		t.Fatalf("workload after a failed delete: %+v, %v; want it deleting with the error", got, err)
	}
	// The agent keeps trying: once the driver recovers, it is gone.
	e.f.set(func(f *faults) { f.destroyErr = nil })
	e.waitGone(w.ID)
}

// A workload being deleted holds its name until it is gone: a submit of
// the name meanwhile is a conflict, and afterwards the name is free, a
// retry finds the new workload and makes no third.
func TestNameDuringDelete(t *testing.T) {
	e := newLifeEnv(t)
	gate := make(chan struct{})
	e.f.set(func(f *faults) { f.destroyGate = gate })
	spec := sh("sleep 1000")
	spec.Name, spec.Image = "x", testImage
	w1 := e.submit(spec)
	e.waitFor(w1.ID, running)
	if _, err := e.agent.RequestDelete(context.Background(), "x", true); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.agent.Submit(context.Background(), spec); !errors.Is(err, errdefs.ErrConflict) || !strings.Contains(err.Error(), "being deleted") {
		t.Fatalf("submit of x while x is deleted: %v, want a conflict saying so", err)
	}
	if got, err := e.agent.Get(context.Background(), "x"); err != nil || got.ID != w1.ID || !got.Deleting {
		t.Fatalf("GET x while it is deleted: %+v, %v", got, err)
	}
	close(gate)
	e.waitGone(w1.ID)
	if _, err := e.agent.Get(context.Background(), "x"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("GET x after the delete: %v, want not found", err)
	}
	w2 := e.submit(spec)
	again, created, err := e.agent.Submit(context.Background(), spec)
	if err != nil || created || again.ID != w2.ID {
		t.Fatalf("retry of the submit: %v created %v err %v, want %s", again, created, err, w2.ID)
	}
	if got, err := e.agent.Get(context.Background(), "x"); err != nil || got.ID != w2.ID {
		t.Fatalf("GET x: %+v, %v; want %s", got, err, w2.ID)
	}
}

// A delete interrupted by an agent restart is finished by the next agent,
// and never takes the name from the workload that holds it now (an older
// agent let a new x take the name while the old x was being deleted).
func TestNameSurvivesAnInterruptedDelete(t *testing.T) {
	e := newLifeEnv(t)
	gate := make(chan struct{})
	e.f.set(func(f *faults) { f.destroyGate = gate })
	spec := sh("sleep 1000")
	spec.Name, spec.Image = "x", testImage
	w1 := e.submit(spec)
	e.waitFor(w1.ID, running)
	if _, err := e.agent.RequestDelete(context.Background(), "x", true); err != nil {
		t.Fatal(err)
	}
	old := e.agent.record(w1.ID).clone()
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	// The newer x, as the older agent admitted it, has ended already.
	st, err := openStore(e.dir)
	if err != nil {
		t.Fatal(err)
	}
	_, index, err := st.loadAll()
	if err != nil {
		t.Fatal(err)
	}
	w2 := old.clone()
	w2.Deleting, w2.StopRequested, w2.Handle = false, false, nil
	w2.Workload.ID = "0123456789abcdef"
	w2.Workload.State, w2.Workload.ExitCode = api.StateExited, new(int)
	w2.Workload.CreatedAt = time.Now().UTC()
	if err := st.put(w2, index+1); err != nil {
		t.Fatal(err)
	}
	st.close()

	e.start()
	if got, err := e.agent.Get(context.Background(), "x"); err != nil || got.ID != w2.Workload.ID {
		t.Fatalf("GET x after the restart: %+v, %v; want the newer x", got, err)
	}
	close(gate)
	e.waitGone(w1.ID)
	if got, err := e.agent.Get(context.Background(), "x"); err != nil || got.ID != w2.Workload.ID {
		t.Fatalf("GET x after the old x is gone: %+v, %v; want the newer x", got, err)
	}
	again, created, err := e.agent.Submit(context.Background(), spec)
	if err != nil || created || again.ID != w2.Workload.ID {
		t.Fatalf("retry of the submit: %v created %v err %v, want %s", again, created, err, w2.Workload.ID)
	}
	if n := len(e.agent.List(context.Background(), api.ListFilter{})); n != 1 {
		t.Errorf("%d workloads, want 1", n)
	}
}

// A restart that reconciliation decides (the task vanished while the
// supervisor could not see it end) happens at once.
func TestRestartDecidedByReconciliation(t *testing.T) {
	e := newLifeEnv(t)
	<-e.agent.recovered
	e.f.set(func(f *faults) { f.hangWait = true })
	spec := sh("sleep 1000")
	spec.Restart.Policy = api.RestartAlways
	w := e.submit(spec)
	e.waitFor(w.ID, running)
	// Older than reconciliation's grace for a start being recorded.
	if _, err := e.agent.mutate(w.ID, func(r *record) error {
		long := time.Now().Add(-time.Minute)
		r.Workload.StartedAt = &long
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// The task goes, behind the agent's back.
	if err := fake.New("container", e.node).Destroy(context.Background(), w.ID); err != nil {
		t.Fatal(err)
	}
	rep := e.agent.Reconcile(context.Background())
	if len(rep.Vanished) != 1 {
		t.Fatalf("reconciliation: %+v, want the workload vanished", rep)
	}
	got := e.waitFor(w.ID, func(w *api.Workload) bool { return running(w) && w.RestartCount == 1 })
	if got.LastExitCode != nil {
		t.Errorf("last exit code %d of a vanished run", *got.LastExitCode)
	}
}

// A restart that recovery decides (the task could not be recovered)
// happens at once.
func TestRestartDecidedByRecovery(t *testing.T) {
	e := newLifeEnv(t)
	spec := sh("sleep 1000")
	spec.Restart.Policy = api.RestartOnFailure
	w := e.submit(spec)
	e.waitFor(w.ID, running)
	e.f.set(func(f *faults) { f.recoverErr = errors.New("monitor state unreadable") })
	e.restart()
	e.waitFor(w.ID, func(w *api.Workload) bool { return running(w) && w.RestartCount == 1 })
	if n := e.f.startsOf(w.ID); n != 2 {
		t.Errorf("%d starts, want 2", n)
	}
}

// A workload accepted but not started when the agent went down starts
// once after recovery: afresh when the driver made nothing, re-attached
// when it made the task; for either isolation.
func TestInterruptedStartStartsOnce(t *testing.T) {
	for _, iso := range []api.Isolation{api.IsolationContainer, api.IsolationVM} {
		for _, made := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/task_made=%v", iso, made), func(t *testing.T) {
				e := newLifeEnv(t)
				spec := sh("exit 5")
				spec.Isolation = iso
				w := e.interruptStart(spec)
				if w.Isolation != iso {
					t.Fatalf("placed as %s, want %s", w.Isolation, iso)
				}
				if made {
					// The driver made the task before the agent died.
					cfg := &driver.TaskConfig{ID: w.ID, Args: []string{"sh", "-c", "exit 6"}, LogDir: filepath.Join(e.dir, "logs", w.ID)}
					if _, err := fake.New(string(iso), e.node).Start(context.Background(), cfg); err != nil {
						t.Fatal(err)
					}
				}
				e.start()
				got := e.waitFor(w.ID, terminal)
				want, starts := 5, 2
				if made {
					want, starts = 6, 1
				}
				if got.State != api.StateExited || exitOf(got) != want || got.RestartCount != 0 {
					t.Errorf("after recovery: %s exit %d restarts %d (%q), want exited %d, no restart", got.State, exitOf(got), got.RestartCount, got.Error, want)
				}
				if n := e.f.startsOf(w.ID); n != starts {
					t.Errorf("%d starts (the interrupted one included), want %d", n, starts)
				}
			})
		}
	}
}

// A start interrupted by a reboot of the node, whose task nothing is left
// of (a driver's files are not kept across a power loss, only the agent's
// record is): it may have run, so it is not run again without a restart
// policy; a start the agent's own death interrupted in the same boot, with
// nothing made, starts afresh.
func TestStartInterruptedByARebootIsNotRunAgain(t *testing.T) {
	for _, rebooted := range []bool{false, true} {
		t.Run(fmt.Sprintf("rebooted=%v", rebooted), func(t *testing.T) {
			e, boot := newLifeEnvInBoot(t, "boot-1")
			w := e.interruptStart(sh("exit 0"))
			if recs, _ := e.persisted(); len(recs) != 1 || recs[0].Workload.State != api.StateStarting || recs[0].StartBoot != "boot-1" {
				t.Fatalf("persisted: %+v; want the workload starting in boot-1", recs)
			}
			if rebooted {
				*boot = "boot-2"
			}
			e.start()
			got := e.waitFor(w.ID, terminal)
			starts := e.f.startsOf(w.ID)
			switch {
			case rebooted && (got.State != api.StateFailed || got.Error != "node rebooted" || starts != 1):
				t.Errorf("after a reboot: %s %q, %d starts; want failed with \"node rebooted\" and no second start", got.State, got.Error, starts)
			case !rebooted && (got.State != api.StateExited || exitOf(got) != 0 || starts != 2):
				t.Errorf("after the agent's restart: %s exit %d (%q), %d starts; want exited 0 on a second start", got.State, exitOf(got), got.Error, starts)
			}
		})
	}
}

// Tasks of an earlier boot are dead: a workload with a restart policy
// starts again (a restart), the others end failed with "node rebooted".
func TestTasksOfAnEarlierBoot(t *testing.T) {
	e := newLifeEnv(t)
	once := e.submit(sh("sleep 1000"))
	spec := sh("sleep 1000")
	spec.Restart.Policy = api.RestartOnFailure
	again := e.submit(spec)
	e.waitFor(once.ID, running)
	e.waitFor(again.ID, running)
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	e.f.set(func(f *faults) { f.rebooted = true })
	e.start()
	if got := e.waitFor(once.ID, terminal); got.State != api.StateFailed || got.Error != "node rebooted" {
		t.Errorf("workload without a restart policy: %s %q, want failed with \"node rebooted\"", got.State, got.Error)
	}
	e.waitFor(again.ID, func(w *api.Workload) bool { return running(w) && w.RestartCount == 1 })
	if err := e.agent.Delete(context.Background(), once.ID, false); err != nil {
		t.Errorf("delete after the reboot: %v", err)
	}
}

// A start interrupted by the agent's death whose task the driver made but
// never ran: the stop asked meanwhile ends it stopped (not failed); without
// a stop, it is a start that failed by itself, with its reason, and it is
// not started again.
func TestInterruptedStartThatNeverRan(t *testing.T) {
	for _, stopped := range []bool{true, false} {
		t.Run(fmt.Sprintf("stop_asked=%v", stopped), func(t *testing.T) {
			e := newLifeEnv(t)
			w := e.interruptStart(sh("sleep 1000"))
			// What the agent had persisted when it died: the record left
			// starting (and the stop, when one was asked).
			recs, index := e.persisted()
			if len(recs) != 1 || recs[0].Workload.State != api.StateStarting {
				t.Fatalf("persisted: %v; want the workload starting", recs)
			}
			if stopped {
				st, err := openStore(e.dir)
				if err != nil {
					t.Fatal(err)
				}
				now := time.Now().UTC()
				recs[0].StopRequested, recs[0].StopAt, recs[0].StopGrace = true, &now, time.Second
				err = st.put(recs[0], index+1)
				st.close()
				if err != nil {
					t.Fatal(err)
				}
			}
			// The task the driver made: it never ran.
			cfg := &driver.TaskConfig{ID: w.ID, Args: []string{"true"}, LogDir: filepath.Join(e.dir, "logs", w.ID)}
			if _, err := fake.New("container", e.node).Start(context.Background(), cfg); err != nil {
				t.Fatal(err)
			}
			e.f.set(func(f *faults) {
				f.neverRan[w.ID] = "runc create: stopped before it started"
			})
			e.start()
			got := e.waitFor(w.ID, terminal)
			switch {
			case stopped && (got.State != api.StateExited || got.Error != msgStoppedStarting):
				t.Errorf("stopped while starting: %s %q, want exited %q", got.State, got.Error, msgStoppedStarting)
			case !stopped && (got.State != api.StateFailed || got.Error != "runc create: stopped before it started"):
				t.Errorf("start that failed: %s %q, want failed with the driver's reason", got.State, got.Error)
			}
			if n := e.f.startsOf(w.ID); n != 1 {
				t.Errorf("%d starts, want only the interrupted one", n)
			}
		})
	}
}

// Admission counts a workload being deleted until it is gone: what it
// holds (its cpu, memory, its task) is the node's again only then.
func TestAdmissionCountsDeletingWorkloads(t *testing.T) {
	e := newLifeEnv(t)
	e.change = func(o *Options) {
		e.vm = fake.New("vm", e.node)
		o.Drivers = []driver.Driver{&ctl{e.ctr, e.f}, &ctl{e.vm, e.f}}
		o.Capacity = &api.NodeResources{CPU: 1, MemoryMB: 1 << 20}
	}
	e.restart()
	gate := make(chan struct{})
	e.f.set(func(f *faults) { f.destroyGate = gate })
	w := e.submit(sh("sleep 1000"))
	e.waitFor(w.ID, running)
	if _, err := e.agent.RequestDelete(context.Background(), w.ID, true); err != nil {
		t.Fatal(err)
	}
	spec := sh("sleep 1000")
	spec.Image = testImage
	if _, _, err := e.agent.Submit(context.Background(), spec); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("submit while the only cpu is held by a workload being deleted: %v, want ErrResourceExhausted", err)
	}
	close(gate)
	e.waitGone(w.ID)
	e.submit(sh("sleep 1000"))
}

// A running workload whose task the driver no longer has after the node
// rebooted (its runtime files were on a tmpfs the reboot emptied) ended
// with the reboot: failed with "node rebooted", not started again without
// a restart policy. In the same boot, a task gone missing is a failure of
// its own.
func TestRunningTaskTheRebootTook(t *testing.T) {
	for _, rebooted := range []bool{false, true} {
		t.Run(fmt.Sprintf("rebooted=%v", rebooted), func(t *testing.T) {
			e, boot := newLifeEnvInBoot(t, "boot-1")
			w := e.submit(sh("sleep 1000"))
			e.waitFor(w.ID, running)
			if err := e.agent.Close(); err != nil {
				t.Fatal(err)
			}
			if rebooted {
				*boot = "boot-2"
			}
			e.f.set(func(f *faults) { f.recoverErr = fmt.Errorf("no such task: %w", errdefs.ErrNotFound) })
			e.start()
			got := e.waitFor(w.ID, terminal)
			if starts := e.f.startsOf(w.ID); starts != 1 {
				t.Errorf("%d starts, want 1", starts)
			}
			switch {
			case rebooted && (got.State != api.StateFailed || got.Error != "node rebooted"):
				t.Errorf("after a reboot: %s %q; want failed with \"node rebooted\"", got.State, got.Error)
			case !rebooted && (got.State != api.StateFailed || !strings.Contains(got.Error, "could not be found")):
				t.Errorf("after the agent's restart: %s %q; want failed, the task not found", got.State, got.Error)
			}
		})
	}
}

// A submitted workload's start begins while its record goes to disk (the
// driver prepares the task meanwhile), but nothing of it runs, and the
// submit is not answered, before its records are there.
func TestStartPreparesWhileTheRecordGoesToDisk(t *testing.T) {
	e := newLifeEnv(t)
	c := e.agent.commits
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	c.mu.Lock()
	c.beforeWrite = func() { <-release }
	c.mu.Unlock()
	defer func() {
		unblock()
		c.mu.Lock()
		c.beforeWrite = nil
		c.mu.Unlock()
	}()
	marker := filepath.Join(t.TempDir(), "ran")
	type answer struct {
		w   *api.Workload
		err error
	}
	done := make(chan answer, 1)
	go func() {
		spec := sh("touch " + marker)
		spec.Image = testImage
		w, _, err := e.agent.Submit(context.Background(), spec)
		done <- answer{w, err}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.ContainsFunc(e.ctr.Calls(), func(c fake.Call) bool { return c.Method == "Start" }) {
		if time.Now().After(deadline) {
			t.Fatal("the driver got no start while the submit's record went to disk")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the workload ran before its records were on disk")
	}
	select {
	case a := <-done:
		t.Fatalf("the submit was answered before its record was on disk: %+v %v", a.w, a.err)
	default:
	}
	unblock()
	a := <-done
	if a.err != nil {
		t.Fatal(a.err)
	}
	if got := e.waitFor(a.w.ID, terminal); got.State != api.StateExited || exitOf(got) != 0 {
		t.Fatalf("after the records reached the disk: %s exit %d (%q)", got.State, exitOf(got), got.Error)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("the workload did not run: %v", err)
	}
}

// A running workload costs the agent one goroutine, its supervisor, parked
// in a select: the driver says when the task has ended (Driver.Ended),
// so no goroutine of the agent's waits in Wait for it. The fake driver's own goroutines per task are measured first, on
// tasks started on it directly, and taken off.
func TestRunningWorkloadCostsTheAgentOneGoroutine(t *testing.T) {
	e := newEnv(t)
	<-e.agent.recovered
	const n = 6
	direct := fake.New("container", e.node)
	base := drivertest.StableGoroutines(t)
	var ids []string
	for range n {
		cfg := &driver.TaskConfig{ID: drivertest.NewID("gor"), Args: []string{"sleep", "1000"}, LogDir: t.TempDir()}
		if _, err := direct.Start(context.Background(), cfg); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, cfg.ID)
	}
	fakePer := float64(drivertest.StableGoroutines(t)-base) / n
	for _, id := range ids {
		if err := direct.Destroy(context.Background(), id); err != nil {
			t.Fatal(err)
		}
	}
	base = drivertest.StableGoroutines(t)
	for range n {
		w := e.submit(sh("sleep 1000"))
		e.waitFor(w.ID, running)
	}
	all := float64(drivertest.StableGoroutines(t)-base) / n
	if agentPer := all - fakePer; agentPer > 1 {
		t.Errorf("%.1f goroutines a running workload, %.1f of them the fake driver's: the agent's %.1f, want 1", all, fakePer, agentPer)
	}
}

// growStack takes some n KiB of its goroutine's stack.
//
//go:noinline
func growStack(n int) byte {
	var pad [1000]byte
	pad[n%len(pad)] = byte(n)
	if n == 0 {
		return pad[0]
	}
	return growStack(n-1) + pad[(n*7)%len(pad)]
}

// A start's deep calls grow the stack of a goroutine that ends with the
// start: the supervisor that then waits out the run keeps a small one.
// The collector is off meanwhile, so no stack is shrunk behind the test's
// back.
func TestSupervisorDoesNotKeepTheStartsStack(t *testing.T) {
	e := newLifeEnv(t)
	<-e.agent.recovered
	e.f.set(func(f *faults) { f.deepStart = true })
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	before := ms.StackInuse
	const n = 8
	for range n {
		w := e.submit(sh("sleep 1000"))
		e.waitFor(w.ID, running)
	}
	drivertest.StableGoroutines(t)
	runtime.ReadMemStats(&ms)
	// A supervisor that kept the start's stack would hold 512 KiB (stacks
	// grow by doubling); each workload's other goroutines and the
	// runtime's cached stacks come to some 0-48 KiB.
	if per := (int64(ms.StackInuse) - int64(before)) / n; per > 128<<10 {
		t.Errorf("%d KiB more stack a running workload after starts that took 256 KiB each, want the start's stack gone with it", per>>10)
	}
}
