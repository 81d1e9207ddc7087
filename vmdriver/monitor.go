package vmdriver

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
)

// The monitor is a small per-VM process, the VM counterpart of ctrdriver's
// monitor: it connects to the unix sockets behind the guest's three
// virtio-serial ports and appends what arrives to the task's log files and
// status file, until QEMU ends. It runs in its own session, so the agent
// can be SIGKILLed and restarted while the VM runs: output keeps landing in
// the logs and the guest's exit record on disk, and the restarted agent
// only has to read them.
//
// Why sockets and a monitor rather than libvirt <channel type='file'>:
// with libvirt's default stdio_handler "logd", file chardevs are written by
// virtlogd, which rotates them at 2 MiB (renaming stdout.log to
// stdout.log.0 and keeping 3 backups). A log the agent tails must be one
// complete, growing file, and changing qemu.conf or virtlogd.conf is the
// operator's business, not berth's. A virtio-serial port whose socket has
// no client is "closed" for the guest: its writes wait (they are not
// dropped) until a monitor connects, so a respawned monitor loses nothing
// the guest had not yet written.

// monitorConfig is what the driver hands the monitor, as monitor.json in
// the task directory.
type monitorConfig struct {
	ID string `json:"id"`
	// Sockets by guest port name (guest.StdoutPort, ...).
	Sockets map[string]string `json:"sockets"`
	// Outputs by guest port name: where each port's bytes are appended.
	Outputs     map[string]string `json:"outputs"`
	QEMU        proc.Ident        `json:"qemu"`
	LogMaxBytes int64             `json:"log_max_bytes"`
	// Durable names the ports whose output is synced on every write and
	// never capped (the status port); the others are logs capped at
	// LogMaxBytes.
	Durable []string `json:"durable,omitempty"`
}

// monitorResult is written as monitor-done.json when the monitor saw QEMU
// end and drained every port: from then on the status file is final.
type monitorResult struct {
	FinishedAt time.Time `json:"finished_at"`
	Error      string    `json:"error,omitempty"`
}

const (
	monitorConfigFile = "monitor.json"
	monitorPidFile    = "monitor.pid"
	monitorDoneFile   = "monitor-done.json"
	monitorLogFile    = "monitor.log"
	// readyFD is the pipe (ExtraFiles[0]) on which the monitor tells the
	// driver that every port is connected (or that it gave up).
	readyFD = 3
	// connectTimeout bounds the monitor's attempts to reach QEMU's sockets
	// while QEMU lives.
	connectTimeout = 30 * time.Second
	// drainTimeout bounds how long the monitor waits for a port's EOF after
	// QEMU exited (the kernel closes its sockets at once; this only guards
	// against a leaked descriptor somewhere else).
	drainTimeout = 5 * time.Second
)

// RunMonitor is the monitor's main function; dir is the task directory. It
// returns the process exit code. cmd/berth runs it as `berth vm-monitor DIR`.
func RunMonitor(dir string) int {
	signal.Ignore(unix.SIGHUP, unix.SIGINT, unix.SIGPIPE)
	ready := os.NewFile(readyFD, "ready")
	if err := monitor(dir, ready); err != nil {
		fmt.Fprintf(os.Stderr, "berth vm monitor %s: %v\n", dir, err)
		return 1
	}
	return 0
}

func monitor(dir string, ready *os.File) error {
	var cfg monitorConfig
	if err := fileutil.ReadJSON(filepath.Join(dir, monitorConfigFile), &cfg); err != nil {
		signalReady(ready)
		return err
	}
	finish := func(err error) error {
		res := monitorResult{FinishedAt: time.Now().UTC()}
		if err != nil {
			res.Error = err.Error()
		}
		werr := fileutil.WriteJSON(filepath.Join(dir, monitorDoneFile), res)
		signalReady(ready)
		return errors.Join(err, werr)
	}

	// Every port in the config: berth-init's three, or a whole-disk
	// guest's serial console.
	ports := slices.Sorted(maps.Keys(cfg.Sockets))
	conns := make([]net.Conn, 0, len(ports))
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for _, port := range ports {
		c, err := dialPort(cfg.Sockets[port], cfg.QEMU)
		if err != nil {
			if errors.Is(err, errQEMUGone) {
				// The VM ended before we could attach; whatever it wrote
				// before is lost to nobody (its writes waited for us).
				return finish(nil)
			}
			return finish(fmt.Errorf("connect port %s: %w", port, err))
		}
		conns = append(conns, c)
	}
	outs := make([]io.WriteCloser, 0, len(ports))
	for _, port := range ports {
		w, err := openOutput(cfg.Outputs[port], slices.Contains(cfg.Durable, port), cfg.LogMaxBytes)
		if err != nil {
			for _, o := range outs {
				o.Close()
			}
			return finish(err)
		}
		outs = append(outs, w)
	}
	signalReady(ready)

	var wg sync.WaitGroup
	for i := range ports {
		wg.Go(func() {
			_, _ = io.Copy(outs[i], conns[i])
			outs[i].Close()
		})
	}
	copied := make(chan struct{})
	go func() {
		wg.Wait()
		close(copied)
	}()
	if exited, err := proc.Watch(cfg.QEMU); err == nil {
		select {
		case <-copied:
		case <-exited:
			select {
			case <-copied:
			case <-time.After(drainTimeout):
				for _, c := range conns {
					c.Close()
				}
				<-copied
			}
		}
	} else {
		<-copied
	}
	return finish(nil)
}

var errQEMUGone = errors.New("qemu exited")

// dialPort connects to one port's socket, retrying while QEMU lives: the
// socket is created by libvirt before QEMU starts, so refusals are brief.
func dialPort(path string, qemu proc.Ident) (net.Conn, error) {
	deadline := time.Now().Add(connectTimeout)
	for {
		c, err := net.Dial("unix", path)
		if err == nil {
			return c, nil
		}
		if qemu.Pid != 0 && !qemu.Alive() {
			return nil, errQEMUGone
		}
		if time.Now().After(deadline) {
			return nil, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func signalReady(ready *os.File) {
	if ready != nil {
		_, _ = ready.Write([]byte{1})
		ready.Close()
	}
}

// openOutput opens where one port's bytes go, in append mode so that a
// respawned monitor continues the same files. The status file is synced on
// every write: it is tiny, and its last record is the workload's result.
func openOutput(path string, durable bool, max int64) (io.WriteCloser, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open output: %w", err)
	}
	if durable {
		return syncedFile{f}, nil
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &cappedLog{f: f, max: max, written: fi.Size()}, nil
}

type syncedFile struct{ f *os.File }

func (s syncedFile) Write(p []byte) (int, error) {
	n, err := s.f.Write(p)
	if err == nil {
		err = s.f.Sync()
	}
	return n, err
}

func (s syncedFile) Close() error { return s.f.Close() }

// cappedLog appends to a log file up to a size cap, then drops output (with
// one marker line) rather than fill the node's disk or stall the guest.
type cappedLog struct {
	f       *os.File
	max     int64
	written int64
	capped  bool
}

func (l *cappedLog) Write(p []byte) (int, error) {
	if l.max > 0 && l.written+int64(len(p)) > l.max {
		if !l.capped {
			l.capped = true
			fmt.Fprintf(l.f, "\n[berth: log limit of %d bytes reached; further output is dropped]\n", l.max)
		}
		return len(p), nil
	}
	n, err := l.f.Write(p)
	l.written += int64(n)
	return n, err
}

func (l *cappedLog) Close() error { return l.f.Close() }
