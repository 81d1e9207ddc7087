package fake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/attachio"
	"github.com/berthd/berth/internal/ptyio"
)

var _ driver.Attacher = (*Driver)(nil)

// attachBacklog is how far an attached session may fall behind.
const attachBacklog = 1 << 20

// Attach implements driver.Attacher.
func (d *Driver) Attach(ctx context.Context, id string, opts driver.AttachOptions) (driver.AttachSession, error) {
	if err := d.record(ctx, "Attach", id); err != nil {
		return nil, err
	}
	t, err := d.running(id)
	if err != nil {
		return nil, err
	}
	if opts.Stdin && t.stdin == nil {
		return nil, fmt.Errorf("fake task %s was started without stdin: %w", id, errdefs.ErrInvalidArgument)
	}
	s := &attachSession{t: t, stdout: subReader{t.stdoutHub.Subscribe(opts.Replay)}}
	if t.stderrHub != nil {
		s.stderr = subReader{t.stderrHub.Subscribe(opts.Replay)}
	}
	if opts.Stdin {
		s.stdin = &taskStdin{t: t}
	}
	if opts.Size != nil {
		_ = s.Resize(*opts.Size)
	}
	return s, nil
}

type attachSession struct {
	t              *task
	stdin          *taskStdin
	stdout, stderr io.Reader
	once           sync.Once
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
	if s.t.pty == nil {
		return nil
	}
	return ptyio.Resize(s.t.pty, size.Rows, size.Cols)
}

func (s *attachSession) Close() error {
	s.once.Do(func() {
		for _, r := range []io.Reader{s.stdout, s.stderr} {
			if sr, ok := r.(subReader); ok {
				sr.Close()
			}
		}
	})
	return nil
}

// subReader reads a hub subscription: a detached session's reads end
// with end of file, a dropped one's with driver.ErrAttachSlow.
type subReader struct{ *attachio.Sub }

func (r subReader) Read(p []byte) (int, error) {
	n, err := r.Sub.Read(p)
	switch {
	case errors.Is(err, attachio.ErrSlow):
		err = driver.ErrAttachSlow
	case errors.Is(err, io.ErrClosedPipe):
		err = io.EOF
	}
	return n, err
}

// taskStdin writes to the task's own stdin; its Close closes it for every
// session.
type taskStdin struct{ t *task }

func (w *taskStdin) Write(p []byte) (int, error) {
	w.t.stdinMu.Lock()
	defer w.t.stdinMu.Unlock()
	return w.t.stdin.Write(p)
}

func (w *taskStdin) Close() error {
	w.t.stdinMu.Lock()
	defer w.t.stdinMu.Unlock()
	return w.t.stdin.Close()
}

// waitCopiers waits for a task's output copiers, at most d.
func waitCopiers(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}
