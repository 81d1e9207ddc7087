// Package supervisor is the agent's side of berth's per-task monitors,
// written once for every driver (the pattern of containerd's shim manager
// and Nomad's executor): it starts a monitor (its own session, a ready
// pipe, a pid record stamped with the boot id), re-attaches to one after
// the agent restarted, asks it to stop with a grace period that is enforced
// whether or not anyone still waits, and ends it for good. Drivers keep only
// what is theirs: runc calls, libvirt domains.
//
// The monitor process itself is package supervisor/monitor, built into the
// small cmd/berth-monitor binary.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor/monitor"
)

const (
	// recordWait is how long Attach waits for a monitor that may have been
	// started just before the agent died to record itself.
	recordWait = 5 * time.Second
	// killWait bounds how long Kill waits for a task to end after its
	// forced stop before it kills the monitor's whole session.
	killWait = 10 * time.Second
	// sessionWait bounds the wait for a killed session's monitor to go.
	sessionWait = 5 * time.Second
	// termInterval is how often an agent-enforced stop repeats its polite
	// request while it waits (a VM's power button pressed before the
	// guest init listened is lost).
	termInterval = 2 * time.Second
)

// Options configure a Supervisor.
type Options struct {
	// Kind is what the driver's monitors supervise.
	Kind monitor.Kind
	// Noun names the driver's tasks in errors: "container task", "vm task".
	Noun string
	// Monitor is the monitor command; the task directory is appended (a
	// spare's arguments, monitor.SpareArg and SpareTitle).
	// Default: berth-monitor next to this executable, else on PATH.
	Monitor []string
	// Env is the monitor's environment.
	Env []string
	// BootID is the node's current boot id (default: the kernel's).
	BootID string
	// Spares is how many monitors are kept started ahead of the starts
	// (spares, waiting for their task): a start then hands one its task
	// instead of waiting for a process to be made and to start up.
	Spares int
	Logger *slog.Logger
}

// Supervisor runs the monitors of one driver's tasks and keeps its task
// table. T is the driver's own data per task.
type Supervisor[T any] struct {
	opts Options
	log  *slog.Logger

	mu    sync.Mutex
	tasks map[string]*Task[T]

	// spares are monitors started ahead, waiting for a task (spares.go).
	spares       []*started
	sparesServed uint64
	sparesClosed bool
	spareErr     string
	filling      bool
	fill         sync.WaitGroup
}

// New returns a supervisor. It fails only when the boot id cannot be read.
func New[T any](opts Options) (*Supervisor[T], error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.BootID == "" {
		id, err := BootID("")
		if err != nil {
			return nil, err
		}
		opts.BootID = id
	}
	if len(opts.Monitor) == 0 {
		opts.Monitor = []string{DefaultMonitorPath()}
	}
	s := &Supervisor[T]{opts: opts, log: opts.Logger, tasks: map[string]*Task[T]{}}
	s.fillSpares()
	return s, nil
}

// DefaultMonitorPath is berth-monitor next to this executable if it is
// there, else berth-monitor from PATH.
func DefaultMonitorPath() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "berth-monitor")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if p, err := exec.LookPath("berth-monitor"); err == nil {
		return p
	}
	return "berth-monitor"
}

// MonitorPath is the monitor binary this supervisor starts.
func (s *Supervisor[T]) MonitorPath() string { return s.opts.Monitor[0] }

// BootID is the boot id the supervisor stamps on new tasks.
func (s *Supervisor[T]) BootID() string { return s.opts.BootID }

// BootID reads the node's boot id from path (default the kernel's
// /proc/sys/kernel/random/boot_id): it changes at every boot, so a record
// stamped with another one belongs to processes that are gone.
func BootID(path string) (string, error) {
	if path == "" {
		path = "/proc/sys/kernel/random/boot_id"
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read the boot id: %w", err)
	}
	id := strings.TrimSpace(string(data))
	if id == "" {
		return "", fmt.Errorf("read the boot id: %s is empty", path)
	}
	return id, nil
}

// Task is one task under supervision.
type Task[T any] struct {
	ID  string
	Dir string
	// Data is the driver's own.
	Data T

	done chan struct{}
	once sync.Once
	exit *driver.ExitResult

	mu        sync.Mutex
	monitor   monitor.PidRecord
	pid       int
	startedAt time.Time
	enforcing bool // an agent-side stop deadline runs
}

// NewTask returns a task that has not ended.
func (s *Supervisor[T]) NewTask(id, dir string, data T) *Task[T] {
	return &Task[T]{ID: id, Dir: dir, Data: data, done: make(chan struct{})}
}

// Done is closed when the task has ended and its result is known.
func (t *Task[T]) Done() <-chan struct{} { return t.done }

// Exited reports whether the task has ended.
func (t *Task[T]) Exited() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

// Result is how the task ended; nil before Done.
func (t *Task[T]) Result() *driver.ExitResult {
	if !t.Exited() {
		return nil
	}
	return t.exit
}

// Finish records the task's end; only the first call counts.
func (t *Task[T]) Finish(res *driver.ExitResult) {
	t.once.Do(func() {
		t.exit = res
		close(t.done)
	})
}

// SetRunning records the task's main process and start time for Inspect.
func (t *Task[T]) SetRunning(pid int, at time.Time) {
	t.mu.Lock()
	t.pid, t.startedAt = pid, at
	t.mu.Unlock()
}

// Monitor is the task's monitor's record.
func (t *Task[T]) Monitor() monitor.PidRecord {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.monitor
}

// ---- the task table ----------------------------------------------------

// Register adds a task to the table. It fails when the id is taken.
func (s *Supervisor[T]) Register(t *Task[T]) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.tasks[t.ID]; ok {
		return fmt.Errorf("%s %s: %w", s.opts.Noun, t.ID, errdefs.ErrAlreadyExists)
	}
	s.tasks[t.ID] = t
	return nil
}

// Forget removes a task from the table.
func (s *Supervisor[T]) Forget(id string) {
	s.mu.Lock()
	delete(s.tasks, id)
	s.mu.Unlock()
}

// Get returns a registered task, after checking the id.
func (s *Supervisor[T]) Get(id string) (*Task[T], error) {
	if err := driver.CheckID(id); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tasks[id]
	if !ok {
		return nil, fmt.Errorf("%s %s: %w", s.opts.Noun, id, errdefs.ErrNotFound)
	}
	return t, nil
}

// Known reports whether id is registered.
func (s *Supervisor[T]) Known(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.tasks[id]
	return ok
}

// Wait implements driver.Driver's Wait over the table.
func (s *Supervisor[T]) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	t, err := s.Get(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return t.exit, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Ended implements driver.Driver's Ended over the table.
func (s *Supervisor[T]) Ended(id string) (<-chan struct{}, error) {
	t, err := s.Get(id)
	if err != nil {
		return nil, err
	}
	return t.done, nil
}

// Inspect implements driver.Driver's Inspect over the table.
func (s *Supervisor[T]) Inspect(id string) (*driver.TaskStatus, error) {
	t, err := s.Get(id)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	st := &driver.TaskStatus{ID: id, State: driver.TaskRunning, Pid: t.pid, StartedAt: t.startedAt}
	t.mu.Unlock()
	if t.Exited() {
		st.State, st.Exit = driver.TaskExited, t.exit
	}
	return st, nil
}

// Running returns the registered tasks that have not ended.
func (s *Supervisor[T]) Running() []*Task[T] {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*Task[T]
	for _, t := range s.tasks {
		if !t.Exited() {
			out = append(out, t)
		}
	}
	return out
}

// ---- starting and attaching ----------------------------------------------

// WriteConfig writes the monitor's instructions into the task directory,
// stamped with the protocol version and the boot id.
func (s *Supervisor[T]) WriteConfig(t *Task[T], cfg monitor.Config) error {
	cfg.Version, cfg.Kind, cfg.ID, cfg.BootID = monitor.Version, s.opts.Kind, t.ID, s.opts.BootID
	return fileutil.ReplaceJSON(filepath.Join(t.Dir, monitor.ConfigFile), cfg)
}

// Spawn starts the task's monitor (its config already written), or hands
// the task to a spare monitor started ahead (Options.Spares), and waits
// until it reports the task running or failed (read its status). The
// returned end comes when the monitor says the task's end is recorded, or
// exits. When ctx ends first, the
// start is called off: the monitor is told to stop at once, then its
// session is killed, and ctx's error is returned.
func (s *Supervisor[T]) Spawn(ctx context.Context, t *Task[T]) (*Ended, error) {
	// A previous monitor's record (a respawn) must not be mistaken for
	// this one's.
	_ = os.Remove(filepath.Join(t.Dir, monitor.PidFile))
	m := s.takeSpare(t.Dir)
	if m == nil {
		var err error
		if m, err = s.startMonitor(t.Dir); err != nil {
			return nil, err
		}
	}
	readyR := m.ready
	defer readyR.Close()
	ident, _ := proc.Identify(m.pid)
	if ident.Pid == 0 {
		ident = proc.Ident{Pid: m.pid}
	}
	t.mu.Lock()
	t.monitor = monitor.PidRecord{Ident: ident}
	t.mu.Unlock()
	// The task has ended once the monitor says its end is recorded (or
	// has exited): the monitor itself may still be cleaning up.
	exited := m.end
	readCh := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = readyR.Read(b[:])
		close(readCh)
	}()
	select {
	case <-readCh:
	case <-ctx.Done():
		s.callOff(t, exited)
		return nil, ctx.Err()
	}
	s.refreshRecord(t)
	return exited, nil
}

// callOff ends a start in progress: a stop request the monitor acts on
// (killing runc, say), then its whole session if it does not leave.
func (s *Supervisor[T]) callOff(t *Task[T], exited *Ended) {
	s.refreshRecord(t)
	if err := s.requestStop(t, 0); err != nil {
		s.log.Warn("ask the monitor to call off a start", "task_id", t.ID, "err", err)
	}
	select {
	case <-exited.Done():
		return
	case <-time.After(killWait):
	}
	s.killSession(t)
	<-exited.Done()
}

// refreshRecord adopts the monitor's own record (it carries the protocol
// version that says it hears stop requests).
func (s *Supervisor[T]) refreshRecord(t *Task[T]) {
	var rec monitor.PidRecord
	if fileutil.ReadJSON(filepath.Join(t.Dir, monitor.PidFile), &rec) != nil {
		return
	}
	t.mu.Lock()
	if rec.Pid == t.monitor.Pid || t.monitor.Pid == 0 {
		t.monitor = rec
	}
	t.mu.Unlock()
}

// Status reads the monitor's record of the task.
func Status(dir string) (*monitor.Status, error) {
	var st monitor.Status
	if err := fileutil.ReadJSON(filepath.Join(dir, monitor.StatusFile), &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// Attach finds a task's monitor after the agent restarted. It returns its
// end, which comes when the monitor exits (come already when it is gone),
// errdefs.ErrNotFound when no monitor was ever started for the task, and
// driver.ErrRebooted when the task belongs to an earlier boot of the node.
func (s *Supervisor[T]) Attach(ctx context.Context, t *Task[T]) (*Ended, error) {
	if err := s.CheckBoot(t.Dir); err != nil {
		return nil, err
	}
	var rec monitor.PidRecord
	path := filepath.Join(t.Dir, monitor.PidFile)
	deadline := time.Now().Add(recordWait)
	for {
		err := fileutil.ReadJSON(path, &rec)
		if err == nil {
			break
		}
		if !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			// Died between making the directory and starting the
			// monitor (which records itself first thing): never started.
			return nil, fmt.Errorf("%s %s: no monitor was started (%v): %w", s.opts.Noun, t.ID, err, errdefs.ErrNotFound)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	if rec.BootID != "" && rec.BootID != s.opts.BootID {
		return nil, fmt.Errorf("%s %s: its monitor ran in boot %s: %w", s.opts.Noun, t.ID, rec.BootID, driver.ErrRebooted)
	}
	t.mu.Lock()
	t.monitor = rec
	t.mu.Unlock()
	exited := newEnded()
	if err := proc.OnExit(rec.Ident, exited.end); err != nil {
		return EndedAlready(), nil
	}
	return exited, nil
}

// CheckBoot returns driver.ErrRebooted when the task directory was made in
// an earlier boot: its monitor config names another boot id, or (records
// of protocol version 1, which carry none) it was written before this boot
// began.
func (s *Supervisor[T]) CheckBoot(dir string) error {
	var cfg monitor.Config
	err := fileutil.ReadJSON(filepath.Join(dir, monitor.ConfigFile), &cfg)
	switch {
	case err != nil:
		return nil // nothing was started; Attach says so
	case cfg.BootID != "" && cfg.BootID != s.opts.BootID:
		return fmt.Errorf("task %s was started in boot %s: %w", cfg.ID, cfg.BootID, driver.ErrRebooted)
	case cfg.BootID == "":
		fi, err := os.Stat(filepath.Join(dir, monitor.ConfigFile))
		if bt, berr := bootTime(); err == nil && berr == nil && fi.ModTime().Before(bt) {
			return fmt.Errorf("task %s was started before this boot: %w", cfg.ID, driver.ErrRebooted)
		}
	}
	return nil
}

// bootTime is when the kernel booted (btime in /proc/stat).
func bootTime() (time.Time, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			var sec int64
			if _, err := fmt.Sscan(v, &sec); err != nil {
				return time.Time{}, err
			}
			return time.Unix(sec, 0), nil
		}
	}
	return time.Time{}, errors.New("no btime in /proc/stat")
}

// Adopt checks a handle given to Recover (its driver, version and id) and
// finds the task's directory. It returns known when the task is already
// registered (nothing to do), and errdefs.ErrNotFound when the driver has
// nothing of it on disk.
func (s *Supervisor[T]) Adopt(h *driver.Handle, driverName string, handleVersion int, dir func(id string) string) (taskDir string, known bool, err error) {
	if h.Driver != "" && h.Driver != driverName {
		return "", false, fmt.Errorf("handle of driver %q given to %s: %w", h.Driver, driverName, errdefs.ErrInvalidArgument)
	}
	if h.Version > handleVersion {
		return "", false, fmt.Errorf("handle version %d is newer than this agent's %d: %w", h.Version, handleVersion, errdefs.ErrFailedPrecondition)
	}
	if err := driver.CheckID(h.ID); err != nil {
		return "", false, err
	}
	if s.Known(h.ID) {
		return "", true, nil
	}
	taskDir = dir(h.ID)
	if _, err := os.Stat(taskDir); err != nil {
		return "", false, fmt.Errorf("%s %s: %w", s.opts.Noun, h.ID, errdefs.ErrNotFound)
	}
	return taskDir, false, nil
}

// Attached returns the task for id, re-attaching it through recover when
// this agent has not (it restarted and is cleaning up before or instead of
// recovering it), so a live task is ended and its end recorded before its
// files go. An error means there is nothing to attach to.
func (s *Supervisor[T]) Attached(ctx context.Context, id string, recover func(context.Context, *driver.Handle) error) (*Task[T], error) {
	t, err := s.Get(id)
	if err == nil {
		return t, nil
	}
	if rerr := recover(ctx, &driver.Handle{ID: id}); rerr != nil {
		return nil, err
	}
	return s.Get(id)
}
