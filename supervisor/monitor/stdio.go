package monitor

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/berthd/berth/internal/ptyio"
)

// containerStdio is what a container monitor holds of its container's
// standard streams: the pipes or terminal its output comes from (copied
// into stdout.log and stderr.log and to attach clients), its stdin, and
// the attach socket.
type containerStdio struct {
	hub   *hub
	stdin bool // the task's stdin is open for attach clients

	// What runc gets: without a terminal, runc --detach hands them to
	// the container. runcStdin is nil for /dev/null.
	runcStdin, runcStdout, runcStderr *os.File

	stdinW   *os.File // the stdin pipe's write end (Stdin without TTY)
	outLog   *cappedLog
	copiers  chan error
	ncopiers int

	// A terminal: runc sends its master to consoleSocket.
	consoleDir, consoleSocket string
	consoles                  <-chan ConsoleResult
	master                    *os.File

	ln   *net.UnixListener
	sock string
}

// openStdio opens the logs and the pipes runc gets, and listens for the
// terminal when the container has one.
func (m *mon) openStdio(timeout time.Duration) (s *containerStdio, err error) {
	rc := m.cfg.Runc
	s = &containerStdio{stdin: rc.Stdin, copiers: make(chan error, 2)}
	defer func() {
		if err != nil {
			s.ranRunc()
			s.close()
		}
	}()
	s.hub = newHub(rc.TTY, nil, nil)
	if s.outLog, err = openLog(filepath.Join(rc.LogDir, stdoutLog), m.cfg.LogMaxBytes, m.cfg.LogMaxFiles); err != nil {
		return s, err
	}
	errLog, err := openLog(filepath.Join(rc.LogDir, stderrLog), m.cfg.LogMaxBytes, m.cfg.LogMaxFiles)
	if err != nil {
		return s, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		errLog.Close()
		return s, err
	}
	s.runcStderr = errW
	s.copy(errR, FrameStderr, errLog)
	if rc.TTY {
		// The terminal carries the workload's output; runc's own goes
		// to stderr.log.
		s.runcStdout = errW
		if s.consoleDir, err = os.MkdirTemp("", "berth-console-"); err != nil {
			return s, fmt.Errorf("console socket directory: %w", err)
		}
		// A short temporary directory keeps the path within a unix
		// socket address's 108 bytes whatever the task directory.
		s.consoleSocket = filepath.Join(s.consoleDir, "console.sock")
		if s.consoles, err = ListenConsole(s.consoleSocket, timeout); err != nil {
			return s, err
		}
		return s, nil
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return s, err
	}
	s.runcStdout = outW
	s.copy(outR, FrameStdout, s.outLog)
	if rc.Stdin {
		if s.runcStdin, s.stdinW, err = os.Pipe(); err != nil {
			return s, err
		}
	}
	return s, nil
}

// copy copies r, one stream of output, into its log and the hub until r
// ends (the master of a terminal reads EIO then).
func (s *containerStdio) copy(r *os.File, typ byte, log *cappedLog) {
	s.ncopiers++
	go func() {
		_, err := io.Copy(tee{out: s.hub.stream(typ), log: log}, r)
		log.Close()
		r.Close()
		s.copiers <- err
	}()
}

// ranRunc closes our copies of what runc got: the container holds its
// own, and the output pipes end when it (and all it started) closed them.
func (s *containerStdio) ranRunc() {
	for _, f := range []*os.File{s.runcStdin, s.runcStdout, s.runcStderr} {
		if f != nil {
			f.Close()
		}
	}
}

// serve takes the terminal's master from runc (a terminal only) and
// starts serving the attach socket in dir.
func (s *containerStdio) serve(ctx context.Context, dir string) error {
	if s.consoles != nil {
		select {
		case c := <-s.consoles:
			if c.Err != nil {
				return fmt.Errorf("receive the container's terminal: %w", c.Err)
			}
			s.master = c.Master
		case <-ctx.Done():
			return fmt.Errorf("runc never handed over the container's terminal: %w", ctx.Err())
		}
		_ = os.RemoveAll(s.consoleDir)
		s.consoleDir = ""
		master := s.master
		s.hub.resize = func(rows, cols uint16) error { return ptyio.Resize(master, rows, cols) }
		if s.stdin {
			s.hub.stdin = &ptyio.Stdin{F: master}
		}
		s.copy(master, FrameStdout, s.outLog)
	} else if s.stdinW != nil {
		s.hub.stdin = s.stdinW
	}
	s.sock = filepath.Join(dir, AttachSocket)
	ln, err := listenUnix(s.sock)
	if err != nil {
		return fmt.Errorf("attach socket: %w", err)
	}
	s.ln = ln
	go s.hub.serve(ln)
	return nil
}

// ended waits (bounded) for the last output, ends the attach sessions
// after it and closes the workload's input.
func (s *containerStdio) ended() {
	drain(s.copiers, s.ncopiers)
	s.hub.end()
	if s.stdinW != nil {
		s.stdinW.Close()
	}
	if s.master != nil {
		s.master.Close()
	}
}

// close releases what is left: the attach socket, the console socket.
func (s *containerStdio) close() {
	if s.ln != nil {
		s.ln.Close()
		_ = os.Remove(s.sock)
	}
	if s.consoleDir != "" {
		_ = os.RemoveAll(s.consoleDir)
	}
	if s.consoles != nil && s.master == nil {
		select {
		case c := <-s.consoles:
			if c.Master != nil {
				c.Master.Close()
			}
		default:
		}
	}
	if s.master != nil {
		s.master.Close()
	}
	if s.stdinW != nil {
		s.stdinW.Close()
	}
}
