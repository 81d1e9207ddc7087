package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// Attach connects to the running workload ref's own standard streams (its
// terminal with tty, its stdin with stdin, its output from now on, after
// the newest earlier output with Logs). Detaching (Close of the session)
// leaves the workload running. Refused with a 409 (errdefs.StateError)
// when the workload does not run, a 400 for stdin on a workload submitted
// without it, errdefs.ErrNotImplemented when its driver cannot attach,
// and a 429 past the exec session limits (an attach session counts as
// one). Who may attach is the API's business: whoever may stop it.
func (a *Agent) Attach(ctx context.Context, ref string, req api.AttachRequest) (driver.AttachSession, error) {
	if req.Size != nil && (req.Size.Rows == 0 || req.Size.Cols == 0 || req.Size.Rows > maxTermDim || req.Size.Cols > maxTermDim) {
		return nil, errdefs.Invalid("size", "rows and cols must each be 1-%d", maxTermDim)
	}
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	w := r.Workload
	if err := notRunning(&w, "attach"); err != nil {
		return nil, err
	}
	if req.Stdin && !w.Spec.Stdin {
		return nil, errdefs.Invalid("stdin", "workload %s was submitted without stdin; attach without stdin to watch its output", w.ID)
	}
	drv, err := a.driverFor(w.Isolation)
	if err != nil {
		return nil, err
	}
	at, ok := drv.(driver.Attacher)
	if !ok {
		return nil, fmt.Errorf("the %s driver cannot attach: %w", w.Isolation, errdefs.ErrNotImplemented)
	}
	opts := driver.AttachOptions{Stdin: req.Stdin, Replay: req.Logs}
	if req.Size != nil {
		opts.Size = &driver.TermSize{Rows: req.Size.Rows, Cols: req.Size.Cols}
	}
	release, err := a.takeExecSlot(w.ID)
	if err != nil {
		return nil, err
	}
	sess, err := at.Attach(ctx, w.ID, opts)
	switch {
	case errors.Is(err, errdefs.ErrNotFound) || errors.Is(err, errdefs.ErrConflict):
		release()
		return nil, &errdefs.StateError{State: "exited", Msg: fmt.Sprintf("workload %s is no longer running; attach needs a running workload (%v)", w.ID, err)}
	case errors.Is(err, errdefs.ErrInvalidArgument):
		release()
		return nil, errdefs.Invalid("stdin", "%v", err)
	case err != nil:
		release()
		return nil, fmt.Errorf("attach to workload %s: %w", w.ID, err)
	}
	return &slotAttach{AttachSession: sess, release: release}, nil
}

type slotAttach struct {
	driver.AttachSession
	release func()
}

func (s *slotAttach) Close() error {
	err := s.AttachSession.Close()
	s.release()
	return err
}
