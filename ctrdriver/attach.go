package ctrdriver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/supervisor/monitor"
)

var _ driver.Attacher = (*Driver)(nil)

// Attach implements driver.Attacher: the container's monitor holds its
// stdin and terminal and serves them on its attach socket, so a session
// works the same for a task this agent started and one it recovered.
func (d *Driver) Attach(ctx context.Context, id string, opts driver.AttachOptions) (driver.AttachSession, error) {
	t, err := d.runningTask(id)
	if err != nil {
		return nil, err
	}
	hello := monitor.AttachHello{Stdin: opts.Stdin, Replay: opts.Replay}
	if opts.Size != nil {
		hello.Rows, hello.Cols = opts.Size.Rows, opts.Size.Cols
	}
	conn, reply, err := monitor.DialAttach(ctx, t.Dir, hello)
	if err != nil {
		if !errors.Is(err, monitor.ErrNoAttachSocket) {
			return nil, fmt.Errorf("attach to container task %s: %w", id, err)
		}
		if rec := t.Monitor(); rec.Version < monitor.AttachVersion {
			// The task runs (not ErrConflict, which says it does not):
			// its monitor cannot do this.
			return nil, fmt.Errorf("container task %s runs under a monitor of protocol %d, started by an earlier berth, which cannot attach (protocol %d and later can); restart the workload to attach to it: %w",
				id, rec.Version, monitor.AttachVersion, errdefs.ErrFailedPrecondition)
		}
		// The socket goes with the monitor, when the task has ended.
		return nil, fmt.Errorf("container task %s is not running (its monitor has ended): %w", id, errdefs.ErrConflict)
	}
	switch reply.Reason {
	case "":
	case monitor.RefuseNoStdin:
		return nil, fmt.Errorf("attach to container task %s: %s: %w", id, reply.Error, errdefs.ErrInvalidArgument)
	case monitor.RefuseEnded:
		return nil, fmt.Errorf("container task %s has exited: %w", id, errdefs.ErrConflict)
	default:
		return nil, fmt.Errorf("attach to container task %s: the monitor refused: %s (%s)", id, reply.Error, reply.Reason)
	}
	s := &attachSession{conn: conn, tty: conn.Reply.TTY, stdout: newStreamPipe()}
	if !s.tty {
		s.stderr = newStreamPipe()
	}
	if opts.Stdin {
		s.stdin = &attachStdin{conn: conn}
	}
	go s.demux()
	return s, nil
}

// attachSession is one client of a container monitor's attach socket.
type attachSession struct {
	conn   *monitor.AttachConn
	tty    bool
	stdin  *attachStdin
	stdout *streamPipe
	stderr *streamPipe // nil with a terminal

	closeOnce sync.Once
}

// demux hands the monitor's frames to the session's streams until the
// end.
func (s *attachSession) demux() {
	end := func(err error) {
		s.stdout.end(err)
		if s.stderr != nil {
			s.stderr.end(err)
		}
	}
	for {
		typ, payload, err := s.conn.ReadFrame()
		if err != nil {
			// Close, or the monitor vanished (killed) without its end.
			end(fmt.Errorf("attach: the task's monitor closed the session without its end: %w", err))
			return
		}
		switch typ {
		case monitor.FrameStdout:
			s.stdout.write(payload)
		case monitor.FrameStderr:
			if s.stderr != nil {
				s.stderr.write(payload)
			} else {
				s.stdout.write(payload)
			}
		case monitor.FrameEnd:
			end(io.EOF)
			s.conn.Close()
			return
		case monitor.FrameSlow:
			end(driver.ErrAttachSlow)
			s.conn.Close()
			return
		}
	}
}

func (s *attachSession) Stdin() io.WriteCloser {
	if s.stdin == nil {
		return nil
	}
	return s.stdin
}

func (s *attachSession) Stdout() io.Reader { return s.stdout }

func (s *attachSession) Stderr() io.Reader {
	if s.stderr == nil {
		return nil
	}
	return s.stderr
}

func (s *attachSession) Resize(size driver.TermSize) error {
	if !s.tty || size.Rows == 0 || size.Cols == 0 {
		return nil
	}
	return s.conn.Resize(size.Rows, size.Cols)
}

// Close detaches: the streams end (Stdout reads end of file), the task
// runs on with its stdin open.
func (s *attachSession) Close() error {
	s.closeOnce.Do(func() {
		s.stdout.close()
		if s.stderr != nil {
			s.stderr.close()
		}
		s.conn.Close()
	})
	return nil
}

// attachStdin writes the task's stdin through the session; its Close is
// the task's end of input.
type attachStdin struct {
	conn *monitor.AttachConn
	once sync.Once
}

func (w *attachStdin) Write(p []byte) (int, error) { return w.conn.WriteStdin(p) }

func (w *attachStdin) Close() error {
	var err error
	w.once.Do(func() { err = w.conn.CloseStdin() })
	return err
}

// streamPipeMax bounds what a session buffers of one stream its reader has
// not taken: beyond it the session stops reading the monitor, which then
// drops it (driver.ErrAttachSlow) rather than slow the task.
const streamPipeMax = 256 << 10

// streamPipe is one output stream of a session: buffered, so a reader
// slow on one stream does not stall the other at once.
type streamPipe struct {
	mu     sync.Mutex
	cond   *sync.Cond
	buf    []byte
	err    error // the end, read after buf
	closed bool  // the session was closed: reads end, writes are dropped
}

func newStreamPipe() *streamPipe {
	p := &streamPipe{}
	p.cond = sync.NewCond(&p.mu)
	return p
}

func (p *streamPipe) write(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.buf) >= streamPipeMax && !p.closed {
		p.cond.Wait()
	}
	if !p.closed {
		p.buf = append(p.buf, b...)
		p.cond.Broadcast()
	}
}

func (p *streamPipe) end(err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err == nil {
		p.err = err
	}
	p.cond.Broadcast()
}

func (p *streamPipe) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed, p.buf = true, nil
	p.cond.Broadcast()
}

func (p *streamPipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.buf) == 0 && p.err == nil && !p.closed {
		p.cond.Wait()
	}
	switch {
	case p.closed:
		return 0, io.EOF
	case len(p.buf) > 0:
		n := copy(b, p.buf)
		p.buf = p.buf[n:]
		if len(p.buf) == 0 {
			p.buf = nil
		}
		p.cond.Broadcast()
		return n, nil
	}
	return 0, p.err
}
