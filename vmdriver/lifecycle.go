package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor"
	"libvirt.org/go/libvirt"
)

// Wait implements driver.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	return d.sup.Wait(ctx, id)
}

// Ended implements driver.Driver.
func (d *Driver) Ended(id string) (<-chan struct{}, error) { return d.sup.Ended(id) }

// Stop implements driver.Driver: the ACPI power button, which berth-init
// turns into SIGTERM for the workload, pressed again every few seconds;
// after timeout the domain is destroyed and the workload reported killed
// (137). The deadline is persisted with the task and enforced by the
// supervisor whether or not the caller waits, and after a restart.
func (d *Driver) Stop(ctx context.Context, id string, timeout time.Duration) error {
	t, err := d.sup.Get(id)
	if err != nil {
		return err
	}
	return d.sup.Stop(ctx, t, timeout, ender{d: d, t: t})
}

// ender ends a VM for the supervisor: politely by its power button, by
// force through libvirt.
type ender struct {
	d *Driver
	t *task
}

func (e ender) Term(ctx context.Context) error { return e.d.pressPowerButton(ctx, e.t.ID) }

// Kill forces the VM off. The marker is written first, so the result is
// 137 whoever reads it, even an agent restarted after dying right here.
func (e ender) Kill(ctx context.Context) error {
	if err := os.WriteFile(filepath.Join(e.t.Dir, killedFile), nil, 0o600); err != nil {
		return fmt.Errorf("record forced stop: %w", err)
	}
	return e.d.destroyDomain(ctx, e.t.ID)
}

func (d *Driver) pressPowerButton(ctx context.Context, id string) error {
	return d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil || dom == nil {
			return err
		}
		defer dom.Free()
		if err := dom.ShutdownFlags(libvirt.DOMAIN_SHUTDOWN_ACPI_POWER_BTN); err != nil && !isNotRunning(err) {
			return lvError(err)
		}
		return nil
	})
}

// monitorDrainWait bounds the wait for a monitor draining the ports of a
// VM that has ended.
const monitorDrainWait = 6 * time.Second

// Destroy implements driver.Driver.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := driver.CheckID(id); err != nil {
		return err
	}
	if t, err := d.sup.Attached(ctx, id, d.Recover); err == nil {
		kctx, cancel := context.WithTimeout(ctx, destroyWait)
		err := d.sup.Kill(kctx, t, ender{d: d, t: t})
		cancel()
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			d.log.Warn("VM end not recorded before removal", "task_id", id, "err", err)
		}
	}
	if err := d.cleanup(ctx, id, true); err != nil {
		return err
	}
	d.sup.Forget(id)
	return nil
}

// cleanup removes every resource of a task: its domain (if any), its
// monitor (if still there), its task directory with the disks, sockets,
// console and status logs. The stdout and stderr logs are in the agent's
// log dir and the agent's to remove. It is idempotent. withDomain false
// skips libvirt, for a start that failed before it created the domain.
func (d *Driver) cleanup(ctx context.Context, id string, withDomain bool) error {
	if withDomain {
		if err := d.destroyDomain(ctx, id); err != nil {
			return fmt.Errorf("vm task %s: %w", id, err)
		}
	}
	dir := d.taskDir(id)
	// QEMU is gone, so a monitor still there is draining and about to
	// leave; one that does not is killed.
	supervisor.EndMonitor(dir, monitorDrainWait)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove task dir: %w", err)
	}
	return nil
}

// Inspect implements driver.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	return d.sup.Inspect(id)
}

// Stats implements driver.Driver: the VM's CPU time, QEMU's resident
// memory (what the VM costs the host: guest pages touched plus QEMU's own,
// so it can exceed the limit) and the VM's RAM size as the limit. Without a
// balloon device the host cannot see the guest's own accounting.
func (d *Driver) Stats(ctx context.Context, id string) (*driver.Stats, error) {
	t, err := d.sup.Get(id)
	if err != nil {
		return nil, err
	}
	if t.Exited() {
		return nil, fmt.Errorf("vm task %s has exited: %w", id, errdefs.ErrFailedPrecondition)
	}
	st, err := call(ctx, d.hv, func(c *libvirt.Connect) (driver.Stats, error) {
		var st driver.Stats
		dom, err := d.lookup(c, id)
		if err != nil {
			return st, err
		}
		if dom == nil {
			return st, fmt.Errorf("vm task %s has no domain (it is exiting): %w", id, errdefs.ErrFailedPrecondition)
		}
		defer dom.Free()
		info, err := dom.GetInfo()
		if err != nil {
			return st, err
		}
		st.CPUUsageNanos = info.CpuTime
		st.MemoryLimit = info.MaxMem * 1024
		mem, err := dom.MemoryStats(uint32(libvirt.DOMAIN_MEMORY_STAT_NR), 0)
		if err != nil {
			return st, err
		}
		for _, m := range mem {
			if m.Tag == int32(libvirt.DOMAIN_MEMORY_STAT_RSS) {
				st.MemoryBytes = m.Val * 1024
				st.MemoryWorkingSetBytes = st.MemoryBytes
			}
		}
		return st, nil
	})
	if err != nil {
		if isNotRunning(err) {
			return nil, fmt.Errorf("vm task %s is exiting: %w", id, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("stats of vm task %s: %w", id, lvError(err))
	}
	return &st, nil
}

// Recover implements driver.Driver. The task directory is the only truth:
// task.json says which domain and logs are the task's, the monitor's
// records whether it still runs.
func (d *Driver) Recover(ctx context.Context, h *driver.Handle) error {
	dir, known, err := d.sup.Adopt(h, Name, handleVersion, d.taskDir)
	if known || err != nil {
		return err
	}
	// gone removes what a task that does not run left, so it can be
	// started afresh (or reported ended), and returns why.
	gone := func(why error, withDomain bool) error {
		if err := d.cleanup(ctx, h.ID, withDomain); err != nil {
			return fmt.Errorf("%w; removing its remains: %w", why, err)
		}
		return why
	}
	var st taskState
	if err := fileutil.ReadJSON(filepath.Join(dir, taskStateFile), &st); err != nil {
		// Died before the domain was defined: the task never ran.
		return gone(fmt.Errorf("vm task %s was never started: %w", h.ID, errdefs.ErrNotFound), false)
	}
	if err := d.sup.CheckBoot(dir); err != nil {
		return gone(err, true)
	}
	if st.BootID != "" && st.BootID != d.sup.BootID() {
		return gone(fmt.Errorf("vm task %s was started in boot %s: %w", h.ID, st.BootID, driver.ErrRebooted), true)
	}
	if st.QEMU.Pid == 0 {
		// Died between writing task.json and recording QEMU's pid.
		alive, err := d.domainAlive(ctx, h.ID)
		if err != nil {
			return fmt.Errorf("recover vm task %s: %w", h.ID, err)
		}
		if !alive && st.StartedAt.IsZero() {
			// ... before the domain was created: it never ran.
			return gone(fmt.Errorf("vm task %s was never started: %w", h.ID, errdefs.ErrNotFound), false)
		}
		if alive {
			if pid, err := findQEMU(st.Domain); err == nil {
				st.QEMU, _ = proc.Identify(pid)
			}
			if st.StartedAt.IsZero() {
				st.StartedAt = time.Now().UTC()
			}
			_ = fileutil.WriteJSON(filepath.Join(dir, taskStateFile), st)
		}
	}
	t := d.sup.NewTask(h.ID, dir, st)
	t.SetRunning(st.QEMU.Pid, st.StartedAt)
	exited, err := d.sup.Attach(ctx, t)
	switch {
	case errors.Is(err, driver.ErrRebooted):
		return gone(err, true)
	case err != nil && ctx.Err() != nil:
		return err
	case err != nil:
		// No monitor: the VM ended meanwhile (its result is on disk), or
		// the monitor was never started or died; supervise decides.
		exited = supervisor.EndedAlready()
	}
	if err := d.sup.Register(t); err != nil {
		return nil // recovered concurrently
	}
	go d.supervise(t, exited)
	d.sup.ResumeStop(t, ender{d: d, t: t})
	return nil
}

// List implements driver.Driver: every task with a directory, and every
// running domain of this driver (one whose directory is gone would
// otherwise leak unseen).
func (d *Driver) List(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.tasksDir)
	if err != nil {
		return nil, fmt.Errorf("list vm tasks: %w", err)
	}
	seen := map[string]bool{}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && driver.CheckID(e.Name()) == nil {
			seen[e.Name()] = true
			ids = append(ids, e.Name())
		}
	}
	doms, err := d.ownedDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("list vm tasks: %w", lvError(err))
	}
	for _, id := range doms {
		if !seen[id] {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
