package vmdriver

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/supervisor/monitor"
	"golang.org/x/sys/unix"
)

// spawnMonitor writes the task's monitor config and starts its monitor,
// which connects to the VM's ports. The returned end comes when the
// monitor exits.
func (d *Driver) spawnMonitor(ctx context.Context, t *task) (*supervisor.Ended, error) {
	st := t.Data
	pc := &monitor.PortsConfig{
		QEMU:    st.QEMU,
		Sockets: map[string]string{},
		Outputs: map[string]string{
			guest.StdoutPort: filepath.Join(st.LogDir, driver.StdoutLog),
			guest.StderrPort: filepath.Join(st.LogDir, driver.StderrLog),
			guest.StatusPort: filepath.Join(t.Dir, statusLog),
		},
		Durable:         []string{guest.StatusPort},
		DurableMaxBytes: d.opts.StatusMaxBytes,
	}
	for port, sock := range portSockets {
		pc.Sockets[port] = filepath.Join(t.Dir, sock)
	}
	if st.WholeDisk != "" {
		// One port: the serial console is the task's stdout.
		pc.Sockets = map[string]string{consolePort: filepath.Join(t.Dir, consoleSocket)}
		pc.Outputs = map[string]string{consolePort: filepath.Join(st.LogDir, driver.StdoutLog)}
		pc.Durable = nil
	}
	// A previous monitor's verdict must not be read as this one's.
	_ = os.Remove(filepath.Join(t.Dir, monitor.StatusFile))
	_ = os.Remove(filepath.Join(t.Dir, legacyMonitorDoneFile))
	if err := d.sup.WriteConfig(t, monitor.Config{LogMaxBytes: cmp.Or(st.LogMaxBytes, d.opts.LogMaxBytes), LogMaxFiles: st.LogMaxFiles, Ports: pc}); err != nil {
		return nil, err
	}
	return d.sup.Spawn(ctx, t)
}

// legacyMonitorDoneFile is where monitors of protocol version 1 (started
// by an older agent) recorded that they had drained the VM's ports.
const legacyMonitorDoneFile = "monitor-done.json"

// monitorResult is what a monitor recorded at its end.
type monitorResult struct {
	FinishedAt time.Time `json:"finished_at"`
	Error      string    `json:"error,omitempty"`
	GuestFault bool      `json:"-"`
}

// readMonitorResult reads the monitor's end: its status (this protocol) or
// a version 1 monitor's monitor-done.json. ok is false while it runs.
func readMonitorResult(dir string) (res monitorResult, ok bool) {
	if st, err := supervisor.Status(dir); err == nil {
		if st.State != monitor.StateExited && st.State != monitor.StateFailed {
			return res, false
		}
		return monitorResult{FinishedAt: st.FinishedAt, Error: st.Error, GuestFault: st.GuestFault}, true
	}
	if err := fileutil.ReadJSON(filepath.Join(dir, legacyMonitorDoneFile), &res); err != nil {
		return res, false
	}
	return res, true
}

// vmAlive reports whether the task's QEMU still runs: by its process
// identity when known, else by asking libvirt.
func (d *Driver) vmAlive(t *task) bool {
	if t.Data.QEMU.Pid != 0 {
		return t.Data.QEMU.Alive()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alive, err := d.domainAlive(ctx, t.ID)
	if err != nil {
		d.log.Warn("cannot tell whether the VM runs", "task_id", t.ID, "err", err)
		return true // keep supervising rather than report a wrong end
	}
	return alive
}

// supervise follows a task's monitor until the VM has ended and its
// result is on disk. A monitor that dies while the VM runs (killed by
// someone) is replaced: the guest's writes wait for the new one.
func (d *Driver) supervise(t *task, exited *supervisor.Ended) {
	for respawns := 0; ; respawns++ {
		<-exited.Done()
		res, finished := readMonitorResult(t.Dir)
		if finished && res.Error == "" || !d.vmAlive(t) {
			d.finish(t)
			return
		}
		reason := "the VM's monitor died while the VM ran"
		if finished {
			reason = "the VM's monitor failed: " + res.Error
		}
		if respawns >= maxMonitorRespawns {
			d.forceOff(t, reason+"; berth forced the VM off")
			return
		}
		d.log.Warn(reason+"; starting a new one", "task_id", t.ID)
		ctx, cancel := context.WithTimeout(context.Background(), monitorStartTimeout)
		next, err := d.spawnMonitor(ctx, t)
		if err == nil && t.Data.WholeDisk != "" {
			// A whole-disk guest waits paused for its console's reader
			// when the agent died between creating and resuming it.
			err = d.resume(ctx, t.ID)
		}
		cancel()
		if err != nil {
			d.forceOff(t, fmt.Sprintf("%s and a new monitor could not start (%v); berth forced the VM off", reason, err))
			return
		}
		exited = next
	}
}

// monitorStartTimeout bounds a monitor's start: it connects to QEMU's
// sockets within 30 s or gives up.
const monitorStartTimeout = 35 * time.Second

// forceOff ends a VM nobody can follow any more and records why.
func (d *Driver) forceOff(t *task, reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.destroyDomain(ctx, t.ID); err != nil {
		d.log.Error("force off unsupervised VM", "task_id", t.ID, "err", err)
	}
	t.Finish(&driver.ExitResult{ExitCode: -1, Err: reason, FinishedAt: time.Now().UTC()})
}

// finish turns what the VM left on disk into the task's exit result: the
// guest's last status record, or berth's own forced stop, or a crash, or
// the monitor's verdict on a guest that misbehaved.
func (d *Driver) finish(t *task) {
	var res *driver.ExitResult
	if t.Data.WholeDisk != "" {
		res = wholeDiskExitResult(t.Dir)
	} else {
		res = exitResult(t.Dir)
	}
	if mr, ok := readMonitorResult(t.Dir); ok && mr.GuestFault {
		res.ExitCode, res.Signal, res.Err = -1, 0, mr.Error
	}
	t.Finish(res)
}

// wholeDiskExitResult is how a whole-disk guest ended: nothing in it
// reports a result, so it is 0 when the guest powered itself off (or
// reset, which ends the domain too) and 137 when berth forced it off.
func wholeDiskExitResult(dir string) *driver.ExitResult {
	res := &driver.ExitResult{FinishedAt: monitorFinishedAt(dir)}
	if _, err := os.Stat(filepath.Join(dir, killedFile)); err == nil {
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	}
	return res
}

// monitorFinishedAt is when the monitor saw the VM end, or now.
func monitorFinishedAt(dir string) time.Time {
	if mr, ok := readMonitorResult(dir); ok && !mr.FinishedAt.IsZero() {
		return mr.FinishedAt
	}
	return time.Now().UTC()
}

func exitResult(dir string) *driver.ExitResult {
	res := &driver.ExitResult{FinishedAt: monitorFinishedAt(dir)}
	var last *guest.Status
	var err error
	if f, ferr := os.Open(filepath.Join(dir, statusLog)); ferr == nil {
		last, _, err = guest.ReadLastStatus(f)
		f.Close()
	} else {
		err = fmt.Errorf("%w: no status channel output (%v)", guest.ErrNoResult, ferr)
	}
	_, killedErr := os.Stat(filepath.Join(dir, killedFile))
	switch {
	case err == nil:
		res.ExitCode, res.Signal = last.ExitCode, last.Signal
		if last.Event == guest.EventError {
			res.Err = last.Message
		}
	case killedErr == nil:
		// berth forced the VM off after the grace period: the workload was
		// killed as a container's would be by SIGKILL.
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	default:
		res.ExitCode = -1
		res.Err = fmt.Sprintf("the VM ended without reporting the workload's result (%v); end of its console:\n%s",
			err, tail(filepath.Join(dir, consoleLog), consoleTail))
	}
	return res
}

// tail returns up to n bytes from the end of a file.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err.Error()
	}
	off := max(fi.Size()-n, 0)
	buf := make([]byte, fi.Size()-off)
	nr, _ := f.ReadAt(buf, off)
	return string(buf[:nr])
}
