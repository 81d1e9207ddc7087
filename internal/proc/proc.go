// Package proc identifies and watches processes berth did not necessarily
// start (monitors that outlived an agent restart), without races on pid
// reuse and without a blocked thread per process.
package proc

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Ident names one process for its whole life: a pid alone may be reused by
// another process after the first one ended; pid plus start time may not.
type Ident struct {
	Pid       int    `json:"pid"`
	StartTime uint64 `json:"start_time"` // clock ticks since boot, /proc/PID/stat field 22
}

// Identify reads the start time of pid.
func Identify(pid int) (Ident, error) {
	st, err := startTime(pid)
	if err != nil {
		return Ident{}, err
	}
	return Ident{Pid: pid, StartTime: st}, nil
}

func startTime(pid int) (uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses; the
	// fields after its closing parenthesis are plain.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat: no command field", pid)
	}
	fields := strings.Fields(s[i+1:])
	// fields[0] is field 3 (state); start time is field 22.
	if len(fields) < 20 {
		return 0, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, len(fields))
	}
	return strconv.ParseUint(fields[19], 10, 64)
}

// Alive reports whether the identified process still runs (a zombie counts
// as gone).
func (id Ident) Alive() bool {
	st, err := startTime(id.Pid)
	if err != nil || st != id.StartTime {
		return false
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(id.Pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// ErrGone is returned by Watch when the process is no longer there.
var ErrGone = errors.New("process is gone")

// Watch returns a channel closed when the identified process exits. It uses
// a pidfd parked in Go's network poller, so watching thousands of processes
// costs goroutines, not threads. The process need not be a child.
func Watch(id Ident) (<-chan struct{}, error) {
	done := make(chan struct{})
	if err := OnExit(id, func() { close(done) }); err != nil {
		return nil, err
	}
	return done, nil
}

// OnExit has f run, on a goroutine of its own, once the identified process
// has exited (see Watch); ErrGone when it is gone already.
func OnExit(id Ident, f func()) error {
	fd, err := unix.PidfdOpen(id.Pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("pidfd_open %d: %w", id.Pid, err)
	}
	// The pidfd pins the process: if the start time still matches now, the
	// fd refers to the process we mean and not a successor.
	st, err := startTime(id.Pid)
	if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ESRCH) {
		unix.Close(fd)
		return fmt.Errorf("watch %d: %w", id.Pid, err) // not known to be gone
	}
	if err != nil || st != id.StartTime {
		unix.Close(fd)
		return ErrGone
	}
	pf := os.NewFile(uintptr(fd), "pidfd")
	rc, err := pf.SyscallConn()
	if err != nil {
		pf.Close()
		return err
	}
	go func() {
		// A pidfd becomes readable when the process exits.
		_ = rc.Read(func(fd uintptr) bool { return exitedNow(int(fd)) })
		pf.Close()
		f()
	}()
	return nil
}

// exitedNow reports whether the process of pidfd has exited, without
// waiting. A signal that interrupts the check (the runtime's own, a
// SIGCHLD) is not an exit: the check is made again at once. Returning false
// for it instead would wait for a readiness the poller may have reported
// already, and treating it as an exit would declare a live process gone.
func exitedNow(pidfd int) bool {
	for {
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(pidfd), Events: unix.POLLIN}}, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		// Another error: the fd cannot tell; the caller finds out from
		// the process's records what happened.
		return err != nil || n > 0
	}
}
