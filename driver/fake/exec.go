package fake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/internal/ptyio"
)

var (
	_ driver.Execer   = (*Driver)(nil)
	_ driver.Signaler = (*Driver)(nil)
)

// running returns task id if it still runs.
func (d *Driver) running(id string) (*task, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return nil, fmt.Errorf("fake task %s has exited: %w", id, errdefs.ErrConflict)
	default:
		return t, nil
	}
}

// Signal implements driver.Signaler.
func (d *Driver) Signal(ctx context.Context, id string, sig syscall.Signal) error {
	if err := d.record(ctx, "Signal", id); err != nil {
		return err
	}
	t, err := d.running(id)
	if err != nil {
		return err
	}
	if err := syscall.Kill(t.cmd.Process.Pid, sig); err != nil {
		return fmt.Errorf("signal fake task %s: %w", id, err)
	}
	return nil
}

// Exec implements driver.Execer with a host process, in a process group
// (a session with a terminal) of its own.
func (d *Driver) Exec(ctx context.Context, id string, cfg *driver.ExecConfig) (driver.ExecSession, error) {
	if err := d.record(ctx, "Exec", id); err != nil {
		return nil, err
	}
	if err := driver.CheckExecConfig(cfg); err != nil {
		return nil, err
	}
	t, err := d.running(id)
	if err != nil {
		return nil, err
	}
	workdir := cfg.Workdir
	if workdir == "" {
		workdir = t.cfg.Workdir
	}
	if workdir == "" {
		workdir = "/"
	}
	if fi, err := os.Stat(workdir); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("exec workdir %s is not a directory in task %s: %w", workdir, id, errdefs.ErrInvalidArgument)
	}
	cmd := exec.Command(cfg.Args[0], cfg.Args[1:]...)
	cmd.Env = append(append([]string(nil), t.cfg.Env...), cfg.Env...)
	cmd.Dir = workdir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: !cfg.TTY, Setsid: cfg.TTY, Setctty: cfg.TTY}
	// The fake runs tasks as the agent's own user; an exec asks for one.
	if user := cfg.User; user != "" {
		uid, gid, err := driver.ParseExecUser(user)
		if err != nil {
			return nil, err
		}
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: gid}
	}
	s := &session{done: make(chan struct{})}
	var childEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
	}()
	if cfg.TTY {
		master, slave, err := ptyio.Open()
		if err != nil {
			return nil, err
		}
		childEnds = append(childEnds, slave)
		s.pty = master
		if err := ptyio.Resize(master, cfg.Size.Rows, cfg.Size.Cols); err != nil {
			master.Close()
			return nil, fmt.Errorf("size the terminal: %w", err)
		}
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		s.stdout = ptyio.Reader{F: master}
		if cfg.Stdin {
			s.stdin = &ptyio.Stdin{F: master}
		}
	} else {
		outR, outW, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			outR.Close()
			outW.Close()
			return nil, err
		}
		childEnds = append(childEnds, outW, errW)
		s.files = append(s.files, outR, errR)
		s.stdout, s.stderr = outR, errR
		cmd.Stdout, cmd.Stderr = outW, errW
		if cfg.Stdin {
			inR, inW, err := os.Pipe()
			if err != nil {
				s.release()
				return nil, err
			}
			childEnds = append(childEnds, inR)
			s.files = append(s.files, inW)
			s.stdin = inW
			cmd.Stdin = inR
		}
	}
	if err := cmd.Start(); err != nil {
		s.release()
		return nil, fmt.Errorf("exec %s in fake task %s: %v: %w", cfg.Args[0], id, err, errdefs.ErrInvalidArgument)
	}
	s.cmd = cmd
	go s.wait()
	t.addSession(s)
	s.onClose = func() { t.removeSession(s) }
	return s, nil
}

// session is one exec'd host process.
type session struct {
	cmd            *exec.Cmd
	pty            *os.File
	files          []*os.File // our pipe ends
	stdin          io.WriteCloser
	stdout, stderr io.Reader
	onClose        func()

	done chan struct{}
	exit *driver.ExitResult

	closeOnce sync.Once
	closeErr  error
}

func (s *session) wait() {
	err := s.cmd.Wait()
	res := &driver.ExitResult{FinishedAt: time.Now().UTC()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		ws := ee.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			res = driver.SignalExit(ws.Signal())
			res.FinishedAt = time.Now().UTC()
		} else {
			res.ExitCode = ws.ExitStatus()
		}
	} else if err != nil {
		res.ExitCode, res.Err = -1, err.Error()
	}
	s.exit = res
	close(s.done)
}

func (s *session) Stdin() io.WriteCloser {
	if s.stdin == nil {
		return nil // a typed nil would not compare equal to nil
	}
	return s.stdin
}
func (s *session) Stdout() io.Reader { return s.stdout }
func (s *session) Stderr() io.Reader {
	if s.stderr == nil {
		return nil
	}
	return s.stderr
}

func (s *session) Resize(size driver.TermSize) error {
	if s.pty == nil {
		return nil
	}
	return ptyio.Resize(s.pty, size.Rows, size.Cols)
}

func (s *session) Signal(sig syscall.Signal) error {
	select {
	case <-s.done:
		return fmt.Errorf("exec'd process has ended: %w", errdefs.ErrConflict)
	default:
	}
	return syscall.Kill(s.cmd.Process.Pid, sig)
}

func (s *session) Wait(ctx context.Context) (*driver.ExitResult, error) {
	select {
	case <-s.done:
		return s.exit, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close kills the process's group (with a terminal, its session: the
// same id) until none of it is left, then releases the session's files.
func (s *session) Close() error {
	s.closeOnce.Do(func() {
		pgid := s.cmd.Process.Pid
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.closeErr = proc.KillAll(ctx, proc.AllPids, func(p proc.Info) bool { return p.Pgrp == pgid || p.Session == pgid })
		<-s.done
		s.release()
		if s.onClose != nil {
			s.onClose()
		}
	})
	return s.closeErr
}

func (s *session) release() {
	for _, f := range s.files {
		f.Close()
	}
	if s.pty != nil {
		s.pty.Close()
	}
}

func (t *task) addSession(s *session) {
	t.stopMu.Lock()
	if t.sessions == nil {
		t.sessions = map[*session]struct{}{}
	}
	t.sessions[s] = struct{}{}
	t.stopMu.Unlock()
}

func (t *task) removeSession(s *session) {
	t.stopMu.Lock()
	delete(t.sessions, s)
	t.stopMu.Unlock()
}

// closeSessions ends every exec session of the task (it is being
// destroyed).
func (t *task) closeSessions() {
	t.stopMu.Lock()
	var all []*session
	for s := range t.sessions {
		all = append(all, s)
	}
	t.stopMu.Unlock()
	for _, s := range all {
		_ = s.Close()
	}
}
