package proc

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Reap waits for the exited child p and reaps it, parked on the runtime's
// poller (a pidfd becomes readable when its process exits) instead of
// holding an OS thread in a blocking wait, as os.Process.Wait does: an
// agent with a child per workload would otherwise keep a thread per
// workload. p is released (its own handle closed) once reaped; its exit
// status is not kept. It returns when the child was reaped, or with the
// error that kept it from waiting.
func Reap(p *os.Process) error {
	fd, err := unix.PidfdOpen(p.Pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("pidfd of %d: %w", p.Pid, err)
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", p.Pid))
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	reaped := false
	err = rc.Read(func(fd uintptr) bool {
		var info unix.Siginfo
		werr = unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
		for errors.Is(werr, unix.EINTR) {
			// A signal is not the child's exit; ask again at once (the
			// poller's readiness may have been reported already).
			werr = unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
		}
		if werr != nil {
			return true // ECHILD: not ours, or reaped elsewhere
		}
		// With WNOHANG, a child that has not exited leaves info zero.
		reaped = info.Signo != 0
		return reaped
	})
	if err != nil && !reaped && werr == nil {
		// The pidfd could not be polled: wait the blocking way.
		_, err = p.Wait()
		return err
	}
	_ = p.Release()
	if err != nil {
		return err
	}
	return werr
}
