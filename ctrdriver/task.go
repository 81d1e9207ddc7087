package ctrdriver

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/supervisor/monitor"
)

// runcTimeout bounds the runc calls the driver itself makes (kill, delete):
// a hung runc must not wedge a stop or a delete.
const runcTimeout = 10 * time.Second

// Start implements driver.Driver.
func (d *Driver) Start(ctx context.Context, cfg *driver.TaskConfig) (h *driver.Handle, err error) {
	if err := validateTask(cfg); err != nil {
		return nil, fmt.Errorf("container task: %w: %w", err, errdefs.ErrInvalidArgument)
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
	rootfs, ids, err := d.mountRootfs(ctx, cfg, dir)
	if err != nil {
		return nil, err
	}
	uid, gid, err := driver.ResolveUser(rootfs, cfg.User)
	if err != nil {
		return nil, err
	}
	spec := buildSpec(cfg, uid, gid, hasSwapAccounting("/sys/fs/cgroup/memory"))
	d.seccomp.apply(spec)
	if err := setupUserNS(spec, cfg, dir, rootfs, ids); err != nil {
		return nil, err
	}
	if err := addVolumes(spec, cfg, ids, d.userns.pool, filepath.Dir(rootfs)); err != nil {
		return nil, err
	}
	if err := writeNetworkFiles(dir, cfg, spec); err != nil {
		return nil, err
	}
	if err := fileutil.ReplaceJSON(filepath.Join(bundle, "config.json"), spec); err != nil {
		return nil, err
	}
	t := d.sup.NewTask(cfg.ID, dir, struct{}{})
	err = d.sup.WriteConfig(t, monitor.Config{
		LogMaxBytes: cmp.Or(cfg.Logs.MaxBytes, d.opts.LogMaxBytes),
		LogMaxFiles: cfg.Logs.MaxFiles,
		Runc: &monitor.RuncConfig{
			Runc: d.runc.path, RuncRoot: d.runc.root, Bundle: bundle, LogDir: cfg.LogDir,
			StartTimeout: d.opts.StartTimeout, Cgroup: cgroupPath(cfg.ID),
			Stdin: cfg.Stdin, TTY: cfg.TTY, Entry: EntryOf(spec),
		},
	})
	if err != nil {
		return nil, err
	}
	if err := cfg.RunCommit(); err != nil {
		return nil, err
	}
	exited, err := d.sup.Spawn(ctx, t)
	if err != nil {
		return nil, err
	}
	st, err := supervisor.Status(dir)
	if err != nil {
		<-exited.Done()
		return nil, fmt.Errorf("monitor ended without a status: %w (see %s)", err, filepath.Join(dir, monitor.LogFile))
	}
	if st.State == monitor.StateFailed {
		<-exited.Done()
		return nil, fmt.Errorf("start container: %s", st.Error)
	}
	t.SetRunning(st.Pid, st.StartedAt)
	if err := d.sup.Register(t); err != nil {
		return nil, err
	}
	exited.Then(func() { d.finish(t) })
	return &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}, nil
}

// finish turns the monitor's status into the task's exit result, once its
// monitor says the task's end is recorded (or is gone).
func (d *Driver) finish(t *task) {
	st, err := supervisor.Status(t.Dir)
	res := &driver.ExitResult{FinishedAt: time.Now().UTC(), ExitCode: -1}
	switch {
	case err != nil:
		res.Err = fmt.Sprintf("monitor exited without recording a status: %v", err)
	case st.State == monitor.StateExited || st.State == monitor.StateFailed:
		res.ExitCode, res.Signal, res.OOMKilled, res.Err = st.ExitCode, st.Signal, st.OOMKilled, st.Error
		if !st.FinishedAt.IsZero() {
			res.FinishedAt = st.FinishedAt
		}
	default:
		// The monitor died while the container ran (someone killed it):
		// nobody can collect the real status any more. Do not leave an
		// unsupervised container behind.
		res.Err = "the container's monitor died before the container exited; berth killed the container"
		ctx, cancel := context.WithTimeout(context.Background(), runcTimeout)
		if err := d.runc.kill(ctx, t.ID, "KILL"); err != nil {
			d.log.Debug("kill orphaned container", "task_id", t.ID, "err", err)
		}
		_ = d.runc.delete(ctx, t.ID)
		cancel()
	}
	// The container is gone: its root filesystem need not stay mounted
	// until the workload is deleted (the writable layer stays on disk).
	// The end is reported first: the unmount (the writable layer's own
	// filesystem written back, its loop device let go: some milliseconds)
	// is nothing its waiter needs, and a Destroy waits for it.
	unmounted := make(chan struct{})
	d.unmounts.Store(t.ID, unmounted)
	t.Finish(res)
	if err := d.unmountRootfs(t.Dir); err != nil {
		d.log.Warn("unmount the root filesystem of an ended container", "task_id", t.ID, "err", err)
	}
	d.unmounts.CompareAndDelete(t.ID, unmounted)
	close(unmounted)
}

// awaitUnmount waits until the unmount that followed the end of task id,
// if one still runs, is done.
func (d *Driver) awaitUnmount(ctx context.Context, id string) error {
	v, ok := d.unmounts.Load(id)
	if !ok {
		return nil
	}
	select {
	case <-v.(chan struct{}):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Wait implements driver.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	return d.sup.Wait(ctx, id)
}

// Ended implements driver.Driver.
func (d *Driver) Ended(id string) (<-chan struct{}, error) { return d.sup.Ended(id) }

// Inspect implements driver.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	return d.sup.Inspect(id)
}

// Stop implements driver.Driver: the monitor sends SIGTERM, and SIGKILL
// once timeout has passed, whether or not anyone still waits.
func (d *Driver) Stop(ctx context.Context, id string, timeout time.Duration) error {
	t, err := d.sup.Get(id)
	if err != nil {
		return err
	}
	return d.sup.Stop(ctx, t, timeout, ender{d: d, id: id})
}

// ender signals a container through runc, for monitors of protocol
// version 1 that do not enforce stop deadlines themselves.
type ender struct {
	d  *Driver
	id string
}

func (e ender) Term(ctx context.Context) error { return e.d.runc.kill(ctx, e.id, "TERM") }
func (e ender) Kill(ctx context.Context) error { return e.d.runc.kill(ctx, e.id, "KILL") }

// Destroy implements driver.Driver.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := driver.CheckID(id); err != nil {
		return err
	}
	if t, err := d.sup.Attached(ctx, id, d.Recover); err == nil {
		if err := d.sup.Kill(ctx, t, ender{d: d, id: id}); err != nil {
			return err
		}
		select {
		case <-t.Done():
		case <-time.After(runcTimeout):
			d.log.Warn("container end not recorded before removal", "task_id", id)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := d.cleanup(ctx, id); err != nil {
		return err
	}
	d.sup.Forget(id)
	return nil
}

// cleanup removes every resource of a task: runc state, cgroup, overlay
// mount, task directory. It is idempotent.
func (d *Driver) cleanup(ctx context.Context, id string) error {
	if err := d.awaitUnmount(ctx, id); err != nil {
		return err
	}
	var errs []error
	rctx, cancel := context.WithTimeout(ctx, runcTimeout)
	if err := d.runc.delete(rctx, id); err != nil {
		errs = append(errs, err)
	} else if err := d.runc.removeLeftovers(id); err != nil {
		errs = append(errs, err)
	}
	cancel()
	dir := d.taskDir(id)
	if err := d.releaseRootfs(dir); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(d.layerDir(id)); err != nil {
		errs = append(errs, fmt.Errorf("remove the writable layer: %w", err))
	}
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove task dir: %w", err))
	}
	removeCgroup(id)
	if cgroupExists(id) {
		errs = append(errs, fmt.Errorf("cgroup %s still exists after runc delete (it still has processes?)", cgroupPath(id)))
	}
	return errors.Join(errs...)
}

// Recover implements driver.Driver. The task directory is the only truth:
// its monitor's records say whether the container runs, ended, or belongs
// to an earlier boot.
func (d *Driver) Recover(ctx context.Context, h *driver.Handle) error {
	dir, known, err := d.sup.Adopt(h, Name, handleVersion, d.taskDir)
	if known || err != nil {
		return err
	}
	d.sweepExecDirs(dir)
	t := d.sup.NewTask(h.ID, dir, struct{}{})
	exited, err := d.sup.Attach(ctx, t)
	if errors.Is(err, driver.ErrRebooted) || errors.Is(err, errdefs.ErrNotFound) {
		// Nothing of it runs: remove what is left, so it can be started
		// afresh (or reported ended).
		if cerr := d.cleanup(ctx, h.ID); cerr != nil {
			return fmt.Errorf("%w; removing its remains: %w", err, cerr)
		}
		return err
	}
	if err != nil {
		return err
	}
	if st, err := supervisor.Status(dir); err == nil {
		t.SetRunning(st.Pid, st.StartedAt)
	}
	if err := d.sup.Register(t); err != nil {
		return nil // recovered concurrently
	}
	exited.Then(func() { d.finish(t) })
	d.sup.ResumeStop(t, ender{d: d, id: h.ID})
	return nil
}
