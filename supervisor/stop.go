package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor/monitor"
)

// Ender is how a driver ends a task itself, for the stops its monitor
// cannot enforce: a VM's (its end is libvirt's), or a container whose
// monitor is of protocol version 1.
type Ender interface {
	// Term asks the task to end (SIGTERM, the power button). It is
	// repeated while the grace period lasts.
	Term(ctx context.Context) error
	// Kill forces the task's end (SIGKILL, destroying the domain).
	Kill(ctx context.Context) error
}

// monitorStops reports whether the task's monitor enforces stop deadlines
// itself: a container monitor that speaks this protocol.
func (s *Supervisor[T]) monitorStops(t *Task[T]) bool {
	rec := t.Monitor()
	return s.opts.Kind == monitor.KindRunc && rec.Version >= 2
}

// Stop asks the task to end: SIGTERM now, SIGKILL once grace has passed.
// The request is persisted (stop.json) and enforced by the monitor, or for
// tasks whose monitor cannot (VMs), by a deadline runner of the agent that
// Recover resumes after a restart: it goes on when ctx ends. Stop returns
// when the task has ended, or with ctx's error. A later request never
// extends an earlier deadline.
func (s *Supervisor[T]) Stop(ctx context.Context, t *Task[T], grace time.Duration, e Ender) error {
	if t.Exited() {
		return nil
	}
	if err := s.requestStop(t, grace); err != nil {
		return err
	}
	s.enforce(t, e)
	select {
	case <-t.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ResumeStop resumes a stop that was asked before the agent restarted.
func (s *Supervisor[T]) ResumeStop(t *Task[T], e Ender) {
	if _, ok := readStop(t.Dir); ok && !t.Exited() {
		if s.monitorStops(t) {
			s.signalMonitor(t) // it re-reads stop.json; harmless twice
		}
		s.enforce(t, e)
	}
}

// StopRequested reports whether a stop was asked for the task.
func StopRequested(dir string) bool {
	_, ok := readStop(dir)
	return ok
}

func readStop(dir string) (monitor.StopRequest, bool) {
	var r monitor.StopRequest
	err := fileutil.ReadJSON(filepath.Join(dir, monitor.StopFile), &r)
	return r, err == nil
}

// requestStop persists the request, keeping the earliest deadline, and
// tells the monitor.
func (s *Supervisor[T]) requestStop(t *Task[T], grace time.Duration) error {
	req := monitor.StopRequest{RequestedAt: time.Now().UTC(), Grace: max(grace, 0), Version: monitor.Version}
	t.mu.Lock()
	prev, had := readStop(t.Dir)
	if had && !prev.Deadline().After(req.Deadline()) {
		req = prev
	} else if had {
		req.RequestedAt = prev.RequestedAt // when it was first asked
		req.Grace = time.Now().UTC().Add(grace).Sub(prev.RequestedAt)
	}
	err := fileutil.ReplaceJSON(filepath.Join(t.Dir, monitor.StopFile), req)
	t.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s %s: record the stop request: %w", s.opts.Noun, t.ID, err)
	}
	if s.monitorStops(t) {
		s.signalMonitor(t)
	}
	return nil
}

// signalMonitor tells a monitor that stop.json changed.
func (s *Supervisor[T]) signalMonitor(t *Task[T]) {
	rec := t.Monitor()
	if rec.Version < 2 {
		return // SIGUSR1 would end a monitor that does not listen for it
	}
	fd, err := unix.PidfdOpen(rec.Pid, 0)
	if err != nil {
		return // gone: its end is recorded
	}
	defer unix.Close(fd)
	if rec.Alive() {
		_ = unix.PidfdSendSignal(fd, unix.SIGUSR1, nil, 0)
	}
}

// enforce runs the agent-side deadline of a stop the monitor cannot
// enforce: Term now and every few seconds, Kill at the deadline. One runs
// per task; it ends with the task.
func (s *Supervisor[T]) enforce(t *Task[T], e Ender) {
	if s.monitorStops(t) || e == nil {
		return
	}
	t.mu.Lock()
	if t.enforcing {
		t.mu.Unlock()
		return
	}
	t.enforcing = true
	t.mu.Unlock()
	go func() {
		defer func() {
			t.mu.Lock()
			t.enforcing = false
			t.mu.Unlock()
		}()
		for !t.Exited() {
			req, ok := readStop(t.Dir)
			if !ok {
				return
			}
			left := time.Until(req.Deadline())
			if left <= 0 {
				ctx, cancel := context.WithTimeout(context.Background(), killWait)
				err := e.Kill(ctx)
				cancel()
				if err != nil && !t.Exited() {
					s.log.Warn("force the end of a task after its stop deadline", "task_id", t.ID, "err", err)
				}
				select {
				case <-t.done:
				case <-time.After(termInterval):
				}
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), min(left, termInterval)+time.Second)
			err := e.Term(ctx)
			cancel()
			if err != nil && !t.Exited() {
				s.log.Warn("ask a task to stop", "task_id", t.ID, "err", err)
			}
			select {
			case <-t.done:
			case <-time.After(min(left, termInterval)):
			}
		}
	}()
}

// Kill ends the task now (a stop with no grace period) and, when it has
// not ended within a bound (a hung runtime), kills its monitor's whole
// session: the monitor, runc and whatever they started. It returns once
// nothing of the task runs, or with ctx's error.
func (s *Supervisor[T]) Kill(ctx context.Context, t *Task[T], e Ender) error {
	if !t.Exited() {
		if err := s.requestStop(t, 0); err != nil {
			if _, serr := os.Stat(t.Dir); !errors.Is(serr, fs.ErrNotExist) {
				return err
			}
			// Its directory is gone: another agent (or another driver
			// over the same root, after a restart) destroyed the task
			// before this one saw it end. Leave nothing of its session.
			s.killSession(t)
			return nil
		}
		s.enforce(t, e)
		select {
		case <-t.done:
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(killWait):
			s.log.Warn("task did not end after a forced stop; killing its monitor's session", "task_id", t.ID)
			s.killSession(t)
			return nil
		}
	}
	// The end is recorded; the monitor may still be releasing runc's
	// state. Let it, within a bound.
	if rec := t.Monitor(); rec.Pid != 0 {
		if gone, err := proc.Watch(rec.Ident); err == nil {
			select {
			case <-gone:
			case <-time.After(killWait):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	s.killSession(t)
	return nil
}

// killSession kills every process of the task's monitor's session (the
// monitor, runc, a hung runtime's children) and waits for the monitor.
func (s *Supervisor[T]) killSession(t *Task[T]) {
	rec := t.Monitor()
	if rec.Pid == 0 || !rec.Alive() {
		return
	}
	fd, err := unix.PidfdOpen(rec.Pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if !rec.Alive() {
		return
	}
	// The monitor first, so it starts nothing new; then its session.
	_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
	for _, pid := range proc.SessionMembers(rec.Pid) {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	deadline := time.Now().Add(sessionWait)
	for rec.Alive() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// EndMonitor waits up to wait for the monitor recorded in dir (if it still
// runs) to leave, then kills it: for removing a task whose monitor was
// never attached.
func EndMonitor(dir string, wait time.Duration) {
	var rec monitor.PidRecord
	if fileutil.ReadJSON(filepath.Join(dir, monitor.PidFile), &rec) != nil || !rec.Alive() {
		return
	}
	exited, err := proc.Watch(rec.Ident)
	if err != nil {
		return
	}
	select {
	case <-exited:
	case <-time.After(wait):
		if fd, err := unix.PidfdOpen(rec.Pid, 0); err == nil {
			if rec.Alive() {
				_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			}
			unix.Close(fd)
		}
	}
}
