package monitor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Files of a container task besides the protocol's.
const (
	runcLogFile      = "runc.log"
	containerPidFile = "container.pid"
	stdoutLog        = "stdout.log"
	stderrLog        = "stderr.log"
)

const (
	// drainTimeout bounds how long the monitor waits for the container's
	// output pipes to close after its init exited (a leaked fd in some
	// other process must not keep the exit status from being recorded).
	drainTimeout = 2 * time.Second
	// killRepeat is how often SIGKILL is repeated until the init is gone.
	killRepeat = time.Second
	// cleanupTimeout bounds runc delete after the end: a hung runc must not
	// keep the monitor (and the recorded exit) hostage.
	cleanupTimeout = 30 * time.Second
	// defaultStartTimeout bounds create and start when the config names none.
	defaultStartTimeout = 2 * time.Minute
)

// runContainer creates and starts the container, becomes its subreaper,
// copies its output into the logs, enforces stop requests and records the
// exit.
func (m *mon) runContainer() error {
	rc := m.cfg.Runc
	// Orphans of runc (the container init once `runc create` exits) are
	// re-parented to us, so we can wait for them.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return m.fail(fmt.Errorf("become child subreaper: %w", err))
	}

	timeout := rc.StartTimeout
	if timeout <= 0 {
		timeout = defaultStartTimeout
	}
	sio, err := m.openStdio(timeout)
	if err != nil {
		return m.fail(err)
	}
	defer sio.close()

	startCtx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// A stop request while runc creates or starts aborts the start; one
	// may have been written before we listened.
	if _, ok := m.readStop(); ok {
		cancel()
	}
	startDone, listening := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(listening)
		select {
		case <-m.stops:
			cancel()
		case <-startDone:
		}
	}()
	// One runc process creates and starts the container (run --detach):
	// the start a separate `runc start` would add is a second runc
	// process's whole start-up. The container's init is re-parented to
	// us, the subreaper, when runc exits.
	runcLog := filepath.Join(m.dir, runcLogFile)
	args := []string{"--log", runcLog, "--log-format", "json", "run", "--detach"}
	if sio.consoleSocket != "" {
		args = append(args, "--console-socket", sio.consoleSocket)
	}
	entry, err := openEntry(rc.Entry)
	if err != nil {
		return m.fail(err)
	}
	defer entry.close()
	args = append(args, entry.runcArgs()...)
	args = append(args, "--bundle", rc.Bundle, "--pid-file", filepath.Join(m.dir, containerPidFile), m.cfg.ID)
	err = m.runc(startCtx, entry.extra, sio.runcStdin, sio.runcStdout, sio.runcStderr, args...)
	sio.ranRunc()
	entry.started()
	if err != nil {
		// runc delete --force kills whatever of the container was made.
		m.cleanupRunc()
		reapAll()
		return m.fail(fmt.Errorf("runc run: %s", m.startError(startCtx, runcLog, err)))
	}
	if err := sio.serve(startCtx, m.dir); err != nil {
		m.cleanupRunc()
		reapAll()
		return m.fail(err)
	}
	deadline, _ := startCtx.Deadline()
	if err := entry.wait(deadline); err != nil {
		m.cleanupRunc()
		reapAll()
		return m.fail(err)
	}
	pidBytes, err := os.ReadFile(filepath.Join(m.dir, containerPidFile))
	if err != nil {
		m.cleanupRunc()
		return m.fail(fmt.Errorf("read container pid: %w", err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(pidBytes)))
	if err != nil {
		m.cleanupRunc()
		return m.fail(fmt.Errorf("parse container pid %q: %w", pidBytes, err))
	}
	// The init is our child now (runc has exited; it may have exited
	// too, and waits for us as a zombie): until we reap it its pid cannot
	// be reused, and a pidfd signals exactly it.
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		m.cleanupRunc()
		return m.fail(fmt.Errorf("open the container init %d: %w", pid, err))
	}
	defer unix.Close(pidfd)
	started := time.Now().UTC()
	if err := m.writeStatus(Status{State: StateRunning, Pid: pid, StartedAt: started}); err != nil {
		_ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
		reapPid(pid)
		m.cleanupRunc()
		return m.fail(err)
	}
	// From here on stop requests go to the workload, not the start.
	close(startDone)
	<-listening // a request it took is re-read from stop.json below
	signalReady(m.ready)

	exited := make(chan waitResult, 1)
	go func() { exited <- reap(pid) }()
	var res waitResult
	stopped := m.enforceStops(pidfd, m.stops, exited, &res)
	finished := time.Now().UTC()
	sio.ended()
	st := Status{
		State: StateExited, Pid: pid, StartedAt: started, FinishedAt: finished,
		ExitCode: res.code, Signal: res.sig, OOMKilled: oomKilled(rc.Cgroup), Stopped: stopped,
	}
	if err := m.writeStatus(st); err != nil {
		return err
	}
	signalEnded()
	// The exit status is safe on disk; now release the cgroup and runc's
	// state so nothing of the container lingers while nobody asks: here,
	// or through runc delete when anything is not as expected.
	if err := releaseStopped(rc.RuncRoot, m.cfg.ID); err != nil {
		fmt.Fprintf(os.Stderr, "berth-monitor: release the ended container without runc (runc delete follows): %v\n", err)
		m.cleanupRunc()
	}
	// Attach clients still taking their last output get a moment.
	sio.hub.flush()
	return nil
}

// enforceStops waits for the container's end, and turns stop requests into
// SIGTERM and, at their deadline, SIGKILL (repeated until the init is
// gone). It reports whether the end followed a stop request.
func (m *mon) enforceStops(pidfd int, stops <-chan os.Signal, exited <-chan waitResult, res *waitResult) bool {
	var deadline <-chan time.Time
	var timer *time.Timer
	var kill *time.Ticker
	var killC <-chan time.Time
	requested := false
	check := func() {
		req, ok := m.readStop()
		if !ok {
			return
		}
		if !requested {
			requested = true
			_ = unix.PidfdSendSignal(pidfd, unix.SIGTERM, nil, 0)
		}
		// A later request may bring the deadline closer, never further.
		d := time.Until(req.Deadline())
		if timer == nil {
			timer = time.NewTimer(max(d, 0))
			deadline = timer.C
		} else if timer.Stop() {
			timer.Reset(max(d, 0))
		}
	}
	// A request may have been written before we were ready to hear it.
	check()
	for {
		select {
		case r := <-exited:
			*res = r
			if timer != nil {
				timer.Stop()
			}
			if kill != nil {
				kill.Stop()
			}
			return requested
		case <-stops:
			check()
		case <-deadline:
			_ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
			kill = time.NewTicker(killRepeat)
			killC = kill.C
			deadline = nil
		case <-killC:
			_ = unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
		}
	}
}

// runc runs one runc command in a process group of its own, killed as a
// whole when ctx ends (a hung runc and whatever it started).
func (m *mon) runc(ctx context.Context, extra []*os.File, stdin *os.File, stdout, stderr io.Writer, args ...string) error {
	rc := m.cfg.Runc
	cmd := exec.Command(rc.Runc, append([]string{"--root", rc.RuncRoot}, args...)...)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = extra
	if stdin != nil {
		// Without a terminal, runc --detach hands its stdio to the
		// container: this pipe is the workload's stdin.
		cmd.Stdin = stdin
	}
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		_ = unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
		<-done
		return ctx.Err()
	}
}

// cleanupRunc removes runc's state and the container's cgroup, bounded.
func (m *mon) cleanupRunc() {
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	var stderr strings.Builder
	if err := m.runc(ctx, nil, nil, nil, &stderr, "delete", "--force", m.cfg.ID); err != nil && !strings.Contains(stderr.String(), "does not exist") {
		fmt.Fprintf(os.Stderr, "berth-monitor: runc delete: %v: %s\n", err, strings.TrimSpace(stderr.String()))
	}
}

// startError says why create or start failed: the stop or the timeout that
// cut it short, or runc's own explanation.
func (m *mon) startError(ctx context.Context, runcLog string, err error) string {
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Sprintf("runc did not finish within %s (hung?); berth killed it", m.cfg.Runc.StartTimeout)
	case errors.Is(ctx.Err(), context.Canceled):
		return "stopped before it started"
	}
	return runcError(runcLog, err)
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

type waitResult struct{ code, sig int }

// reap waits for the container init and returns its exit code the way
// shells report it (128+signal for a killed process). It also reaps any
// other orphan that lands on us meanwhile.
func reap(pid int) waitResult {
	for {
		var ws unix.WaitStatus
		wpid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			// ECHILD: the init was never ours (it cannot happen with the
			// subreaper set); report it rather than spin.
			return waitResult{code: -1}
		}
		if wpid != pid {
			continue
		}
		switch {
		case ws.Exited():
			return waitResult{code: ws.ExitStatus()}
		case ws.Signaled():
			return waitResult{code: 128 + int(ws.Signal()), sig: int(ws.Signal())}
		}
	}
}

// reapPid reaps one killed child.
func reapPid(pid int) {
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, 0, nil)
		if !errors.Is(err, unix.EINTR) {
			return
		}
	}
}

// reapAll reaps the children that have already exited (what a killed
// start left re-parented to us), without waiting for others.
func reapAll() {
	var ws unix.WaitStatus
	for {
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 && !errors.Is(err, unix.EINTR) {
			return
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

// oomKilled reports whether the kernel's OOM killer acted in the cgroup,
// on cgroup v1 (memory.oom_control) or v2 (memory.events).
func oomKilled(cgroup string) bool {
	if cgroup == "" {
		return false
	}
	for _, f := range []struct{ path, key string }{
		{"/sys/fs/cgroup/memory" + cgroup + "/memory.oom_control", "oom_kill"},
		{"/sys/fs/cgroup" + cgroup + "/memory.events", "oom_kill"},
	} {
		data, err := os.ReadFile(f.path)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			k, v, ok := strings.Cut(line, " ")
			if ok && k == f.key {
				n, _ := strconv.Atoi(strings.TrimSpace(v))
				return n > 0
			}
		}
	}
	return false
}
