package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/attachio"
)

var _ driver.Attacher = (*Driver)(nil)

// attachEndWait bounds how long a session whose exec channel closed
// waits to learn whether that was the VM's end (its output then simply
// ends) or the channel's failure (an error).
const attachEndWait = 10 * time.Second

// Attach implements driver.Attacher: berth-init holds the main process's
// terminal or stdin pipe and fans its output out (guest.Console); the
// session travels over the VM's exec channel like an exec session.
func (d *Driver) Attach(ctx context.Context, id string, opts driver.AttachOptions) (driver.AttachSession, error) {
	t, err := d.runningTask(id)
	if err != nil {
		return nil, err
	}
	switch {
	case t.Data.WholeDisk != "":
		return nil, fmt.Errorf("vm task %s boots a whole-disk image, which runs no berth-init to attach to: %w", id, errdefs.ErrNotImplemented)
	case !t.Data.Attach:
		return nil, fmt.Errorf("vm task %s was started by an older berth whose berth-init cannot be attached to; restart the workload to attach to it: %w", id, errdefs.ErrConflict)
	case opts.Stdin && !t.Data.Stdin:
		return nil, fmt.Errorf("vm task %s was started without stdin: attach without it: %w", id, errdefs.ErrInvalidArgument)
	}
	c, err := d.execClient(ctx, t)
	if err != nil {
		return nil, err
	}
	req := &guest.AttachRequest{Stdin: opts.Stdin, Replay: opts.Replay}
	if opts.Size != nil {
		req.Rows, req.Cols = opts.Size.Rows, opts.Size.Cols
	}
	s, err := c.Attach(ctx, req, t.Data.TTY)
	if err != nil {
		return nil, d.execError(t, err)
	}
	return &attachSession{d: d, t: t, s: s, stdin: opts.Stdin, tty: t.Data.TTY}, nil
}

// attachSession adapts an attach session of the exec channel to the
// driver contract.
type attachSession struct {
	d      *Driver
	t      *task
	s      *guest.ExecSession
	stdin  bool
	tty    bool
	closed atomic.Bool
}

func (a *attachSession) Stdin() io.WriteCloser {
	if !a.stdin {
		return nil
	}
	return a.s.Stdin()
}

func (a *attachSession) Stdout() io.Reader { return attachOutput{a, a.s.Stdout()} }

func (a *attachSession) Stderr() io.Reader {
	if a.tty {
		return nil
	}
	return attachOutput{a, a.s.Stderr()}
}

func (a *attachSession) Resize(sz driver.TermSize) error {
	if err := a.s.Resize(sz.Rows, sz.Cols); err != nil {
		return fmt.Errorf("vm task %s: resize: %w", a.t.ID, err)
	}
	return nil
}

// Close detaches: berth-init forgets the session, the task runs on.
func (a *attachSession) Close() error {
	a.closed.Store(true)
	return a.s.Close()
}

type attachOutput struct {
	a *attachSession
	r io.Reader
}

// Read maps the channel's ends to the contract's: end of file after a
// Close or once the task ended, driver.ErrAttachSlow for a session
// berth-init ended because it fell behind.
func (o attachOutput) Read(p []byte) (int, error) {
	n, err := o.r.Read(p)
	if err == nil || err == io.EOF {
		return n, err
	}
	a := o.a
	switch {
	case a.closed.Load():
		return n, io.EOF
	case errors.Is(err, attachio.ErrSlow):
		return n, fmt.Errorf("vm task %s: %w", a.t.ID, driver.ErrAttachSlow)
	case errors.Is(err, guest.ErrExecChannelClosed):
		// The VM ending (forced off, say) closes the channel before
		// berth-init could end the session: that is the task's end.
		timer := time.NewTimer(attachEndWait)
		defer timer.Stop()
		select {
		case <-a.t.Done():
			return n, io.EOF
		case <-a.d.ctx.Done():
		case <-timer.C:
		}
	}
	return n, fmt.Errorf("vm task %s: attach session: %w", a.t.ID, err)
}
