package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor/monitor"
)

// spareWait bounds how long Close waits for the spares it lets go to exit.
const spareWait = 5 * time.Second

// started is a monitor process and the agent's ends of its pipes.
type started struct {
	cmd   *exec.Cmd
	ready *os.File // closes (or gets a byte) when the task runs or failed
	ended *os.File // gets a byte (or closes) when the task's end is recorded
	task  *os.File // a spare's: its task directory is written here
	pid   int
	end   *Ended        // the task's end: a byte on ended, or ended's EOF
	gone  chan struct{} // closed once the monitor has exited and is reaped
	taken chan struct{} // a spare's: closed when it is handed a task
}

// release closes the agent's ends; a spare then exits unused.
func (m *started) release() {
	for _, f := range []*os.File{m.task, m.ready, m.ended} {
		if f != nil {
			f.Close()
		}
	}
}

// startMonitor starts a monitor for the task directory dir, or, with dir
// "", a spare that waits for its task on monitor.TaskDirFD.
func (s *Supervisor[T]) startMonitor(dir string) (*started, error) {
	m := &started{end: newEnded(), gone: make(chan struct{}), taken: make(chan struct{})}
	started := false
	defer func() {
		if !started {
			m.release() // m, not the nil an error returns
		}
	}()
	var theirs []*os.File // the monitor's ends, closed here once it has them
	defer func() {
		for _, f := range theirs {
			f.Close()
		}
	}()
	pipe := func(ours **os.File, readOurs bool) error {
		r, w, err := os.Pipe()
		if err != nil {
			return err
		}
		if readOurs {
			*ours = r
			theirs = append(theirs, w)
		} else {
			*ours = w
			theirs = append(theirs, r)
		}
		return nil
	}
	if err := pipe(&m.ready, true); err != nil {
		return nil, err
	}
	if err := pipe(&m.ended, true); err != nil {
		return nil, err
	}
	arg := []string{monitor.SpareArg, monitor.SpareTitle}
	var logf *os.File
	if dir != "" {
		arg = []string{dir}
		var err error
		if logf, err = os.OpenFile(filepath.Join(dir, monitor.LogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600); err != nil {
			return nil, err
		}
		defer logf.Close()
	} else if err := pipe(&m.task, false); err != nil {
		return nil, err
	}
	args := append(append([]string(nil), s.opts.Monitor[1:]...), arg...)
	m.cmd = exec.Command(s.opts.Monitor[0], args...)
	// One P is all a monitor needs (it waits, mostly), and each P costs
	// memory that every workload pays once more.
	m.cmd.Env = append(append([]string(nil), s.opts.Env...), "GOMAXPROCS=1")
	m.cmd.ExtraFiles = theirs // fds 3, 4 (and 5): monitor.ReadyFD, EndedFD, TaskDirFD
	if logf != nil {
		m.cmd.Dir = dir
		m.cmd.Stdout, m.cmd.Stderr = logf, logf
	}
	// Its own session: the agent's death or its terminal's signals must not
	// reach the monitor, and Kill can end everything it started at once.
	m.cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	start := m.cmd.Start
	if dir == "" {
		// A spare starts in the background: its exec and start-up yield
		// the CPU to the starts under way (it is made while one of them
		// runs). Handed its task, it comes back to the agent's niceness.
		if nice, err := proc.Nice(); err == nil {
			m.cmd.Env = append(m.cmd.Env, fmt.Sprintf("%s=%d", monitor.NiceEnv, nice))
			start = func() error { return proc.InBackground(m.cmd.Start) }
		}
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("start monitor %s: %w", s.opts.Monitor[0], err)
	}
	m.pid = m.cmd.Process.Pid
	started = true
	go m.follow()
	return m, nil
}

// follow is the one goroutine a monitor costs the agent while it lives,
// parked on the poller throughout: it reads the ended pipe until the
// monitor says the task's end is recorded (a byte) or is gone or let go
// (EOF, or our end closed), ends m.end, and then reaps the monitor (our
// child while this agent lives), which may still be cleaning up.
func (m *started) follow() {
	var b [1]byte
	_, _ = m.ended.Read(b[:])
	m.ended.Close()
	m.end.end()
	_ = proc.Reap(m.cmd.Process)
	close(m.gone)
}

// takeSpare hands dir to a spare monitor, or returns nil when none is
// ready (or the one taken has died: the caller starts one). It starts
// another spare in the background.
func (s *Supervisor[T]) takeSpare(dir string) *started {
	s.mu.Lock()
	if len(s.spares) == 0 {
		s.mu.Unlock()
		s.fillSpares()
		return nil
	}
	m := s.spares[len(s.spares)-1]
	s.spares = s.spares[:len(s.spares)-1]
	s.sparesServed++
	s.mu.Unlock()
	close(m.taken)
	s.fillSpares()
	_, err := m.task.WriteString(dir + "\n")
	if cerr := m.task.Close(); err == nil {
		err = cerr
	}
	m.task = nil
	if err != nil {
		s.log.Warn("a spare monitor could not take its task; starting one for it", "dir", dir, "err", err)
		m.release()
		return nil
	}
	return m
}

// fillSpares starts spare monitors in the background until Options.Spares
// are ready.
func (s *Supervisor[T]) fillSpares() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.filling || s.sparesClosed || len(s.spares) >= s.opts.Spares {
		return
	}
	s.filling = true
	s.fill.Add(1)
	go func() {
		defer s.fill.Done()
		for {
			s.mu.Lock()
			if s.sparesClosed || len(s.spares) >= s.opts.Spares {
				s.filling = false
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
			m, err := s.startMonitor("")
			s.mu.Lock()
			if err != nil {
				// A start finding none starts its own, and says why if it
				// cannot either.
				s.spareErr = err.Error()
				s.filling = false
				s.mu.Unlock()
				return
			}
			s.spareErr = ""
			if s.sparesClosed {
				s.filling = false
				s.mu.Unlock()
				m.release()
				select {
				case <-m.gone:
				case <-time.After(spareWait):
				}
				return
			}
			s.spares = append(s.spares, m)
			s.mu.Unlock()
			go s.watchSpare(m)
		}
	}()
}

// watchSpare takes a spare that died while it waited (killed by someone)
// out of the pool, and has another made.
func (s *Supervisor[T]) watchSpare(m *started) {
	select {
	case <-m.taken:
		return
	case <-m.gone:
	}
	s.mu.Lock()
	i := slices.Index(s.spares, m)
	if i >= 0 {
		s.spares = slices.Delete(s.spares, i, i+1)
	}
	s.mu.Unlock()
	if i >= 0 {
		m.release()
		s.log.Warn("a spare monitor died while it waited", "pid", m.pid)
		s.fillSpares()
	}
}

// SpareStatus describes the spare monitors for node status.
func (s *Supervisor[T]) SpareStatus() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := fmt.Sprintf("%d of %d ready, %d starts served", len(s.spares), s.opts.Spares, s.sparesServed)
	if s.spareErr != "" {
		st += "; last failure: " + s.spareErr
	}
	return st
}

// Close lets the spare monitors go and waits (bounded) until they have
// exited; monitors of tasks are not touched.
func (s *Supervisor[T]) Close() {
	s.mu.Lock()
	s.sparesClosed = true
	spares := s.spares
	s.spares = nil
	s.mu.Unlock()
	s.fill.Wait() // a spare being started is let go by its filler
	deadline := time.After(spareWait)
	for _, m := range spares {
		m.release()
	}
	for _, m := range spares {
		select {
		case <-m.gone:
		case <-deadline:
			s.log.Warn("a spare monitor did not exit when let go", "pid", m.pid)
			return
		}
	}
}
