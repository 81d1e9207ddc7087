// Package fake is a stateful driver for agent and API tests. It runs each
// task's command as a plain host process (no isolation at all), so tests see
// real output, exit codes and timing without root, runc or libvirt. Every
// call is recorded, and an error can be injected per method.
package fake

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/attachio"
	"github.com/berthd/berth/internal/ptyio"
)

// Node holds the fake's processes. Two Drivers over one Node behave like a
// driver before and after an agent restart: the second sees the first's
// tasks only after Recover.
type Node struct {
	mu    sync.Mutex
	tasks map[string]*task
	// rebooted are tasks of an earlier boot: their processes are gone and
	// Recover answers driver.ErrRebooted (once).
	rebooted map[string]bool
}

// NewNode returns an empty node.
func NewNode() *Node { return &Node{tasks: map[string]*task{}, rebooted: map[string]bool{}} }

// Reboot simulates a host reboot: every task's processes die with the
// node, and a driver's Recover of one of them answers driver.ErrRebooted.
func (n *Node) Reboot() {
	n.mu.Lock()
	tasks := n.tasks
	n.tasks = map[string]*task{}
	for id := range tasks {
		n.rebooted[id] = true
	}
	n.mu.Unlock()
	for _, t := range tasks {
		t.closeSessions()
		if t.cmd != nil && t.cmd.Process != nil {
			_ = syscall.Kill(-t.cmd.Process.Pid, syscall.SIGKILL)
			<-t.done
		}
	}
}

type task struct {
	driver  string // the Name of the driver that started it
	cfg     driver.TaskConfig
	cmd     *exec.Cmd
	started time.Time
	done    chan struct{}
	exit    *driver.ExitResult

	// The stop deadline belongs to the task, not to the driver that was
	// asked, so it outlives both the caller and the driver (a restart).
	stopMu   sync.Mutex
	deadline *time.Timer
	killAt   time.Time
	sessions map[*session]struct{} // exec sessions, guarded by stopMu

	// The task's own streams, for attach sessions: its output's hubs
	// (stderr nil on a terminal), its terminal and its stdin.
	stdoutHub, stderrHub *attachio.Hub
	pty                  *os.File
	stdin                io.WriteCloser
	stdinMu              sync.Mutex
	copiers              sync.WaitGroup
}

// Call is one recorded driver call.
type Call struct {
	Method string
	ID     string
}

// Driver is the fake driver.
type Driver struct {
	name string
	node *Node

	mu       sync.Mutex
	known    map[string]bool
	calls    []Call
	failures map[string][]error
	fp       driver.Fingerprint
	delay    map[string]time.Duration
}

var _ driver.Driver = (*Driver)(nil)

// New returns a fake driver providing isolation name ("container", "vm").
func New(name string, node *Node) *Driver {
	return &Driver{
		name: name, node: node,
		known:    map[string]bool{},
		failures: map[string][]error{},
		delay:    map[string]time.Duration{},
		fp:       driver.Fingerprint{Healthy: true, Version: "fake", Capabilities: capabilities(name), Details: map[string]string{"fake": "true"}},
	}
}

// capabilities are those of the real driver of that isolation.
func capabilities(name string) driver.Capabilities {
	if name == "vm" {
		return driver.Capabilities{WholeDisk: true, Accel: driver.AccelTCG}
	}
	return driver.Capabilities{HostNetwork: true}
}

// SetFingerprint sets what Fingerprint reports.
func (d *Driver) SetFingerprint(fp driver.Fingerprint) {
	d.mu.Lock()
	d.fp = fp
	d.mu.Unlock()
}

// FailNext makes the next call of method (e.g. "Start") return err.
func (d *Driver) FailNext(method string, err error) {
	d.mu.Lock()
	d.failures[method] = append(d.failures[method], err)
	d.mu.Unlock()
}

// Delay makes every call of method take at least dur before it acts, or
// fail with its ctx's error when ctx ends first (a hung runtime).
func (d *Driver) Delay(method string, dur time.Duration) {
	d.mu.Lock()
	d.delay[method] = dur
	d.mu.Unlock()
}

// Calls returns the calls made so far.
func (d *Driver) Calls() []Call {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Call(nil), d.calls...)
}

// record notes a call, applies its delay (cut short when ctx ends, as a
// real driver's hung call is by its caller) and returns its injected error.
func (d *Driver) record(ctx context.Context, method, id string) error {
	d.mu.Lock()
	d.calls = append(d.calls, Call{Method: method, ID: id})
	delay := d.delay[method]
	var err error
	if q := d.failures[method]; len(q) > 0 {
		err, d.failures[method] = q[0], q[1:]
	}
	d.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return fmt.Errorf("fake %s %s: %w", method, id, ctx.Err())
		}
	}
	if err == nil && method != "Close" && method != "List" && method != "Fingerprint" {
		err = driver.CheckID(id)
	}
	return err
}

func (d *Driver) get(id string) (*task, error) {
	d.mu.Lock()
	known := d.known[id]
	d.mu.Unlock()
	d.node.mu.Lock()
	t, ok := d.node.tasks[id]
	d.node.mu.Unlock()
	if !ok || !known {
		return nil, fmt.Errorf("fake task %s: %w", id, errdefs.ErrNotFound)
	}
	return t, nil
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return d.name }

// Fingerprint implements driver.Driver.
func (d *Driver) Fingerprint(ctx context.Context) driver.Fingerprint {
	_ = d.record(ctx, "Fingerprint", "")
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.fp
}

// Start implements driver.Driver.
func (d *Driver) Start(ctx context.Context, cfg *driver.TaskConfig) (*driver.Handle, error) {
	if err := d.record(ctx, "Start", cfg.ID); err != nil {
		return nil, err
	}
	if len(cfg.Args) == 0 {
		return nil, fmt.Errorf("fake task %s has no command: %w", cfg.ID, errdefs.ErrInvalidArgument)
	}
	d.node.mu.Lock()
	if _, ok := d.node.tasks[cfg.ID]; ok {
		d.node.mu.Unlock()
		return nil, fmt.Errorf("fake task %s: %w", cfg.ID, errdefs.ErrAlreadyExists)
	}
	t := &task{driver: d.name, cfg: *cfg, done: make(chan struct{})}
	d.node.tasks[cfg.ID] = t
	d.node.mu.Unlock()

	err := cfg.RunCommit()
	if err == nil {
		err = t.run()
	}
	if err != nil {
		d.node.mu.Lock()
		delete(d.node.tasks, cfg.ID)
		d.node.mu.Unlock()
		return nil, err
	}
	d.mu.Lock()
	d.known[cfg.ID] = true
	d.mu.Unlock()
	return &driver.Handle{ID: cfg.ID, Driver: d.name, Version: 1}, nil
}

func (t *task) run() error {
	cmd := exec.Command(t.cfg.Args[0], t.cfg.Args[1:]...)
	cmd.Env = t.cfg.Env
	cmd.Dir = t.cfg.Workdir
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := os.MkdirAll(t.cfg.LogDir, 0o755); err != nil {
		return err
	}
	// Output goes through the fake's own copiers, as through a real
	// driver's monitor: into the logs and to attached sessions.
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	streams := []string{driver.StdoutLog, driver.StderrLog}
	var readers []io.Reader
	if t.cfg.TTY {
		master, slave, err := ptyio.Open()
		if err != nil {
			return err
		}
		childEnds = append(childEnds, slave)
		if err := ptyio.Resize(master, 24, 80); err != nil {
			master.Close()
			return err
		}
		t.pty = master
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
		if t.cfg.Stdin {
			t.stdin = &ptyio.Stdin{F: master}
		}
		streams, readers = streams[:1], []io.Reader{ptyio.Reader{F: master}}
	} else {
		for range streams {
			r, w, err := os.Pipe()
			if err != nil {
				return err
			}
			childEnds = append(childEnds, w)
			readers = append(readers, r)
		}
		cmd.Stdout, cmd.Stderr = childEnds[0], childEnds[1]
		if t.cfg.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				return err
			}
			childEnds = append(childEnds, r)
			cmd.Stdin, t.stdin = r, w
		}
	}
	hubs := make([]*attachio.Hub, len(streams))
	var logs []*os.File
	for i, name := range streams {
		f, err := os.OpenFile(filepath.Join(t.cfg.LogDir, name), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return err
		}
		logs = append(logs, f)
		hubs[i] = attachio.NewHub(driver.AttachReplayMax, attachBacklog)
	}
	if t.cfg.TTY {
		// The terminal writes both streams into one; stderr's log stays
		// empty.
		f, err := os.OpenFile(filepath.Join(t.cfg.LogDir, driver.StderrLog), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return err
		}
		f.Close()
	}
	t.stdoutHub = hubs[0]
	if len(hubs) > 1 {
		t.stderrHub = hubs[1]
	}
	err := cmd.Start()
	if err != nil {
		for i := range logs {
			logs[i].Close()
			if c, ok := readers[i].(io.Closer); ok {
				c.Close()
			}
		}
		if t.pty != nil {
			t.pty.Close()
		}
		return fmt.Errorf("start fake task: %w", err)
	}
	for i := range readers {
		t.copiers.Go(func() {
			_, _ = io.Copy(io.MultiWriter(logs[i], hubs[i]), readers[i])
			logs[i].Close()
			if c, ok := readers[i].(io.Closer); ok {
				c.Close()
			}
			hubs[i].Close()
		})
	}
	t.cmd, t.started = cmd, time.Now().UTC()
	go func() {
		err := cmd.Wait()
		res := &driver.ExitResult{FinishedAt: time.Now().UTC()}
		if ee, ok := err.(*exec.ExitError); ok {
			ws := ee.Sys().(syscall.WaitStatus)
			if ws.Signaled() {
				res.Signal = int(ws.Signal())
				res.ExitCode = 128 + res.Signal
			} else {
				res.ExitCode = ws.ExitStatus()
			}
		} else if err != nil {
			res.ExitCode, res.Err = -1, err.Error()
		}
		// The task's end is known once its output is all in the logs
		// (what it left running may hold a pipe: not for long).
		waitCopiers(&t.copiers, 2*time.Second)
		if t.pty != nil {
			t.pty.Close()
		}
		t.exit = res
		close(t.done)
	}()
	return nil
}

// Wait implements driver.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	if err := d.record(ctx, "Wait", id); err != nil {
		return nil, err
	}
	t, err := d.get(id)
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

// Ended implements driver.Driver.
func (d *Driver) Ended(id string) (<-chan struct{}, error) {
	if err := d.record(context.Background(), "Ended", id); err != nil {
		return nil, err
	}
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	return t.done, nil
}

// Stop implements driver.Driver.
func (d *Driver) Stop(ctx context.Context, id string, timeout time.Duration) error {
	if err := d.record(ctx, "Stop", id); err != nil {
		return err
	}
	t, err := d.get(id)
	if err != nil {
		return err
	}
	t.stop(timeout)
	select {
	case <-t.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop sends SIGTERM and arms SIGKILL at the deadline; a later stop never
// extends an earlier deadline.
func (t *task) stop(grace time.Duration) {
	select {
	case <-t.done:
		return
	default:
	}
	t.stopMu.Lock()
	defer t.stopMu.Unlock()
	at := time.Now().Add(grace)
	if t.deadline != nil && !at.Before(t.killAt) {
		return
	}
	if t.deadline == nil {
		_ = syscall.Kill(-t.cmd.Process.Pid, syscall.SIGTERM)
	} else {
		t.deadline.Stop()
	}
	t.killAt = at
	t.deadline = time.AfterFunc(grace, func() {
		select {
		case <-t.done:
		default:
			_ = syscall.Kill(-t.cmd.Process.Pid, syscall.SIGKILL)
		}
	})
}

// Destroy implements driver.Driver.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := d.record(ctx, "Destroy", id); err != nil {
		return err
	}
	d.node.mu.Lock()
	t, ok := d.node.tasks[id]
	delete(d.node.tasks, id)
	delete(d.node.rebooted, id)
	d.node.mu.Unlock()
	d.mu.Lock()
	delete(d.known, id)
	d.mu.Unlock()
	if !ok || t.cmd == nil || t.cmd.Process == nil {
		// Absent, or still being started by Start (which then fails).
		return nil
	}
	t.closeSessions()
	select {
	case <-t.done:
	default:
		_ = syscall.Kill(-t.cmd.Process.Pid, syscall.SIGKILL)
		<-t.done
	}
	return nil
}

// Inspect implements driver.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	if err := d.record(ctx, "Inspect", id); err != nil {
		return nil, err
	}
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	st := &driver.TaskStatus{ID: id, State: driver.TaskRunning, Pid: t.cmd.Process.Pid, StartedAt: t.started}
	select {
	case <-t.done:
		st.State, st.Exit = driver.TaskExited, t.exit
	default:
	}
	return st, nil
}

// Stats implements driver.Driver with the process's resident memory.
func (d *Driver) Stats(ctx context.Context, id string) (*driver.Stats, error) {
	if err := d.record(ctx, "Stats", id); err != nil {
		return nil, err
	}
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(t.cmd.Process.Pid) + "/status")
	if err != nil {
		return nil, fmt.Errorf("fake task %s is not running: %w", id, errdefs.ErrFailedPrecondition)
	}
	st := &driver.Stats{Pids: 1, MemoryLimit: uint64(t.cfg.Resources.MemoryBytes)}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseUint(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			st.MemoryBytes = kb << 10
			st.MemoryWorkingSetBytes = st.MemoryBytes
		}
	}
	return st, nil
}

// Recover implements driver.Driver.
func (d *Driver) Recover(ctx context.Context, h *driver.Handle) error {
	if err := d.record(ctx, "Recover", h.ID); err != nil {
		return err
	}
	d.node.mu.Lock()
	_, ok := d.node.tasks[h.ID]
	rebooted := d.node.rebooted[h.ID]
	delete(d.node.rebooted, h.ID)
	d.node.mu.Unlock()
	if rebooted {
		return fmt.Errorf("fake task %s: %w", h.ID, driver.ErrRebooted)
	}
	if !ok {
		return fmt.Errorf("fake task %s: %w", h.ID, errdefs.ErrNotFound)
	}
	d.mu.Lock()
	d.known[h.ID] = true
	d.mu.Unlock()
	return nil
}

// List implements driver.Driver.
func (d *Driver) List(ctx context.Context) ([]string, error) {
	if err := d.record(ctx, "List", ""); err != nil {
		return nil, err
	}
	d.node.mu.Lock()
	defer d.node.mu.Unlock()
	ids := make([]string, 0, len(d.node.tasks))
	for id, t := range d.node.tasks {
		if t.driver == d.name {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// Close implements driver.Driver: the fake holds nothing of its own.
func (d *Driver) Close(ctx context.Context) error {
	_ = d.record(ctx, "Close", "")
	return nil
}
