//go:build linux

package pid1

import (
	"errors"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// reaper is the only caller of wait4 in berth-init. PID 1 inherits every
// orphan and must reap them all, while the workload's main process and
// each exec'd process need their own status: the reaper hands a status to
// whoever started that process (start) and drops the orphans'.
type reaper struct {
	mu      sync.Mutex
	waiting map[int]chan syscall.WaitStatus
}

// newReaper starts reaping on every SIGCHLD.
func newReaper() *reaper {
	r := &reaper{waiting: map[int]chan syscall.WaitStatus{}}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGCHLD)
	go func() {
		for range sigs {
			r.reap()
		}
	}()
	return r
}

// start runs fn, which starts a process and returns its pid, so that the
// process cannot be reaped before its channel is registered. The channel
// receives its status once.
func (r *reaper) start(fn func() (int, error)) (int, <-chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := fn()
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiting[pid] = ch
	return pid, ch, nil
}

// reap collects every child that has ended; it reports whether none is
// left at all (ECHILD).
func (r *reaper) reap() (none bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		switch {
		case errors.Is(err, syscall.EINTR):
			continue
		case errors.Is(err, syscall.ECHILD):
			return true
		case err != nil || pid <= 0:
			return false
		}
		if !ws.Exited() && !ws.Signaled() {
			continue
		}
		if ch, ok := r.waiting[pid]; ok {
			ch <- ws
			delete(r.waiting, pid)
		}
	}
}

// killAll sends SIGKILL to every process but berth-init and waits, at
// most reapTimeout, until all are reaped.
func (r *reaper) killAll() {
	_ = syscall.Kill(-1, syscall.SIGKILL)
	deadline := time.Now().Add(reapTimeout)
	for !r.reap() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}
