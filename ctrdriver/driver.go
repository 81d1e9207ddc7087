// Package ctrdriver runs berth tasks as OCI containers under runc.
//
// Each task gets a directory under the driver's root:
//
//	tasks/<id>/bundle/config.json   OCI runtime spec (runtime-spec types)
//	tasks/<id>/bundle/rootfs        overlay mount: image rootfs + upper
//	tasks/<id>/upper, work          the task's copy-on-write layer
//	tasks/<id>/monitor.json         the monitor's instructions
//	tasks/<id>/monitor.pid          the monitor's pid and start time
//	tasks/<id>/status.json          the monitor's record: running, exit code
//	tasks/<id>/runc.log, monitor.log
//
// and runc keeps its state under runc/ so berth never sees other runtimes'
// containers. A per-task monitor process (see monitor.go) is the container's
// parent, so the agent can restart without the workload noticing.
package ctrdriver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
)

// Name is the isolation ctrdriver provides.
const Name = "container"

// handleVersion is the version of handleState; bump it when the layout changes.
const handleVersion = 1

// Options configure the driver.
type Options struct {
	// Root is the driver's state directory, e.g. /var/lib/berth/containers.
	Root string
	// Runc is the runc binary; default "runc" from PATH.
	Runc string
	// MonitorCmd starts a monitor; the task directory is appended. Default:
	// this executable with the argument "monitor" (`berth monitor DIR`).
	MonitorCmd []string
	// MonitorEnv is the monitor's environment (default: none but PATH).
	MonitorEnv []string
	// LogMaxBytes caps each of a task's stdout and stderr logs; 0 means 64 MiB.
	LogMaxBytes int64
	Logger      *slog.Logger
}

// Driver is the runc container driver.
type Driver struct {
	opts     Options
	runc     runc
	tasksDir string
	log      *slog.Logger

	mu    sync.Mutex
	tasks map[string]*task
}

var _ driver.Driver = (*Driver)(nil)

// task is the driver's in-memory view of one container.
type task struct {
	id      string
	dir     string
	monitor proc.Ident
	done    chan struct{} // closed once exit is set
	exit    *driver.ExitResult
	started time.Time
	pid     int
}

type handleState struct {
	Dir     string     `json:"dir"`
	Monitor proc.Ident `json:"monitor"`
}

// New prepares the driver's directories. It does not fail when runc is
// missing: Fingerprint reports that.
func New(opts Options) (*Driver, error) {
	if opts.Root == "" {
		return nil, errors.New("ctrdriver: root directory is required")
	}
	if opts.Runc == "" {
		opts.Runc = "runc"
	}
	opts.Runc = findRunc(opts.Runc)
	if len(opts.MonitorCmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("ctrdriver: find own executable for the monitor: %w", err)
		}
		opts.MonitorCmd = []string{exe, "monitor"}
	}
	if opts.MonitorEnv == nil {
		opts.MonitorEnv = []string{"PATH=" + withSbin(os.Getenv("PATH"))}
	}
	if opts.LogMaxBytes == 0 {
		opts.LogMaxBytes = 64 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	d := &Driver{
		opts:     opts,
		runc:     runc{path: opts.Runc, root: filepath.Join(opts.Root, "runc")},
		tasksDir: filepath.Join(opts.Root, "tasks"),
		log:      opts.Logger.With("driver", Name),
		tasks:    map[string]*task{},
	}
	for _, dir := range []string{d.tasksDir, d.runc.root} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("ctrdriver: %w", err)
		}
	}
	return d, nil
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return Name }

// Fingerprint implements driver.Driver.
func (d *Driver) Fingerprint(ctx context.Context) driver.Fingerprint {
	fp := driver.Fingerprint{Details: map[string]string{"cgroup_mode": cgroupMode(), "runc_path": d.runc.path}}
	v, err := d.runc.version(ctx)
	if err != nil {
		fp.Reason = fmt.Sprintf("runc is not usable: %v", err)
		return fp
	}
	fp.Version = v
	fp.Details["runc_version"] = v
	if os.Geteuid() != 0 {
		fp.Reason = "the agent does not run as root; runc containers need root"
		return fp
	}
	if err := checkControllers(); err != nil {
		fp.Reason = err.Error()
		return fp
	}
	fp.Healthy = true
	return fp
}

func (d *Driver) taskDir(id string) string { return filepath.Join(d.tasksDir, id) }

// Start implements driver.Driver.
func (d *Driver) Start(ctx context.Context, cfg *driver.TaskConfig) (h *driver.Handle, err error) {
	if err := validateTask(cfg); err != nil {
		return nil, fmt.Errorf("%w: %w", errdefs.ErrInvalidArgument, err)
	}
	dir := d.taskDir(cfg.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("container task %s: %w", cfg.ID, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("create task dir: %w", err)
	}
	defer func() {
		if err != nil {
			if cerr := d.cleanup(context.WithoutCancel(ctx), cfg.ID); cerr != nil {
				d.log.Warn("clean up after failed start", "task_id", cfg.ID, "err", cerr)
			}
		}
	}()

	bundle := filepath.Join(dir, "bundle")
	rootfs := filepath.Join(bundle, "rootfs")
	if err := mountOverlay(cfg.Image.RootfsDir, filepath.Join(dir, "upper"), filepath.Join(dir, "work"), rootfs); err != nil {
		return nil, err
	}
	uid, gid, err := driver.ResolveUser(rootfs, cfg.User)
	if err != nil {
		return nil, err
	}
	spec := buildSpec(cfg, uid, gid, hasSwapAccounting("/sys/fs/cgroup/memory"))
	if err := writeNetworkFiles(dir, cfg, spec); err != nil {
		return nil, err
	}
	if err := fileutil.WriteJSON(filepath.Join(bundle, "config.json"), spec); err != nil {
		return nil, err
	}
	mcfg := monitorConfig{
		ID: cfg.ID, Runc: d.runc.path, RuncRoot: d.runc.root, Bundle: bundle,
		LogDir: cfg.LogDir, LogMaxBytes: d.opts.LogMaxBytes,
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, monitorConfigFile), mcfg); err != nil {
		return nil, err
	}
	t, err := d.spawnMonitor(ctx, cfg.ID, dir)
	if err != nil {
		return nil, err
	}
	state, _ := json.Marshal(handleState{Dir: dir, Monitor: t.monitor})
	return &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion, State: state}, nil
}

// spawnMonitor starts the task's monitor and waits until it reports the
// container running, or failed to start.
func (d *Driver) spawnMonitor(ctx context.Context, id, dir string) (*task, error) {
	logf, err := os.OpenFile(filepath.Join(dir, "monitor.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer readyR.Close()
	args := append(append([]string(nil), d.opts.MonitorCmd[1:]...), dir)
	cmd := exec.Command(d.opts.MonitorCmd[0], args...)
	cmd.Env = d.opts.MonitorEnv
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{readyW} // fd 3 = readyFD
	// Its own session: the agent's death or its terminal's signals must not
	// reach the monitor.
	cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		readyW.Close()
		return nil, fmt.Errorf("start monitor: %w", err)
	}
	readyW.Close()
	ident, err := proc.Identify(cmd.Process.Pid)
	if err != nil {
		// It died at once; Wait below reaps it and we report from status.json.
		ident = proc.Ident{Pid: cmd.Process.Pid}
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, monitorPidFile), ident); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	t := &task{id: id, dir: dir, monitor: ident, done: make(chan struct{})}
	// The monitor is our child as long as this agent lives: reap it (Wait
	// is the only way), then collect the status it left.
	go func() {
		_ = cmd.Wait()
		d.finish(t)
	}()

	// Block until the monitor says the container runs (or failed): one
	// byte, or EOF when the monitor died first.
	readCh := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = readyR.Read(b[:])
		close(readCh)
	}()
	select {
	case <-readCh:
	case <-ctx.Done():
		_ = d.runc.kill(context.Background(), id, "KILL")
		return nil, ctx.Err()
	}
	st, err := readStatus(dir)
	if err != nil {
		<-t.done
		return nil, fmt.Errorf("monitor ended without a status: %w (see %s)", err, filepath.Join(dir, "monitor.log"))
	}
	if st.State == monFailed {
		<-t.done
		return nil, fmt.Errorf("start container: %s", st.Error)
	}
	t.pid, t.started = st.Pid, st.StartedAt
	d.mu.Lock()
	d.tasks[id] = t
	d.mu.Unlock()
	return t, nil
}

// monitorRecordWait is how long Recover waits for a monitor that may have
// been started just before the agent died to record itself.
const monitorRecordWait = 5 * time.Second

// readMonitorPid reads the monitor's identity. A monitor started just
// before the agent died (a busy node, an agent restarted at once) may not
// have recorded itself yet: give it a moment before concluding that none
// was started.
func (d *Driver) readMonitorPid(ctx context.Context, dir string, ident *proc.Ident) error {
	path := filepath.Join(dir, monitorPidFile)
	deadline := time.Now().Add(monitorRecordWait)
	for {
		err := fileutil.ReadJSON(path, ident)
		if err == nil || !errors.Is(err, os.ErrNotExist) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// awaitStarted waits, at most limit, until the task's monitor has started
// the container or the task has ended.
func (d *Driver) awaitStarted(ctx context.Context, t *task, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for {
		// No status yet: the monitor is still in runc create.
		if st, err := readStatus(t.dir); err == nil && st.State != monCreated {
			return
		}
		select {
		case <-t.done:
			return
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return
		}
	}
}

func readStatus(dir string) (*monitorStatus, error) {
	var st monitorStatus
	if err := fileutil.ReadJSON(filepath.Join(dir, statusFile), &st); err != nil {
		return nil, err
	}
	return &st, nil
}

// finish runs once the monitor is gone: it turns the monitor's status file
// into the task's exit result.
func (d *Driver) finish(t *task) {
	st, err := readStatus(t.dir)
	res := &driver.ExitResult{FinishedAt: time.Now().UTC(), ExitCode: -1}
	switch {
	case err != nil:
		res.Err = fmt.Sprintf("monitor exited without recording a status: %v", err)
	case st.State == monExited || st.State == monFailed:
		res.ExitCode, res.Signal, res.OOMKilled, res.Err = st.ExitCode, st.Signal, st.OOMKilled, st.Error
		if !st.FinishedAt.IsZero() {
			res.FinishedAt = st.FinishedAt
		}
	default:
		// The monitor died while the container ran (someone killed it):
		// nobody can collect the real status any more. Do not leave an
		// unsupervised container behind.
		res.Err = "the container's monitor died before the container exited; berth killed the container"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := d.runc.kill(ctx, t.id, "KILL"); err != nil {
			d.log.Debug("kill orphaned container", "task_id", t.id, "err", err)
		}
		_ = d.runc.delete(ctx, t.id)
		cancel()
	}
	// The container is gone: its root filesystem need not stay mounted
	// until the workload is deleted (the writable layer stays on disk).
	if err := unmountAll(filepath.Join(t.dir, "bundle", "rootfs")); err != nil {
		d.log.Warn("unmount the root filesystem of an ended container", "task_id", t.id, "err", err)
	}
	t.exit = res
	close(t.done)
}

func (d *Driver) get(id string) (*task, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t, ok := d.tasks[id]
	if !ok {
		return nil, fmt.Errorf("container task %s: %w", id, errdefs.ErrNotFound)
	}
	return t, nil
}

// Wait implements driver.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
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

// Stop implements driver.Driver.
func (d *Driver) Stop(ctx context.Context, id string, timeout time.Duration) error {
	t, err := d.get(id)
	if err != nil {
		return err
	}
	// A task recovered while its monitor was still starting it may be
	// created but not started: a signal now would kill runc's init and
	// fail the start instead of stopping a workload. Let the start finish
	// (it is quick) so the workload sees its SIGTERM like any other.
	// The grace period is for the workload, not for runc: a start on a busy
	// node may take longer than it.
	d.awaitStarted(ctx, t, max(timeout, 30*time.Second))
	if d.signal(ctx, t, "TERM") {
		return nil
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-t.done:
		return nil
	case <-timer.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	d.log.Info("stop timeout reached; killing", "task_id", id, "timeout", timeout)
	if d.signal(ctx, t, "KILL") {
		return nil
	}
	select {
	case <-t.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// signal sends sig to the container's init; it reports true when the task
// has already exited.
func (d *Driver) signal(ctx context.Context, t *task, sig string) (exited bool) {
	select {
	case <-t.done:
		return true
	default:
	}
	if err := d.runc.kill(ctx, t.id, sig); err != nil {
		// Racing with the exit is normal; anything else is worth a line.
		select {
		case <-t.done:
			return true
		default:
			d.log.Warn("signal container", "task_id", t.id, "signal", sig, "err", err)
		}
	}
	return false
}

// Destroy implements driver.Driver.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	t, err := d.get(id)
	if err != nil {
		// Not attached (the agent restarted and is cleaning up before or
		// instead of recovering it): attach now, so a live container is
		// killed and its monitor waited for before its files go.
		if rerr := d.Recover(ctx, &driver.Handle{ID: id, Driver: Name}); rerr == nil {
			t, err = d.get(id)
		}
	}
	if err == nil {
		select {
		case <-t.done:
		default:
			// Repeat the kill: a monitor that is still starting the
			// container has nothing to kill yet at the first try.
			tick := time.NewTicker(250 * time.Millisecond)
			defer tick.Stop()
			giveUp := time.After(10 * time.Second)
		wait:
			for {
				_ = d.runc.kill(ctx, id, "KILL")
				select {
				case <-t.done:
					break wait
				case <-tick.C:
				case <-giveUp:
					d.log.Warn("container did not exit after SIGKILL; removing anyway", "task_id", id)
					break wait
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		}
	}
	if err := d.cleanup(ctx, id); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.tasks, id)
	d.mu.Unlock()
	return nil
}

// cleanup removes every resource of a task: runc state, cgroup, overlay
// mount, task directory. It is idempotent.
func (d *Driver) cleanup(ctx context.Context, id string) error {
	var errs []error
	if err := d.runc.delete(ctx, id); err != nil {
		errs = append(errs, err)
	}
	dir := d.taskDir(id)
	if err := unmountAll(filepath.Join(dir, "bundle", "rootfs")); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove task dir: %w", err))
	}
	if cgroupExists(id) {
		errs = append(errs, fmt.Errorf("cgroup %s still exists after runc delete", cgroupPath(id)))
	}
	return errors.Join(errs...)
}

// Inspect implements driver.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	st := &driver.TaskStatus{ID: id, State: driver.TaskRunning, Pid: t.pid, StartedAt: t.started}
	select {
	case <-t.done:
		st.State, st.Exit = driver.TaskExited, t.exit
	default:
	}
	return st, nil
}

// Stats implements driver.Driver.
func (d *Driver) Stats(ctx context.Context, id string) (*driver.Stats, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return nil, fmt.Errorf("container task %s has exited: %w", id, errdefs.ErrFailedPrecondition)
	default:
	}
	st, err := readStats(id)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("container task %s has no cgroup (it is exiting): %w", id, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("read cgroup stats of %s: %w", id, err)
	}
	return st, nil
}

// Recover implements driver.Driver. The task directory is the source of
// truth; the handle's state is only a cross-check.
func (d *Driver) Recover(ctx context.Context, h *driver.Handle) error {
	if h.Driver != "" && h.Driver != Name {
		return fmt.Errorf("handle of driver %q given to %s: %w", h.Driver, Name, errdefs.ErrInvalidArgument)
	}
	if h.Version > handleVersion {
		return fmt.Errorf("handle version %d is newer than this agent's %d: %w", h.Version, handleVersion, errdefs.ErrFailedPrecondition)
	}
	d.mu.Lock()
	_, known := d.tasks[h.ID]
	d.mu.Unlock()
	if known {
		return nil
	}
	dir := d.taskDir(h.ID)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("container task %s: %w", h.ID, errdefs.ErrNotFound)
	}
	t := &task{id: h.ID, dir: dir, done: make(chan struct{})}
	if err := d.readMonitorPid(ctx, dir, &t.monitor); err != nil {
		// The agent died between creating the directory and starting the
		// monitor (which records itself first thing): the task never ran.
		// Remove what there is, so it can be started afresh.
		if cerr := d.cleanup(ctx, h.ID); cerr != nil {
			return fmt.Errorf("container task %s never started; removing its remains: %w", h.ID, cerr)
		}
		return fmt.Errorf("container task %s never started: %w", h.ID, errdefs.ErrNotFound)
	}
	if st, err := readStatus(dir); err == nil {
		t.pid, t.started = st.Pid, st.StartedAt
	}
	exited, err := proc.Watch(t.monitor)
	if err != nil {
		d.finish(t) // the monitor is gone: its status file has the end
	} else {
		go func() {
			<-exited
			d.finish(t)
		}()
	}
	d.mu.Lock()
	d.tasks[h.ID] = t
	d.mu.Unlock()
	return nil
}

// List implements driver.Driver.
func (d *Driver) List(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.tasksDir)
	if err != nil {
		return nil, fmt.Errorf("list container tasks: %w", err)
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.IsDir() {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// sbinDirs hold runc on Debian (/usr/sbin/runc) but are often missing from
// the PATH of a login shell that is not root's.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// findRunc resolves a bare runc name through PATH and then the sbin
// directories; a path or an unresolvable name is returned as given, and
// Fingerprint reports it unusable.
func findRunc(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if strings.ContainsRune(name, '/') {
		return name
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}

// withSbin appends the sbin directories PATH lacks.
func withSbin(path string) string {
	have := map[string]bool{}
	for _, dir := range filepath.SplitList(path) {
		have[dir] = true
	}
	for _, dir := range sbinDirs {
		if !have[dir] {
			if path != "" {
				path += string(filepath.ListSeparator)
			}
			path += dir
		}
	}
	return path
}

// Close implements driver.Driver. The driver holds no connection: tasks
// belong to their monitors and keep running.
func (d *Driver) Close(ctx context.Context) error { return nil }
