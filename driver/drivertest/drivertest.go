// Package drivertest is the conformance suite every berth driver passes:
// the fake, ctrdriver and vmdriver run the same cases, so a workload behaves
// the same whatever isolation policy picks for it.
package drivertest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// Harness says how to run the suite against one driver.
type Harness struct {
	// New returns a driver over the harness's state. Called a second time
	// it must return a fresh driver over the same state, as after an agent
	// restart.
	New func(t *testing.T) driver.Driver
	// Image is the busybox root filesystem every task uses.
	Image driver.Image
	// StopTimeout is the grace period used by the stop cases.
	StopTimeout time.Duration
	// Slack is how long starting and ending a task may take on this driver
	// beyond what the workload itself does (a VM boots, a container does
	// not); it bounds waits so a hung driver fails instead of hanging.
	Slack time.Duration
	// Parallel is how many tasks the concurrency case runs at once.
	Parallel int
}

// Run runs every case.
// The exec and signal cases run too when the driver implements
// driver.Execer and driver.Signaler, the attach cases when it implements
// driver.Attacher.
func Run(t *testing.T, h Harness) {
	h = h.defaults()
	d := h.New(t)
	s := &suite{h: h, d: d}
	t.Run("OutputAndExitCode", s.outputAndExitCode)
	t.Run("EnvAndWorkdir", s.envAndWorkdir)
	t.Run("GracefulStop", s.gracefulStop)
	t.Run("ForcedStop", s.forcedStop)
	t.Run("StopExited", s.stopExited)
	t.Run("DestroyRemovesTask", s.destroy)
	t.Run("UnknownTask", s.unknown)
	t.Run("DuplicateStart", s.duplicate)
	t.Run("CommitBeforeRun", s.commitBeforeRun)
	t.Run("Stats", s.stats)
	t.Run("Concurrent", s.concurrent)
	t.Run("Recover", s.recover)
	t.Run("RecoverFromID", s.recoverFromID)
	t.Run("StopOutlivesCaller", s.stopOutlivesCaller)
	t.Run("StopResumedAfterRestart", s.stopResumed)
	t.Run("DestroyAfterAnotherDestroyed", s.destroyTwice)
	t.Run("InvalidIDs", s.invalidIDs)
	t.Run("Close", s.close)
	t.Run("EndedBeforeWait", s.ended)
	s.runExec(t)
	s.runAttach(t)
}

func (h Harness) defaults() Harness {
	if h.StopTimeout == 0 {
		h.StopTimeout = 2 * time.Second
	}
	if h.Slack == 0 {
		h.Slack = 20 * time.Second
	}
	if h.Parallel == 0 {
		h.Parallel = 3
	}
	return h
}

type suite struct {
	h Harness
	d driver.Driver
}

// NewID returns a task id with a prefix unique to this test process, so a
// shared node's other tasks are never touched.
func NewID(prefix string) string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

func (s *suite) task(t *testing.T, args ...string) *driver.TaskConfig {
	t.Helper()
	return &driver.TaskConfig{
		ID:        NewID("dt"),
		Image:     s.h.Image,
		Args:      args,
		Env:       []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"},
		Resources: driver.Resources{CPU: 1, MemoryBytes: 256 << 20, Pids: 128},
		LogDir:    t.TempDir(),
	}
}

func (s *suite) ctx(t *testing.T, extra time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), s.h.Slack+extra)
	t.Cleanup(cancel)
	return ctx
}

// start starts cfg on d and destroys it when the test ends.
func (s *suite) start(t *testing.T, d driver.Driver, cfg *driver.TaskConfig) *driver.Handle {
	t.Helper()
	h, err := d.Start(s.ctx(t, 0), cfg)
	if err != nil {
		t.Fatalf("Start(%v): %v", cfg.Args, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), s.h.Slack)
		defer cancel()
		if err := d.Destroy(ctx, cfg.ID); err != nil {
			t.Errorf("Destroy(%s): %v", cfg.ID, err)
		}
	})
	return h
}

func (s *suite) wait(t *testing.T, d driver.Driver, id string, extra time.Duration) *driver.ExitResult {
	t.Helper()
	res, err := d.Wait(s.ctx(t, extra), id)
	if err != nil {
		t.Fatalf("Wait(%s): %v", id, err)
	}
	return res
}

// ReadLog returns one of a task's log files.
func ReadLog(t *testing.T, cfg *driver.TaskConfig, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(cfg.LogDir, name))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("read %s: %v", name, err)
	}
	return string(data)
}

func (s *suite) outputAndExitCode(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo hello; echo oops >&2; exit 7")
	s.start(t, s.d, cfg)
	res := s.wait(t, s.d, cfg.ID, 0)
	if res.ExitCode != 7 {
		t.Errorf("exit code = %d, want 7 (result %+v)", res.ExitCode, res)
	}
	if got := ReadLog(t, cfg, driver.StdoutLog); got != "hello\n" {
		t.Errorf("stdout = %q, want %q", got, "hello\n")
	}
	if got := ReadLog(t, cfg, driver.StderrLog); got != "oops\n" {
		t.Errorf("stderr = %q, want %q", got, "oops\n")
	}
	st, err := s.d.Inspect(s.ctx(t, 0), cfg.ID)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if st.State != driver.TaskExited || st.Exit == nil || st.Exit.ExitCode != 7 {
		t.Errorf("Inspect after exit = %+v, want exited with 7", st)
	}
}

func (s *suite) envAndWorkdir(t *testing.T) {
	cfg := s.task(t, "sh", "-c", `echo "$GREETING"; pwd`)
	cfg.Env = append(cfg.Env, "GREETING=hi there")
	cfg.Workdir = "/tmp"
	s.start(t, s.d, cfg)
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 0 {
		t.Fatalf("exit code = %d, want 0; stderr %q", res.ExitCode, ReadLog(t, cfg, driver.StderrLog))
	}
	if got, want := ReadLog(t, cfg, driver.StdoutLog), "hi there\n/tmp\n"; got != want {
		t.Errorf("stdout = %q, want %q", got, want)
	}
}

// waitRunning waits until the workload printed its ready marker, so a
// signal cannot arrive before its trap is set.
func (s *suite) waitOutput(t *testing.T, cfg *driver.TaskConfig, marker string) {
	t.Helper()
	deadline := time.Now().Add(s.h.Slack)
	for time.Now().Before(deadline) {
		if got := ReadLog(t, cfg, driver.StdoutLog); len(got) >= len(marker) && got[:len(marker)] == marker {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("workload did not print %q within %v; stdout %q", marker, s.h.Slack, ReadLog(t, cfg, driver.StdoutLog))
}

func (s *suite) gracefulStop(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while true; do sleep 0.1; done")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	if err := s.d.Stop(s.ctx(t, s.h.StopTimeout), cfg.ID, s.h.StopTimeout*5); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	res := s.wait(t, s.d, cfg.ID, 0)
	if res.ExitCode != 3 {
		t.Errorf("exit code after SIGTERM = %d, want 3 from the trap", res.ExitCode)
	}
	if got := ReadLog(t, cfg, driver.StdoutLog); got != "ready\ngot-term\n" {
		t.Errorf("stdout = %q, want the trap's output", got)
	}
}

func (s *suite) forcedStop(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "trap '' TERM; echo ready; sleep 1000")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	begin := time.Now()
	if err := s.d.Stop(s.ctx(t, s.h.StopTimeout), cfg.ID, s.h.StopTimeout); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	took := time.Since(begin)
	// The grace period is a promise to the workload and to the operator:
	// not cut short, and not overrun by more than the driver's slack.
	if took < s.h.StopTimeout {
		t.Errorf("Stop returned after %v, before the %v grace period", took, s.h.StopTimeout)
	}
	if took > s.h.StopTimeout+s.h.Slack {
		t.Errorf("Stop took %v, more than the %v grace period plus %v", took, s.h.StopTimeout, s.h.Slack)
	}
	res := s.wait(t, s.d, cfg.ID, 0)
	if res.ExitCode != 137 {
		t.Errorf("exit code after forced stop = %d, want 137 (SIGKILL)", res.ExitCode)
	}
}

func (s *suite) stopExited(t *testing.T) {
	cfg := s.task(t, "true")
	s.start(t, s.d, cfg)
	s.wait(t, s.d, cfg.ID, 0)
	if err := s.d.Stop(s.ctx(t, 0), cfg.ID, time.Second); err != nil {
		t.Errorf("Stop of an exited task: %v, want nil", err)
	}
}

func (s *suite) destroy(t *testing.T) {
	cfg := s.task(t, "sleep", "1000")
	ctx := s.ctx(t, 0)
	if _, err := s.d.Start(ctx, cfg); err != nil {
		t.Fatalf("Start: %v", err)
	}
	ids, err := s.d.List(ctx)
	if err != nil || !slices.Contains(ids, cfg.ID) {
		t.Fatalf("List = %v, %v; want it to contain %s", ids, err, cfg.ID)
	}
	if err := s.d.Destroy(ctx, cfg.ID); err != nil {
		t.Fatalf("Destroy of a running task: %v", err)
	}
	ids, err = s.d.List(ctx)
	if err != nil || slices.Contains(ids, cfg.ID) {
		t.Errorf("List after Destroy = %v, %v; want %s gone", ids, err, cfg.ID)
	}
	if _, err := s.d.Inspect(ctx, cfg.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Inspect after Destroy: %v, want ErrNotFound", err)
	}
	if err := s.d.Destroy(ctx, cfg.ID); err != nil {
		t.Errorf("second Destroy: %v, want nil", err)
	}
}

func (s *suite) unknown(t *testing.T) {
	ctx := s.ctx(t, 0)
	id := NewID("dt-missing")
	checks := map[string]error{}
	_, checks["Inspect"] = s.d.Inspect(ctx, id)
	_, checks["Wait"] = s.d.Wait(ctx, id)
	checks["Stop"] = s.d.Stop(ctx, id, time.Second)
	_, checks["Stats"] = s.d.Stats(ctx, id)
	for name, err := range checks {
		if !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("%s(unknown id) = %v, want ErrNotFound", name, err)
		}
	}
	if err := s.d.Recover(ctx, &driver.Handle{ID: id, Driver: s.d.Name()}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Recover(unknown id) = %v, want ErrNotFound", err)
	}
}

func (s *suite) duplicate(t *testing.T) {
	cfg := s.task(t, "sleep", "1000")
	s.start(t, s.d, cfg)
	if _, err := s.d.Start(s.ctx(t, 0), cfg); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Start with the same id: %v, want ErrAlreadyExists", err)
	}
}

// commitBeforeRun: Start calls Commit once, before anything of the
// workload ran, and a Commit that fails aborts the start with nothing left.
func (s *suite) commitBeforeRun(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo ran")
	calls := 0
	cfg.Commit = func() error {
		calls++
		if b, _ := os.ReadFile(filepath.Join(cfg.LogDir, driver.StdoutLog)); len(b) != 0 {
			t.Errorf("the workload wrote %q before Commit", b)
		}
		return nil
	}
	s.start(t, s.d, cfg)
	if res := s.wait(t, s.d, cfg.ID, 0); res.ExitCode != 0 {
		t.Errorf("exit %d (%s)", res.ExitCode, res.Err)
	}
	if calls != 1 {
		t.Errorf("Commit called %d times, want once", calls)
	}

	failed := s.task(t, "sh", "-c", "echo ran")
	refused := errors.New("the state database refused the record")
	failed.Commit = func() error { return refused }
	if _, err := s.d.Start(s.ctx(t, 0), failed); !errors.Is(err, refused) {
		t.Fatalf("Start whose Commit fails: %v, want its error", err)
	}
	ctx := s.ctx(t, 0)
	if ids, err := s.d.List(ctx); err != nil || slices.Contains(ids, failed.ID) {
		t.Errorf("List after a start whose Commit failed = %v, %v; want %s absent", ids, err, failed.ID)
	}
	if _, err := s.d.Inspect(ctx, failed.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Inspect after a start whose Commit failed: %v, want ErrNotFound", err)
	}
	if b, _ := os.ReadFile(filepath.Join(failed.LogDir, driver.StdoutLog)); len(b) != 0 {
		t.Errorf("a start whose Commit failed ran the workload: %q", b)
	}
}

func (s *suite) stats(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo ready; sleep 1000")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	st, err := s.d.Stats(s.ctx(t, 0), cfg.ID)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if st.MemoryBytes == 0 {
		t.Errorf("Stats memory = 0, want the workload's usage")
	}
	if st.MemoryWorkingSetBytes == 0 || st.MemoryWorkingSetBytes > st.MemoryBytes {
		t.Errorf("Stats working set = %d, want above 0 and at most the usage %d", st.MemoryWorkingSetBytes, st.MemoryBytes)
	}
	if st.MemoryLimit != 0 && st.MemoryLimit > uint64(cfg.Resources.MemoryBytes)*2 {
		t.Errorf("Stats memory limit = %d, far above the %d requested", st.MemoryLimit, cfg.Resources.MemoryBytes)
	}
}

func (s *suite) concurrent(t *testing.T) {
	n := s.h.Parallel
	cfgs := make([]*driver.TaskConfig, n)
	for i := range cfgs {
		cfgs[i] = s.task(t, "sh", "-c", fmt.Sprintf("echo task-%d; exit %d", i, 10+i))
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i, cfg := range cfgs {
		wg.Go(func() {
			_, errs[i] = s.d.Start(s.ctx(t, 0), cfg)
		})
	}
	wg.Wait()
	for i, cfg := range cfgs {
		if errs[i] != nil {
			t.Errorf("Start %d: %v", i, errs[i])
			continue
		}
		t.Cleanup(func() { _ = s.d.Destroy(context.Background(), cfg.ID) })
	}
	for i, cfg := range cfgs {
		if errs[i] != nil {
			continue
		}
		res := s.wait(t, s.d, cfg.ID, 0)
		if res.ExitCode != 10+i {
			t.Errorf("task %d exit code = %d, want %d", i, res.ExitCode, 10+i)
		}
		if got, want := ReadLog(t, cfg, driver.StdoutLog), fmt.Sprintf("task-%d\n", i); got != want {
			t.Errorf("task %d stdout = %q, want %q", i, got, want)
		}
	}
}

// restarted hands h to a fresh driver over the same state, as after an
// agent restart, and has that driver destroy the task when the test ends.
func (s *suite) restarted(t *testing.T, h *driver.Handle) driver.Driver {
	t.Helper()
	d2 := s.h.New(t)
	if err := d2.Recover(s.ctx(t, 0), h); err != nil {
		t.Fatalf("Recover(%s): %v", h.ID, err)
	}
	t.Cleanup(func() { _ = d2.Destroy(context.Background(), h.ID) })
	return d2
}

// recover starts a task, then hands its handle to a fresh driver over the
// same state (an agent restart) and expects it to follow the task to its end.
func (s *suite) recover(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo before; sleep 2; echo after; exit 5")
	h := s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "before\n")
	d2 := s.restarted(t, h)
	res := s.wait(t, d2, cfg.ID, 2*time.Second)
	if res.ExitCode != 5 {
		t.Errorf("exit code seen by the recovered driver = %d, want 5 (%+v)", res.ExitCode, res)
	}
	if got := ReadLog(t, cfg, driver.StdoutLog); got != "before\nafter\n" {
		t.Errorf("stdout = %q, want output from before and after the restart", got)
	}
}

// ended checks Driver.Ended: the channel stays open while the task
// runs, closes once it has ended, and Wait then answers at once; a fresh
// driver over the same state (an agent restart) says it of the task it
// recovered; an unknown task is not found.
func (s *suite) ended(t *testing.T) {
	if _, err := s.d.Ended(NewID("dt-none")); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Ended of an unknown task: %v, want not found", err)
	}
	cfg := s.task(t, "sh", "-c", "trap 'exit 4' TERM; echo before; while true; do sleep 0.1; done")
	h := s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "before\n")
	d2 := s.restarted(t, h)
	for name, d := range map[string]driver.Driver{"the driver that started it": s.d, "the driver that recovered it": d2} {
		endc, err := d.Ended(cfg.ID)
		if err != nil {
			t.Fatalf("Ended, %s: %v", name, err)
		}
		select {
		case <-endc:
			t.Fatalf("Ended, %s: closed while the task runs", name)
		case <-time.After(200 * time.Millisecond):
		}
	}
	// The task's end: SIGTERM, which its trap turns into exit 4.
	if err := d2.Stop(s.ctx(t, s.h.StopTimeout), cfg.ID, s.h.StopTimeout); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	endc, err := d2.Ended(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-endc:
	case <-s.ctx(t, 0).Done():
		t.Fatal("Ended never closed after the task exited")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	res, err := d2.Wait(ctx, cfg.ID)
	if err != nil || res.ExitCode != 4 {
		t.Errorf("Wait once ended: %+v, %v; want exit 4 at once", res, err)
	}
}

// recoverFromID hands a fresh driver only the task id (the agent died
// before it could persist the handle) and expects the same as Recover.
func (s *suite) recoverFromID(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo before; sleep 2; exit 6")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "before\n")
	d2 := s.restarted(t, &driver.Handle{ID: cfg.ID})
	if res := s.wait(t, d2, cfg.ID, 2*time.Second); res.ExitCode != 6 {
		t.Errorf("exit code seen after Recover from the id = %d, want 6 (%+v)", res.ExitCode, res)
	}
}

// stopOutlivesCaller asks for a stop and gives up waiting at once: the
// task must still end by the grace period (SIGKILL for one that ignores
// SIGTERM), because the deadline is the driver's, not the caller's.
func (s *suite) stopOutlivesCaller(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "trap '' TERM; echo ready; sleep 1000")
	s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	err := s.d.Stop(ctx, cfg.ID, s.h.StopTimeout)
	cancel()
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Stop with a caller that leaves: %v", err)
	}
	res := s.wait(t, s.d, cfg.ID, s.h.StopTimeout)
	if res.ExitCode != 137 {
		t.Errorf("exit code = %d, want 137: the stop's deadline must outlive its caller (%+v)", res.ExitCode, res)
	}
}

// stopResumed asks for a stop, then hands the task to a fresh driver (an
// agent restart in the grace period): the deadline still holds.
func (s *suite) stopResumed(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "trap '' TERM; echo ready; sleep 1000")
	h := s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	_ = s.d.Stop(ctx, cfg.ID, s.h.StopTimeout)
	cancel()
	d2 := s.restarted(t, h)
	if res := s.wait(t, d2, cfg.ID, s.h.StopTimeout); res.ExitCode != 137 {
		t.Errorf("exit code = %d, want 137: a stop asked before a restart must be enforced after it (%+v)", res.ExitCode, res)
	}
}

// destroyTwice: a task a second driver over the same state destroyed (an
// agent restart) is gone for the first one too: its Destroy succeeds, and
// the task stays unknown.
func (s *suite) destroyTwice(t *testing.T) {
	cfg := s.task(t, "sh", "-c", "echo ready; sleep 1000")
	h := s.start(t, s.d, cfg)
	s.waitOutput(t, cfg, "ready\n")
	d2 := s.h.New(t)
	if err := d2.Recover(s.ctx(t, 0), h); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if err := d2.Destroy(s.ctx(t, 0), cfg.ID); err != nil {
		t.Fatalf("Destroy by the second driver: %v", err)
	}
	if err := s.d.Destroy(s.ctx(t, 0), cfg.ID); err != nil {
		t.Errorf("Destroy by the first driver after the second's: %v, want nil", err)
	}
	if _, err := d2.Inspect(s.ctx(t, 0), cfg.ID); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Inspect after both destroyed it: %v, want ErrNotFound", err)
	}
}

// invalidIDs: ids name directories, domains and cgroups; every method
// refuses one that could escape or collide, before touching anything.
func (s *suite) invalidIDs(t *testing.T) {
	ctx := s.ctx(t, 0)
	for _, id := range []string{"", "../escape", "a/b", ".hidden", "-flag", "x y", string(make([]byte, 65))} {
		cfg := s.task(t, "true")
		cfg.ID = id
		checks := map[string]error{}
		_, checks["Start"] = s.d.Start(ctx, cfg)
		_, checks["Inspect"] = s.d.Inspect(ctx, id)
		_, checks["Wait"] = s.d.Wait(ctx, id)
		checks["Stop"] = s.d.Stop(ctx, id, time.Second)
		checks["Destroy"] = s.d.Destroy(ctx, id)
		checks["Recover"] = s.d.Recover(ctx, &driver.Handle{ID: id, Driver: s.d.Name()})
		for name, err := range checks {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("%s(id %q) = %v, want ErrInvalidArgument", name, id, err)
			}
		}
	}
}

// close: closing a driver leaves its tasks running, and a new driver
// recovers them.
func (s *suite) close(t *testing.T) {
	d := s.h.New(t)
	cfg := s.task(t, "sh", "-c", "echo ready; sleep 1; exit 4")
	h, err := d.Start(s.ctx(t, 0), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if err := d.Close(s.ctx(t, 0)); err != nil {
		t.Fatalf("Close: %v", err)
	}
	d2 := s.restarted(t, h)
	if res := s.wait(t, d2, cfg.ID, time.Second); res.ExitCode != 4 {
		t.Errorf("exit code after Close and Recover = %d, want 4: Close must leave tasks running (%+v)", res.ExitCode, res)
	}
}

// StableGoroutines waits until the test process's goroutine count holds
// still (background work such as a spare monitor being made comes and
// goes) and returns it.
func StableGoroutines(t *testing.T) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	last, same := -1, 0
	for {
		n := runtime.NumGoroutine()
		if n == last {
			if same++; same == 5 {
				return n
			}
		} else {
			last, same = n, 0
		}
		if time.Now().After(deadline) {
			t.Fatalf("the goroutine count never held still (last %d)", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
