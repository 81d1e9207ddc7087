package agent

import (
	"context"
	"time"

	"github.com/berthd/berth/api"
)

// Stop stops a workload: SIGTERM, then SIGKILL after timeout (0 means the
// agent's default), and returns once it has ended or ctx ends. The stop is
// the agent's once asked: it goes on when the caller stops waiting, and
// after an agent restart with what is left of its grace period. A stopped
// workload is never restarted.
func (a *Agent) Stop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	r, err := a.requestStop(ref, timeout)
	if err != nil {
		return nil, err
	}
	r, err = a.waitRecord(ctx, r.Workload.ID, func(r *record) bool { return r.Workload.State.Terminal() })
	if err != nil {
		return nil, err
	}
	w := cloneWorkload(r.Workload)
	return &w, nil
}

// RequestStop is Stop without the wait: it returns the workload as soon
// as the stop is recorded.
func (a *Agent) RequestStop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	r, err := a.requestStop(ref, timeout)
	if err != nil {
		return nil, err
	}
	w := cloneWorkload(r.Workload)
	return &w, nil
}

// requestStop persists a stop (when it was asked, its grace period) and
// hands it to the workload's supervisor; a start in progress is cancelled.
func (a *Agent) requestStop(ref string, timeout time.Duration) (*record, error) {
	if timeout <= 0 {
		timeout = a.opts.StopTimeout
	}
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	id := r.Workload.ID
	now := time.Now().UTC()
	r, err = a.mutate(id, func(r *record) error {
		if r.Deleting {
			return errSkip // the delete ends it
		}
		if r.Workload.State.Terminal() {
			if r.StopRequested {
				return errSkip
			}
			// Nothing to stop; it only must not restart (it cannot).
			r.StopRequested = true
			return nil
		}
		if r.StopRequested && !now.Add(timeout).Before(r.stopDeadline(a.opts.StopTimeout)) {
			return errSkip // an earlier stop's deadline comes first
		}
		r.StopRequested = true
		r.StopAt, r.StopGrace = &now, timeout
		switch r.Workload.State {
		case api.StatePending:
			// Never started (or waiting to restart): it ends here.
			r.Workload.State, r.Workload.FinishedAt, r.NextStart = api.StateExited, &now, nil
			if r.Workload.ExitCode == nil {
				r.Workload.Error = msgStoppedBeforeStart
			}
		case api.StateRunning:
			r.Workload.State = api.StateStopping
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if r.Workload.State == api.StateStarting {
		a.cancelStart(id)
	}
	return r, nil
}

// stopDeadline is when a requested stop turns to force: its grace period
// after it was asked (def when the record does not say).
func (r *record) stopDeadline(def time.Duration) time.Time {
	grace := r.StopGrace
	if grace <= 0 {
		grace = def
	}
	if r.StopAt == nil {
		return time.Now().Add(grace)
	}
	return r.StopAt.Add(grace)
}

// cancelStart aborts the workload's start in progress, if there is one.
func (a *Agent) cancelStart(id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if s := a.sups[id]; s != nil && s.cancelStart != nil {
		s.cancelStart()
	}
}
