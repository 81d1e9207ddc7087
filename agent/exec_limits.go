package agent

import (
	"fmt"
	"sync"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// Default caps of exec sessions open at once (config exec.max_sessions
// and exec.max_sessions_per_workload).
const (
	DefaultExecMaxSessions            = 256
	DefaultExecMaxSessionsPerWorkload = 128
)

// ExecLimits caps the exec sessions open at once: each holds processes,
// pipes, a shim or a guest channel's share until it is closed.
type ExecLimits struct {
	// MaxSessions is the node's cap; 0 means DefaultExecMaxSessions.
	MaxSessions int
	// MaxSessionsPerWorkload is one workload's; 0 means
	// DefaultExecMaxSessionsPerWorkload.
	MaxSessionsPerWorkload int
}

// execSlots counts the open sessions.
type execSlots struct {
	mu    sync.Mutex
	total int
	per   map[string]int
}

// takeExecSlot reserves a session of workload id, or refuses with
// ErrTooManyRequests naming the config key to raise. release gives it
// back (once).
func (a *Agent) takeExecSlot(id string) (release func(), err error) {
	maxAll, maxOne := a.opts.ExecLimits.MaxSessions, a.opts.ExecLimits.MaxSessionsPerWorkload
	if maxAll <= 0 {
		maxAll = DefaultExecMaxSessions
	}
	if maxOne <= 0 {
		maxOne = DefaultExecMaxSessionsPerWorkload
	}
	s := &a.execSlots
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.per[id] >= maxOne:
		return nil, fmt.Errorf("workload %s has %d exec sessions open, at most %d (exec.max_sessions_per_workload): close one or retry later: %w", id, s.per[id], maxOne, errdefs.ErrTooManyRequests)
	case s.total >= maxAll:
		return nil, fmt.Errorf("the node has %d exec sessions open, at most %d (exec.max_sessions): close one or retry later: %w", s.total, maxAll, errdefs.ErrTooManyRequests)
	}
	if s.per == nil {
		s.per = map[string]int{}
	}
	s.total++
	s.per[id]++
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			defer s.mu.Unlock()
			s.total--
			if s.per[id]--; s.per[id] <= 0 {
				delete(s.per, id)
			}
		})
	}, nil
}

// slotSession gives its slot back when it is closed.
type slotSession struct {
	driver.ExecSession
	release func()
}

func (s *slotSession) Close() error {
	err := s.ExecSession.Close()
	s.release()
	return err
}
