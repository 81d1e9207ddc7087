package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// Restart backoff: the delay doubles from Options.RestartBackoff with each
// restart of a crash-looping workload, up to backoffCap, so a broken
// workload costs the node little. A run that lasted backoffReset resets it.
const (
	backoffCap   = 5 * time.Minute
	backoffReset = 10 * time.Minute
)

// supervise runs a workload's lifecycle in its own goroutine: start, wait
// for the end, record it, restart when its policy says so.
func (a *Agent) supervise(id string) {
	a.mu.Lock()
	if _, running := a.sups[id]; running {
		a.mu.Unlock()
		return
	}
	done := make(chan struct{})
	a.sups[id] = done
	a.mu.Unlock()
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer func() {
			a.mu.Lock()
			delete(a.sups, id)
			a.mu.Unlock()
			close(done)
		}()
		a.run(id)
	}()
}

func (a *Agent) run(id string) {
	for a.ctx.Err() == nil {
		r, err := a.get(id)
		if err != nil {
			return // deleted
		}
		switch r.Workload.State {
		case api.StatePending:
			if !a.waitBackoff(r) {
				return
			}
			if !a.start(id) {
				return
			}
		case api.StateStarting, api.StateRunning, api.StateStopping:
			// Started by this loop or recovered after a restart: wait.
		default:
			return
		}
		if !a.waitExit(id) {
			return
		}
	}
}

// waitBackoff sleeps until a backed-off restart is due. It returns false
// when the agent is shutting down or the workload was stopped meanwhile.
func (a *Agent) waitBackoff(r *record) bool {
	for r.NextStart != nil && time.Now().Before(*r.NextStart) {
		_, changed := a.Index()
		timer := time.NewTimer(time.Until(*r.NextStart))
		select {
		case <-a.ctx.Done():
			timer.Stop()
			return false
		case <-changed:
			timer.Stop()
		case <-timer.C:
		}
		var err error
		if r, err = a.get(r.Workload.ID); err != nil || r.Workload.State != api.StatePending {
			return false
		}
	}
	return true
}

// start moves a pending workload through starting to running. It returns
// false when the workload did not start (failed, stopped, deleted).
func (a *Agent) start(id string) bool {
	r, err := a.mutate(id, func(r *record) error {
		if r.Workload.State != api.StatePending || r.StopRequested || r.Deleting {
			return errSkip
		}
		r.Workload.State = api.StateStarting
		r.NextStart = nil
		return nil
	})
	if err != nil || r.Workload.State != api.StateStarting {
		return false
	}
	d, err := a.driverFor(r.Workload.Isolation)
	if err == nil {
		var cfg *driver.TaskConfig
		cfg, err = a.taskConfig(a.ctx, &r.Workload)
		var netStatus *api.NetworkStatus
		if err == nil {
			cfg.Network, netStatus, err = a.attachNetwork(a.ctx, &r.Workload)
		}
		if err == nil {
			var h *driver.Handle
			h, err = d.Start(a.ctx, cfg)
			if err == nil {
				now := time.Now().UTC()
				_, cerr := a.mutate(id, func(r *record) error {
					r.Handle = h
					r.Workload.State = api.StateRunning
					r.Workload.StartedAt = &now
					r.Workload.Error = ""
					r.Workload.Network = netStatus
					return nil
				})
				if cerr != nil {
					a.log.Error("record started workload", "workload_id", id, "err", cerr)
				}
				a.log.Info("workload started", "workload_id", id, "isolation", r.Workload.Isolation)
				return true
			}
			a.noteDriverError(r.Workload.Isolation, err)
			// Nothing of a failed start may linger.
			if derr := d.Destroy(context.WithoutCancel(a.ctx), id); derr != nil {
				a.log.Warn("clean up failed start", "workload_id", id, "err", derr)
			}
		}
		if derr := a.detachNetwork(context.WithoutCancel(a.ctx), id); derr != nil {
			a.log.Warn("release the network of a failed start", "workload_id", id, "err", derr)
		}
	}
	if a.ctx.Err() != nil {
		// Shutting down mid-start: leave it starting; recovery resumes it.
		return false
	}
	a.log.Warn("workload failed to start", "workload_id", id, "err", err)
	a.finish(id, nil, err)
	return false
}

// waitExit waits for the workload's task to end and records how. It returns
// true when the workload goes round again (restart).
func (a *Agent) waitExit(id string) bool {
	r, err := a.get(id)
	if err != nil {
		return false
	}
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		a.finish(id, nil, err)
		return false
	}
	res, err := d.Wait(a.ctx, id)
	if a.ctx.Err() != nil {
		return false
	}
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			// Deleted underneath us.
			if _, gerr := a.get(id); gerr != nil {
				return false
			}
		}
		a.finish(id, nil, fmt.Errorf("lost track of the workload: %w", err))
		return false
	}
	return a.finish(id, res, nil)
}

// finish records the end of a run (res) or a failure to run (err), and
// decides on a restart. It returns true when the workload will restart.
func (a *Agent) finish(id string, res *driver.ExitResult, runErr error) bool {
	restart := false
	r, err := a.mutate(id, func(r *record) error {
		// A run ends once: a record already ended (say, by reconciliation
		// while its supervisor still waited) or waiting to restart keeps
		// what it has.
		if r.Deleting || r.Workload.State.Terminal() || r.Workload.State == api.StatePending {
			return errSkip
		}
		w := &r.Workload
		now := time.Now().UTC()
		w.FinishedAt = &now
		if w.Network != nil {
			// The address goes back to the pool with the run.
			w.Network = &api.NetworkStatus{Mode: w.Network.Mode}
		}
		w.OOMKilled = false
		if runErr != nil {
			w.State, w.Error, w.ExitCode = api.StateFailed, runErr.Error(), nil
		} else {
			code := res.ExitCode
			w.ExitCode = &code
			w.OOMKilled = res.OOMKilled
			if !res.FinishedAt.IsZero() {
				f := res.FinishedAt.UTC()
				w.FinishedAt = &f
			}
			switch {
			case res.Err != "":
				w.State, w.Error = api.StateFailed, res.Err
			case res.OOMKilled:
				w.State, w.Error = api.StateExited, fmt.Sprintf("killed by the kernel's OOM killer: the workload exceeded its memory limit of %d MiB", w.Spec.Resources.MemoryMB)
			default:
				w.State, w.Error = api.StateExited, ""
			}
		}
		restart = !r.StopRequested && shouldRestart(w)
		if restart {
			w.RestartCount++
			w.LastExitCode = w.ExitCode
			delay := backoff(w, a.opts.RestartBackoff)
			next := now.Add(delay)
			r.NextStart = &next
			w.State = api.StatePending
		}
		return nil
	})
	if err != nil {
		a.log.Error("record workload end", "workload_id", id, "err", err)
		return false
	}
	// The run is over: its address and ports go back to the node (a
	// restart gets them afresh).
	if err := a.detachNetwork(context.WithoutCancel(a.ctx), id); err != nil {
		a.log.Warn("release the network of an ended run", "workload_id", id, "err", err)
	}
	w := r.Workload
	if restart {
		a.log.Info("workload will restart", "workload_id", id, "restart_count", w.RestartCount, "at", r.NextStart)
		// The next run gets a fresh task; the logs (the agent's) stay.
		if d, err := a.driverFor(w.Isolation); err == nil {
			if err := d.Destroy(a.ctx, id); err != nil {
				a.log.Warn("remove the previous run's task", "workload_id", id, "err", err)
			}
		}
		return true
	}
	a.log.Info("workload ended", "workload_id", id, "state", w.State, "exit_code", derefInt(w.ExitCode), "error", w.Error)
	return false
}

func derefInt(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}

// shouldRestart applies the workload's restart policy to its last run.
func shouldRestart(w *api.Workload) bool {
	p := w.Spec.Restart
	if p.Policy == api.RestartNever || p.Policy == "" {
		return false
	}
	if p.MaxRetries > 0 && w.RestartCount >= p.MaxRetries {
		return false
	}
	failed := w.State == api.StateFailed || w.ExitCode == nil || *w.ExitCode != 0
	return p.Policy == api.RestartAlways || failed
}

// backoff is the delay before the next restart: exponential in the number
// of quick successive failures, capped, with jitter so that many workloads
// failing together do not restart in lockstep.
func backoff(w *api.Workload, base time.Duration) time.Duration {
	if w.StartedAt != nil && w.FinishedAt != nil && w.FinishedAt.Sub(*w.StartedAt) >= backoffReset {
		return base
	}
	d := base
	for i := 1; i < w.RestartCount && d < backoffCap; i++ {
		d *= 2
	}
	d = min(d, backoffCap)
	return d + time.Duration(rand.Int64N(int64(d/10)+1))
}

// ---- stop and delete ----------------------------------------------------

// Stop stops a workload: SIGTERM, then SIGKILL after timeout (0 means the
// agent's default). It returns once the workload has ended. A stopped
// workload is never restarted.
func (a *Agent) Stop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	if timeout <= 0 {
		timeout = a.opts.StopTimeout
	}
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	id := r.Workload.ID
	r, err = a.mutate(id, func(r *record) error {
		if r.Workload.State.Terminal() && r.StopRequested {
			return errSkip
		}
		r.StopRequested = true
		switch r.Workload.State {
		case api.StatePending:
			// Never started (or waiting to restart): it ends here.
			now := time.Now().UTC()
			r.Workload.State, r.Workload.FinishedAt, r.NextStart = api.StateExited, &now, nil
			if r.Workload.ExitCode == nil {
				r.Workload.Error = "stopped before it started"
			}
		case api.StateRunning:
			r.Workload.State = api.StateStopping
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for !r.Workload.State.Terminal() {
		if r.Workload.State == api.StateStopping || r.Workload.State == api.StateRunning {
			d, err := a.driverFor(r.Workload.Isolation)
			if err != nil {
				return nil, err
			}
			if err := d.Stop(ctx, id, timeout); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
				return nil, fmt.Errorf("stop workload %s: %w", id, err)
			}
		}
		// The supervisor records the end; wait for it (or for a start in
		// progress to finish, after which the loop stops it).
		if r, err = a.waitChange(ctx, id, r.Workload.ModifyIndex); err != nil {
			return nil, err
		}
		if r.Workload.State == api.StateRunning {
			if r, err = a.mutate(id, func(r *record) error {
				if r.Workload.State != api.StateRunning {
					return errSkip
				}
				r.Workload.State = api.StateStopping
				return nil
			}); err != nil {
				return nil, err
			}
		}
	}
	w := cloneWorkload(r.Workload)
	return &w, nil
}

// waitChange blocks until the workload's record is newer than index.
func (a *Agent) waitChange(ctx context.Context, id string, index uint64) (*record, error) {
	for {
		_, changed := a.Index()
		r, err := a.get(id)
		if err != nil {
			return nil, err
		}
		if r.Workload.ModifyIndex > index {
			return r, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Delete removes a workload and everything it left on the node: its task
// (bundle, rootfs layer, cgroup, domain, disks), its logs and its record.
// A workload that still runs is refused unless force, which kills it.
func (a *Agent) Delete(ctx context.Context, ref string, force bool) error {
	r, err := a.get(ref)
	if err != nil {
		return err
	}
	id := r.Workload.ID
	_, err = a.mutate(id, func(r *record) error {
		if !r.Workload.State.Terminal() && !force {
			return fmt.Errorf("workload %s is %s; stop it first or delete with force: %w", id, r.Workload.State, errdefs.ErrFailedPrecondition)
		}
		r.Deleting, r.StopRequested = true, true
		return nil
	})
	if err != nil {
		return err
	}
	return a.finishDelete(ctx, id)
}

// finishDelete does the work of a delete whose intent is already on disk,
// so a crash in the middle is finished after restart.
func (a *Agent) finishDelete(ctx context.Context, id string) error {
	a.mu.Lock()
	r := a.recs[id]
	sup := a.sups[id]
	a.mu.Unlock()
	if r == nil {
		return nil
	}
	if d, err := a.driverFor(r.Workload.Isolation); err == nil {
		if err := d.Destroy(ctx, id); err != nil {
			return fmt.Errorf("delete workload %s: %w", id, err)
		}
	}
	if sup != nil {
		select {
		case <-sup:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err := a.detachNetwork(ctx, id); err != nil {
		return fmt.Errorf("delete workload %s: release its network: %w", id, err)
	}
	if err := os.RemoveAll(a.logDir(id)); err != nil {
		return fmt.Errorf("delete logs of %s: %w", id, err)
	}
	if err := a.removeRecord(id); err != nil {
		return err
	}
	a.log.Info("workload deleted", "workload_id", id)
	return nil
}

// ---- recovery -----------------------------------------------------------

// recover loads the store and re-attaches every workload to its driver.
func (a *Agent) recover(ctx context.Context) error {
	recs, index, err := a.store.loadAll()
	if err != nil {
		return err
	}
	// Index 0 means "do not block" to clients: a fresh node starts at 1.
	a.index = max(index, 1)
	for _, r := range recs {
		a.recs[r.Workload.ID] = r
		if r.Workload.Name != "" && !r.Deleting {
			a.names[r.Workload.Name] = r.Workload.ID
		}
	}
	var deletes []string
	for _, r := range recs {
		id := r.Workload.ID
		switch {
		case r.Deleting:
			deletes = append(deletes, id)
		case r.Workload.State == api.StatePending:
			a.supervise(id)
		case r.Workload.State == api.StateStarting, r.Workload.State == api.StateRunning, r.Workload.State == api.StateStopping:
			a.reattach(ctx, r)
		}
	}
	// Interrupted deletes and the first reconciliation can take a while
	// (killing what is left, waiting for monitors): they run in the
	// background so the API is up at once. Deleting records are hidden
	// from it already.
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		defer close(a.recovered)
		for _, id := range deletes {
			if err := a.finishDelete(a.ctx, id); err != nil && a.ctx.Err() == nil {
				a.log.Warn("finish interrupted delete", "workload_id", id, "err", err)
			}
		}
		a.Reconcile(a.ctx)
	}()
	a.log.Info("state recovered", "workloads", len(recs), "index", a.index)
	return nil
}

func (a *Agent) reattach(ctx context.Context, r *record) {
	id := r.Workload.ID
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		a.finish(id, nil, fmt.Errorf("its %s driver is not available after the agent restarted", r.Workload.Isolation))
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
			now := time.Now().UTC()
			_, _ = a.mutate(id, func(r *record) error {
				r.Workload.State, r.Workload.StartedAt = api.StateRunning, &now
				return nil
			})
		}
		a.supervise(id)
		if r.StopRequested {
			go func() {
				if _, err := a.Stop(a.ctx, id, 0); err != nil && a.ctx.Err() == nil {
					a.log.Warn("resume interrupted stop", "workload_id", id, "err", err)
				}
			}()
		}
	case errors.Is(err, errdefs.ErrNotFound) && r.Workload.State == api.StateStarting:
		// The agent died before the driver made anything: start afresh.
		_, _ = a.mutate(id, func(r *record) error {
			r.Workload.State = api.StatePending
			return nil
		})
		a.supervise(id)
	default:
		a.finish(id, nil, fmt.Errorf("the workload's task could not be found after the agent restarted: %w", err))
	}
}
