package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// recover loads the store and re-attaches every workload to its driver.
func (a *Agent) recover(ctx context.Context) error {
	recs, index, err := a.store.loadAll()
	if err != nil {
		return err
	}
	// Index 0 means "do not block" to clients: a fresh node starts at 1.
	a.index = max(index, 1)
	a.indexNow.Store(&indexState{index: a.index, changed: make(chan struct{})})
	for _, r := range recs {
		r.Workload.Deleting = r.Deleting
		a.recs[r.Workload.ID] = r
	}
	// Names go to live workloads first: a workload being deleted keeps its
	// name only while no other holds it (an older agent let a new
	// workload take the name of one being deleted).
	for _, deleting := range []bool{false, true} {
		for _, r := range recs {
			if r.Deleting == deleting {
				a.bindNameLocked(r)
			}
		}
	}
	for _, r := range recs {
		switch r.Workload.State {
		case api.StateStarting, api.StateRunning, api.StateStopping:
			if !r.Deleting {
				a.reattach(ctx, r)
				continue
			}
		case api.StatePending:
			if !r.Deleting && a.releaseUnstarted(ctx, r) {
				continue
			}
		}
		if needsSupervisor(r) {
			// Pending ones start (or wait for their backoff), deletes
			// that were interrupted go on, in the background.
			a.supervise(r.Workload.ID)
		}
	}
	// The first reconciliation can take a while (killing what is left):
	// it runs in the background so the API is up at once.
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer close(a.recovered)
		a.Reconcile(a.ctx)
	}()
	index, _ = a.Index()
	a.log.Info("state recovered", "workloads", len(recs), "index", index)
	return nil
}

// reattach finds a workload's task again after the agent restarted:
//
//   - a task that is there is supervised again (a start that was
//     interrupted after the driver made it counts as started, and a stop
//     that was asked goes on with what is left of its grace period);
//   - a start that was interrupted before the driver made anything
//     (ErrNotFound) starts afresh, once, unless a stop was asked;
//   - a task of an earlier boot of the node (ErrRebooted) is dead: the
//     run ends failed with "node rebooted", and a restart policy starts
//     the workload again; so is a run that started in an earlier boot
//     and whose task the driver no longer has (its runtime files were on
//     a tmpfs the reboot emptied);
//   - anything else ends the run failed with the driver's reason.
func (a *Agent) reattach(ctx context.Context, r *record) {
	id, run := r.Workload.ID, r.Workload.RestartCount
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		a.finish(id, run, nil, fmt.Errorf("its %s driver is not available after the agent restarted", r.Workload.Isolation))
		return
	}
	h := r.Handle
	if h == nil {
		h = &driver.Handle{ID: id, Driver: d.Name()}
	}
	err = d.Recover(ctx, h)
	switch {
	case err == nil:
		a.log.Info("workload re-attached", "workload_id", id, "state", r.Workload.State)
		if r.Workload.State == api.StateStarting {
			if st, err := d.Inspect(ctx, id); err == nil && st.State == driver.TaskExited && st.StartedAt.IsZero() {
				// The driver made the task, and it ended without ever
				// running: its start was called off by the stop (or the
				// delete) asked meanwhile, or it failed by itself.
				if r.StopRequested {
					a.endStopped(id, msgStoppedStarting)
					return
				}
				reason := "the start failed"
				if st.Exit != nil && st.Exit.Err != "" {
					reason = st.Exit.Err
				}
				a.finish(id, run, nil, errors.New(reason))
				return
			}
			a.settleStarted(ctx, r)
		}
		a.supervise(id)
	case errors.Is(err, driver.ErrRebooted):
		a.log.Warn("workload's task belongs to an earlier boot of the node", "workload_id", id, "err", err)
		a.finish(id, run, nil, driver.ErrRebooted)
	case errors.Is(err, errdefs.ErrNotFound) && r.Workload.State == api.StateStarting:
		if r.StopRequested {
			a.endStopped(id, msgStoppedStarting)
			return
		}
		if a.startedInAnEarlierBoot(r) {
			// The node rebooted during the start. What the driver made
			// is not kept across a power loss (only the record is), so
			// finding nothing does not mean nothing ran: the run ends as
			// one the reboot ended, and the restart policy decides.
			a.log.Warn("the node rebooted while the workload was starting", "workload_id", id)
			a.finish(id, run, nil, driver.ErrRebooted)
			return
		}
		// The agent died before the driver made anything: start afresh.
		_, _ = a.mutate(id, func(r *record) error {
			if r.Workload.State != api.StateStarting {
				return errSkip
			}
			r.Workload.State = api.StatePending
			return nil
		})
	case errors.Is(err, errdefs.ErrNotFound) && a.startedInAnEarlierBoot(r):
		// The run's task went with the reboot, its runtime files too.
		a.log.Warn("workload's task belongs to an earlier boot of the node, which took it", "workload_id", id)
		a.finish(id, run, nil, driver.ErrRebooted)
	default:
		a.finish(id, run, nil, fmt.Errorf("the workload's task could not be found after the agent restarted: %w", err))
	}
}

// startedInAnEarlierBoot reports whether r's current run started before
// the node's last boot.
func (a *Agent) startedInAnEarlierBoot(r *record) bool {
	return r.StartBoot != "" && a.opts.BootID != "" && r.StartBoot != a.opts.BootID
}

// releaseUnstarted releases what a start prepared for a workload that is
// pending on disk: the agent died while the start's record was on its way
// to disk, before the driver ran anything of it (the driver waits for that
// record first). It reports true when the driver holds a live task of it
// after all, which no start leaves (every agent has recorded starting
// before its driver ran anything): should one be there, it is re-attached
// as an interrupted start, never started a second time.
func (a *Agent) releaseUnstarted(ctx context.Context, r *record) bool {
	if r.Handle != nil {
		return false // the previous run's task: the next start releases it
	}
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		return false
	}
	err = d.Recover(ctx, &driver.Handle{ID: r.Workload.ID, Driver: d.Name()})
	switch {
	case err == nil:
		a.log.Warn("a pending workload's task runs; re-attached as started", "workload_id", r.Workload.ID)
		started, merr := a.mutate(r.Workload.ID, func(r *record) error {
			if r.Workload.State != api.StatePending {
				return errSkip
			}
			r.Workload.State = api.StateStarting
			return nil
		})
		if merr != nil || started.Workload.State != api.StateStarting {
			return false
		}
		a.reattach(ctx, started)
		return true
	case errors.Is(err, errdefs.ErrNotFound), errors.Is(err, driver.ErrRebooted):
		// Nothing of it ran; the driver removed what was prepared.
	default:
		a.log.Warn("release what an interrupted start prepared", "workload_id", r.Workload.ID, "err", err)
	}
	return false
}

// settleStarted records as running a workload whose start was interrupted
// after its driver made the task, with its network status (attaching again
// returns the attachment the start made).
func (a *Agent) settleStarted(ctx context.Context, r *record) {
	var netStatus *api.NetworkStatus
	if r.Workload.Network != nil && r.Workload.Network.Mode == api.NetworkBridge {
		if _, st, err := a.attachNetwork(ctx, &r.Workload); err == nil {
			netStatus = st
		} else {
			a.log.Warn("read the network of a re-attached workload", "workload_id", r.Workload.ID, "err", err)
		}
	}
	now := time.Now().UTC()
	_, err := a.mutate(r.Workload.ID, func(r *record) error {
		if r.Workload.State != api.StateStarting {
			return errSkip
		}
		r.Workload.State = api.StateRunning
		if r.StopRequested {
			r.Workload.State = api.StateStopping
		}
		if r.Workload.StartedAt == nil {
			r.Workload.StartedAt = &now
		}
		if netStatus != nil {
			r.Workload.Network = netStatus
		}
		return nil
	})
	if err != nil {
		a.log.Error("record re-attached workload", "workload_id", r.Workload.ID, "err", err)
	}
}
