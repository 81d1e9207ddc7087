package ctrdriver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
)

// The monitor is berth's per-container supervisor, in the pattern of conmon
// and containerd-shim: a small process, in its own session, that owns the
// container's stdio and is the container's parent (a child subreaper), so it
// alone can collect the exit status. The agent may die and restart at any
// time; the monitor, the container and its logs carry on, and the exit
// status waits on disk in status.json.

// monitorConfig is what the driver hands the monitor, as monitor.json in
// the task directory.
type monitorConfig struct {
	ID          string `json:"id"`
	Runc        string `json:"runc"`
	RuncRoot    string `json:"runc_root"`
	Bundle      string `json:"bundle"`
	LogDir      string `json:"log_dir"`
	LogMaxBytes int64  `json:"log_max_bytes"`
}

// Monitor task states, as written to status.json.
const (
	monCreated = "created"
	monRunning = "running"
	monExited  = "exited"
	monFailed  = "failed"
)

// monitorStatus is the monitor's record of the container, rewritten
// atomically at each step.
type monitorStatus struct {
	State      string    `json:"state"`
	Pid        int       `json:"pid,omitempty"`
	StartedAt  time.Time `json:"started_at,omitzero"`
	ExitCode   int       `json:"exit_code"`
	Signal     int       `json:"signal,omitempty"`
	OOMKilled  bool      `json:"oom_killed,omitempty"`
	Error      string    `json:"error,omitempty"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
}

const (
	monitorConfigFile = "monitor.json"
	statusFile        = "status.json"
	monitorPidFile    = "monitor.pid"
	runcLogFile       = "runc.log"
	containerPidFile  = "container.pid"
	// readyFD is the pipe (ExtraFiles[0]) on which the monitor tells the
	// driver that the container runs or failed to start.
	readyFD = 3
	// drainTimeout bounds how long the monitor waits for the container's
	// output pipes to close after its init exited (a leaked fd in some
	// other process must not keep the exit status from being recorded).
	drainTimeout = 2 * time.Second
)

// RunMonitor is the monitor's main function; dir is the task directory. It
// returns the process exit code. cmd/berth runs it as `berth monitor DIR`.
func RunMonitor(dir string) int {
	// The agent's death must not reach us; a stray terminal signal neither.
	signal.Ignore(unix.SIGHUP, unix.SIGINT, unix.SIGPIPE)
	ready := os.NewFile(readyFD, "ready")
	err := monitor(dir, ready)
	if err != nil {
		fmt.Fprintf(os.Stderr, "berth monitor %s: %v\n", dir, err)
		return 1
	}
	return 0
}

func monitor(dir string, ready *os.File) error {
	// The agent records our identity too, but it may die between starting
	// us and writing it; a restarted agent must find us either way.
	if ident, err := proc.Identify(os.Getpid()); err == nil {
		_ = fileutil.WriteJSON(filepath.Join(dir, monitorPidFile), ident)
	}
	var cfg monitorConfig
	if err := fileutil.ReadJSON(filepath.Join(dir, monitorConfigFile), &cfg); err != nil {
		return err
	}
	fail := func(err error) error {
		st := monitorStatus{State: monFailed, ExitCode: -1, Error: err.Error(), FinishedAt: time.Now().UTC()}
		if werr := fileutil.WriteJSON(filepath.Join(dir, statusFile), st); werr != nil {
			return errors.Join(err, werr)
		}
		signalReady(ready)
		return err
	}
	// Orphans of runc (the container init once `runc create` exits) are
	// re-parented to us, so we can wait for them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fail(fmt.Errorf("become child subreaper: %w", err))
	}

	outR, outW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	copiers := make(chan error, 2)
	for _, p := range []struct {
		r    *os.File
		name string
	}{{outR, driver.StdoutLog}, {errR, driver.StderrLog}} {
		w, err := openLog(filepath.Join(cfg.LogDir, p.name), cfg.LogMaxBytes)
		if err != nil {
			return fail(err)
		}
		go func(r *os.File, w *cappedLog) {
			_, err := io.Copy(w, r)
			w.Close()
			copiers <- err
		}(p.r, w)
	}

	rc := runc{path: cfg.Runc, root: cfg.RuncRoot}
	runcLog := filepath.Join(dir, runcLogFile)
	create := exec.Command(cfg.Runc, rc.args("--log", runcLog, "--log-format", "json",
		"create", "--bundle", cfg.Bundle, "--pid-file", filepath.Join(dir, containerPidFile), cfg.ID)...)
	create.Stdout, create.Stderr = outW, errW
	createErr := create.Run()
	outW.Close()
	errW.Close()
	if createErr != nil {
		return fail(fmt.Errorf("runc create: %s", runcError(runcLog, createErr)))
	}
	pidBytes, err := os.ReadFile(filepath.Join(dir, containerPidFile))
	if err != nil {
		return fail(fmt.Errorf("read container pid: %w", err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidBytes)))
	if err != nil {
		return fail(fmt.Errorf("parse container pid %q: %w", pidBytes, err))
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, statusFile), monitorStatus{State: monCreated, Pid: pid}); err != nil {
		return fail(err)
	}
	start := exec.Command(cfg.Runc, rc.args("--log", runcLog, "--log-format", "json", "start", cfg.ID)...)
	if err := start.Run(); err != nil {
		_ = rc.delete(context.Background(), cfg.ID)
		return fail(fmt.Errorf("runc start: %s", runcError(runcLog, err)))
	}
	started := time.Now().UTC()
	if err := fileutil.WriteJSON(filepath.Join(dir, statusFile), monitorStatus{State: monRunning, Pid: pid, StartedAt: started}); err != nil {
		return fail(err)
	}
	signalReady(ready)

	code, sig := reap(pid)
	finished := time.Now().UTC()
	drain(copiers, 2)
	st := monitorStatus{
		State: monExited, Pid: pid, StartedAt: started, FinishedAt: finished,
		ExitCode: code, Signal: sig, OOMKilled: oomKilled(cfg.ID),
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, statusFile), st); err != nil {
		return err
	}
	// The exit status is safe on disk; now release the cgroup and runc's
	// state so nothing of the container lingers while nobody asks.
	if err := rc.delete(context.Background(), cfg.ID); err != nil {
		fmt.Fprintf(os.Stderr, "berth monitor: %v\n", err)
	}
	return nil
}

// reap waits for the container init and returns its exit code the way
// shells report it (128+signal for a killed process). It also reaps any
// other orphan that lands on us meanwhile.
func reap(pid int) (code, sig int) {
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			// ECHILD: the init was never ours (it cannot happen with the
			// subreaper set); report it rather than spin.
			return -1, 0
		}
		if wpid != pid {
			continue
		}
		switch {
		case ws.Exited():
			return ws.ExitStatus(), 0
		case ws.Signaled():
			return 128 + int(ws.Signal()), int(ws.Signal())
		}
	}
}

func drain(copiers <-chan error, n int) {
	deadline := time.After(drainTimeout)
	for range n {
		select {
		case <-copiers:
		case <-deadline:
			return
		}
	}
}

func signalReady(ready *os.File) {
	if ready != nil {
		_, _ = ready.Write([]byte{1})
		ready.Close()
	}
}

// runcError extracts runc's own explanation (its last error-level log line)
// instead of a bare "exit status 1".
func runcError(logPath string, err error) string {
	data, rerr := os.ReadFile(logPath)
	if rerr != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		var entry struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal([]byte(lines[i]), &entry) == nil && entry.Level == "error" {
			return entry.Msg
		}
	}
	return err.Error()
}

// cappedLog appends to a log file up to a size cap, then drops output (with
// one marker line) rather than fill the node's disk or block the workload.
type cappedLog struct {
	f       *os.File
	max     int64
	written int64
	capped  bool
}

func openLog(path string, max int64) (*cappedLog, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &cappedLog{f: f, max: max, written: fi.Size()}, nil
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
