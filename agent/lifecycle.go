package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"sync"
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

// retryCap bounds the delay between two attempts of a stop or a delete
// that failed in its driver: they are retried until they succeed.
const retryCap = time.Minute

// Messages of workloads that a stop ended before they ran.
const (
	msgStoppedBeforeStart = "stopped before it started"
	msgStoppedStarting    = "stopped while it was starting"
)

// supervisor is the one goroutine that drives a workload: it starts it,
// waits for its end, restarts it, enforces a requested stop and carries
// out a delete. Requests (Stop, Delete) and other deciders (recovery,
// reconciliation) only persist an intent in the record; every commit of a
// record with work left wakes its supervisor (commitLocked), so none is
// left unattended and none depends on the request that asked.
type supervisor struct {
	// kick wakes the supervisor to look at its record again.
	kick chan struct{}
	// cancelStart aborts the start in progress (nil when there is none);
	// guarded by Agent.mu.
	cancelStart context.CancelFunc
}

// needsSupervisor reports whether a record has work left for a supervisor.
func needsSupervisor(r *record) bool {
	return r.Deleting || !r.Workload.State.Terminal()
}

// supervise makes sure the workload has a supervisor, and wakes it.
func (a *Agent) supervise(id string) {
	a.mu.Lock()
	if s, ok := a.sups[id]; ok {
		select {
		case s.kick <- struct{}{}:
		default:
		}
		a.mu.Unlock()
		return
	}
	if a.ctx.Err() != nil {
		// Shutting down: recovery picks the work up after the restart.
		a.mu.Unlock()
		return
	}
	s := &supervisor{kick: make(chan struct{}, 1)}
	a.sups[id] = s
	a.wg.Add(1)
	a.mu.Unlock()
	go func() {
		defer a.wg.Done()
		for {
			a.run(id, s)
			// A change committed while run was deciding to return finds
			// this supervisor still registered and only kicks it: look
			// once more under the lock before leaving.
			a.mu.Lock()
			r := a.recs[id]
			if a.ctx.Err() == nil && r != nil && needsSupervisor(r) {
				a.mu.Unlock()
				continue
			}
			delete(a.sups, id)
			a.mu.Unlock()
			return
		}
	}()
}

// run drives the workload until it has ended for good, is gone, or the
// agent shuts down.
func (a *Agent) run(id string, s *supervisor) {
	for a.ctx.Err() == nil {
		r := a.record(id)
		if r == nil {
			return
		}
		switch {
		case r.Deleting:
			a.deleteWork(id)
		case r.Workload.State == api.StatePending:
			if a.waitBackoff(id, s) {
				a.start(id, s)
			}
		case r.Workload.State == api.StateRunning, r.Workload.State == api.StateStopping:
			a.waitExit(id, s)
		case r.Workload.State == api.StateStarting:
			// Only a supervisor starts, and recovery settles a record
			// left starting before it supervises it: wait for a change.
			select {
			case <-s.kick:
			case <-a.ctx.Done():
			}
		default:
			return // ended
		}
	}
}

// waitBackoff sleeps until a backed-off restart is due. It returns false
// when the workload is no longer waiting to start (stopped, deleted) or the
// agent shuts down.
func (a *Agent) waitBackoff(id string, s *supervisor) bool {
	for {
		r := a.record(id)
		if r == nil || r.Deleting || r.Workload.State != api.StatePending || a.ctx.Err() != nil {
			return false
		}
		if r.NextStart == nil || !time.Now().Before(*r.NextStart) {
			return true
		}
		timer := time.NewTimer(time.Until(*r.NextStart))
		select {
		case <-a.ctx.Done():
		case <-s.kick:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// runLock serializes the transitions of one workload's runs that are not
// all made by its supervisor: a run's end recorded by recovery or
// reconciliation releases the run's network and task before the next
// start may make new ones.
type runLock struct {
	sync.Mutex
	refs int
}

func (a *Agent) lockRun(id string) (unlock func()) {
	a.mu.Lock()
	l := a.runs[id]
	if l == nil {
		l = &runLock{}
		a.runs[id] = l
	}
	l.refs++
	a.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		a.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(a.runs, id)
		}
		a.mu.Unlock()
	}
}

// start moves a pending workload through starting to running. The start
// has its own context, which a stop or a delete cancels: the driver then
// aborts it and removes what it made.
func (a *Agent) start(id string, s *supervisor) {
	unlock := a.lockRun(id)
	defer unlock()
	sctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	a.mu.Lock()
	s.cancelStart = cancel
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		s.cancelStart = nil
		a.mu.Unlock()
	}()
	r, err := a.mutate(id, func(r *record) error {
		if r.Workload.State != api.StatePending || r.StopRequested || r.Deleting {
			return errSkip
		}
		r.Workload.State = api.StateStarting
		r.NextStart = nil
		return nil
	})
	if err != nil || r.Workload.State != api.StateStarting {
		return
	}
	run := r.Workload.RestartCount
	d, err := a.driverFor(r.Workload.Isolation)
	if err == nil {
		if r.Handle != nil {
			// The previous run's task is released before the next is made
			// (a run's end normally does that; a crash may not have).
			if err := d.Destroy(sctx, id); err != nil {
				a.log.Warn("remove the previous run's task", "workload_id", id, "err", err)
			}
		}
		var cfg *driver.TaskConfig
		cfg, err = a.taskConfig(sctx, &r.Workload)
		var netStatus *api.NetworkStatus
		if err == nil {
			cfg.Network, netStatus, err = a.attachNetwork(sctx, &r.Workload)
		}
		if err == nil {
			var h *driver.Handle
			h, err = d.Start(sctx, cfg)
			if err == nil {
				now := time.Now().UTC()
				_, cerr := a.mutate(id, func(r *record) error {
					r.Handle = h
					r.Workload.State = api.StateRunning
					if r.StopRequested {
						// Asked to stop while it started: its supervisor
						// stops it next.
						r.Workload.State = api.StateStopping
					}
					r.Workload.StartedAt = &now
					r.Workload.Error = ""
					r.Workload.Network = netStatus
					return nil
				})
				if cerr != nil {
					a.log.Error("record started workload", "workload_id", id, "err", cerr)
				}
				a.log.Info("workload started", "workload_id", id, "isolation", r.Workload.Isolation)
				return
			}
			if sctx.Err() == nil {
				a.noteDriverError(r.Workload.Isolation, err)
			}
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
		return
	}
	if cur := a.record(id); cur != nil && (cur.StopRequested || cur.Deleting) {
		// A stop or a delete cancelled the start: that is how it ends.
		a.log.Info("workload stopped while it was starting", "workload_id", id)
		a.endStopped(id, msgStoppedStarting)
		return
	}
	a.log.Warn("workload failed to start", "workload_id", id, "err", err)
	a.unlockedFinish(id, run, nil, err)
}

// endStopped ends a workload that a stop caught before it ran: exited,
// with no exit code and msg as the reason.
func (a *Agent) endStopped(id, msg string) {
	_, err := a.mutate(id, func(r *record) error {
		if r.Deleting || r.Workload.State.Terminal() {
			return errSkip
		}
		now := time.Now().UTC()
		w := &r.Workload
		w.State, w.FinishedAt, r.NextStart = api.StateExited, &now, nil
		w.ExitCode, w.Error = nil, msg
		if w.Network != nil {
			w.Network = &api.NetworkStatus{Mode: w.Network.Mode}
		}
		return nil
	})
	if err != nil {
		a.log.Error("record stopped workload", "workload_id", id, "err", err)
	}
}

// waitExit waits for the run's task to end and records how. Meanwhile it
// carries out a requested stop: the driver gets the stop with what is left
// of its grace period (the driver then owns the deadline), a stop that
// fails in the driver is retried, and a stop asked again with an earlier
// deadline is passed on. It returns early when the run is no longer its
// business (deleted, ended by someone else) or the agent shuts down.
func (a *Agent) waitExit(id string, s *supervisor) {
	r := a.record(id)
	if r == nil {
		return
	}
	run := r.Workload.RestartCount
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		a.finish(id, run, nil, err)
		return
	}
	done := make(chan struct{})
	defer close(done)
	wctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	type waited struct {
		res *driver.ExitResult
		err error
	}
	waitc := make(chan waited, 1)
	go func() {
		res, err := d.Wait(wctx, id)
		waitc <- waited{res, err}
	}()
	var (
		stopc    = make(chan error)
		inflight int       // stops asked of the driver and not answered yet
		asked    time.Time // the earliest deadline the driver was given
		ended    bool      // the driver said the task has ended
		retry    <-chan time.Time
		fails    int
	)
	for {
		r := a.record(id)
		if r == nil || r.Deleting || r.Workload.RestartCount != run ||
			(r.Workload.State != api.StateRunning && r.Workload.State != api.StateStopping) {
			return
		}
		if r.StopRequested && !ended && retry == nil {
			deadline := r.stopDeadline(a.opts.StopTimeout)
			if asked.IsZero() || deadline.Before(asked) {
				asked = deadline
				inflight++
				grace := max(time.Until(deadline), 0)
				a.wg.Add(1)
				go func() {
					defer a.wg.Done()
					err := d.Stop(a.ctx, id, grace)
					select {
					case stopc <- err:
					case <-done:
					}
				}()
			}
		}
		select {
		case w := <-waitc:
			if a.ctx.Err() != nil {
				return
			}
			if w.err != nil {
				if cur := a.record(id); cur == nil || cur.Deleting {
					return
				}
				a.finish(id, run, nil, fmt.Errorf("lost track of the workload: %w", w.err))
				return
			}
			a.finish(id, run, w.res, nil)
			return
		case err := <-stopc:
			inflight--
			switch {
			case err == nil, errors.Is(err, errdefs.ErrNotFound):
				ended = true
			case a.ctx.Err() != nil:
				return
			case inflight == 0:
				// Every stop in flight has failed: ask again later.
				fails++
				a.noteDriverError(r.Workload.Isolation, err)
				delay := retryDelay(a.opts.RestartBackoff, fails)
				a.log.Warn("stop failed; retrying", "workload_id", id, "err", err, "retry_in", delay)
				asked = time.Time{}
				retry = time.After(delay)
			}
		case <-retry:
			retry = nil
		case <-s.kick:
		case <-a.ctx.Done():
			return
		}
	}
}

// retryDelay is the delay before attempt n+1 of an operation that failed n
// times: doubling from base, capped at retryCap.
func retryDelay(base time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n && d < retryCap; i++ {
		d *= 2
	}
	return min(d, retryCap)
}

// finish records the end of run (res) or a failure to run (err), and
// decides on a restart; a restart is picked up by the workload's
// supervisor (commitLocked wakes or starts it). run is the restart count
// of the run that ended, so an end observed late never ends the next run.
// It returns true when the workload will restart.
func (a *Agent) finish(id string, run int, res *driver.ExitResult, runErr error) bool {
	unlock := a.lockRun(id)
	defer unlock()
	return a.unlockedFinish(id, run, res, runErr)
}

// unlockedFinish is finish for a caller that holds the run's lock.
func (a *Agent) unlockedFinish(id string, run int, res *driver.ExitResult, runErr error) bool {
	ending := func(r *record) bool {
		// A run ends once: a record already ended (say, by reconciliation
		// while its supervisor still waited) or waiting to restart keeps
		// what it has.
		return !r.Deleting && !r.Workload.State.Terminal() && r.Workload.State != api.StatePending && r.Workload.RestartCount == run
	}
	cur := a.record(id)
	if cur == nil || !ending(cur) {
		return false
	}
	// The run is over: its address and ports go back to the node, and a
	// run that restarts loses its task, before the end is recorded, so
	// the next start never races with the release of this run.
	if err := a.detachNetwork(context.WithoutCancel(a.ctx), id); err != nil {
		a.log.Warn("release the network of an ended run", "workload_id", id, "err", err)
	}
	if probe := cur.clone(); !probe.StopRequested {
		endRun(&probe.Workload, res, runErr, time.Now().UTC())
		if shouldRestart(&probe.Workload) {
			if d, err := a.driverFor(cur.Workload.Isolation); err == nil {
				if err := d.Destroy(context.WithoutCancel(a.ctx), id); err != nil {
					a.log.Warn("remove the previous run's task", "workload_id", id, "err", err)
				}
			}
		}
	}
	restart := false
	r, err := a.mutate(id, func(r *record) error {
		if !ending(r) {
			return errSkip
		}
		w := &r.Workload
		now := time.Now().UTC()
		endRun(w, res, runErr, now)
		restart = !r.StopRequested && shouldRestart(w)
		if restart {
			w.RestartCount++
			w.LastExitCode = w.ExitCode
			r.Handle = nil // its task is gone
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
	w := r.Workload
	if restart {
		a.log.Info("workload will restart", "workload_id", id, "restart_count", w.RestartCount, "at", r.NextStart)
		return true
	}
	a.log.Info("workload ended", "workload_id", id, "state", w.State, "exit_code", derefInt(w.ExitCode), "error", w.Error)
	return false
}

// endRun records in w how its run ended: with res, or failing with runErr.
func endRun(w *api.Workload, res *driver.ExitResult, runErr error, now time.Time) {
	w.FinishedAt = &now
	if w.Network != nil {
		// The address goes back to the pool with the run.
		w.Network = &api.NetworkStatus{Mode: w.Network.Mode}
	}
	w.OOMKilled = false
	if runErr != nil {
		w.State, w.Error, w.ExitCode = api.StateFailed, runErr.Error(), nil
		return
	}
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

// waitRecord blocks until the workload's record satisfies ok, it is gone
// (ErrNotFound), or ctx ends.
func (a *Agent) waitRecord(ctx context.Context, id string, ok func(*record) bool) (*record, error) {
	for {
		_, changed := a.Index()
		r := a.record(id)
		if r == nil {
			return nil, fmt.Errorf("workload %s: %w", id, errdefs.ErrNotFound)
		}
		if ok(r) {
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
// (bundle, rootfs layer, cgroup, domain, disks), its network attachment,
// its logs and its record. A workload that still runs is refused unless
// force, which kills it. The delete is the agent's once asked: Delete
// waits for it while ctx lives, and it goes on when the caller leaves. A
// failed attempt is retried by the agent; Delete then returns its error
// (ErrUnavailable) while the workload shows it.
func (a *Agent) Delete(ctx context.Context, ref string, force bool) error {
	r, err := a.requestDelete(ref, force)
	if err != nil {
		return err
	}
	id, failed := r.Workload.ID, r.DeleteAttempts
	r, err = a.waitRecord(ctx, id, func(r *record) bool { return r.DeleteAttempts > failed })
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil // gone: done
	}
	if err != nil {
		return err
	}
	return fmt.Errorf("delete workload %s: %s; the agent retries it: %w", id, r.DeleteError, errdefs.ErrUnavailable)
}

// RequestDelete is Delete without the wait: it returns the workload, now
// deleting, as soon as the delete is recorded.
func (a *Agent) RequestDelete(ctx context.Context, ref string, force bool) (*api.Workload, error) {
	r, err := a.requestDelete(ref, force)
	if err != nil {
		return nil, err
	}
	w := cloneWorkload(r.Workload)
	return &w, nil
}

// requestDelete persists a delete and hands it to the workload's
// supervisor; a start in progress is cancelled.
func (a *Agent) requestDelete(ref string, force bool) (*record, error) {
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	id := r.Workload.ID
	r, err = a.mutate(id, func(r *record) error {
		if r.Deleting {
			return errSkip
		}
		if !r.Workload.State.Terminal() && !force {
			return fmt.Errorf("workload %s is %s; stop it first or delete with force: %w", id, r.Workload.State, errdefs.ErrFailedPrecondition)
		}
		r.Deleting, r.StopRequested = true, true
		return nil
	})
	if err != nil {
		return nil, err
	}
	a.cancelStart(id)
	return r, nil
}

// deleteWork carries out a recorded delete until it is done (the record is
// gone) or the agent shuts down (the next agent resumes it). A failed
// attempt is recorded on the workload and retried with backoff.
func (a *Agent) deleteWork(id string) {
	for a.ctx.Err() == nil {
		err := a.release(id)
		if err == nil || a.ctx.Err() != nil {
			return
		}
		r, merr := a.mutate(id, func(r *record) error {
			r.DeleteAttempts++
			r.DeleteError = err.Error()
			r.Workload.Error = "delete failed (the agent retries it): " + err.Error()
			return nil
		})
		if merr != nil {
			a.log.Error("record failed delete", "workload_id", id, "err", merr)
			return
		}
		delay := retryDelay(a.opts.RestartBackoff, r.DeleteAttempts)
		a.log.Warn("delete failed; retrying", "workload_id", id, "attempt", r.DeleteAttempts, "retry_in", delay, "err", err)
		timer := time.NewTimer(delay)
		select {
		case <-timer.C:
		case <-a.ctx.Done():
		}
		timer.Stop()
	}
}

// release does the work of a delete whose intent is on disk: each step is
// idempotent, so a crash in the middle is finished after restart.
func (a *Agent) release(id string) error {
	r := a.record(id)
	if r == nil {
		return nil
	}
	if d, err := a.driverFor(r.Workload.Isolation); err == nil {
		if err := d.Destroy(a.ctx, id); err != nil {
			return fmt.Errorf("remove its %s task: %w", r.Workload.Isolation, err)
		}
	}
	if err := a.detachNetwork(a.ctx, id); err != nil {
		return fmt.Errorf("release its network: %w", err)
	}
	if err := os.RemoveAll(a.logDir(id)); err != nil {
		return fmt.Errorf("remove its logs: %w", err)
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
//     the workload again;
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
		// The agent died before the driver made anything: start afresh.
		_, _ = a.mutate(id, func(r *record) error {
			if r.Workload.State != api.StateStarting {
				return errSkip
			}
			r.Workload.State = api.StatePending
			return nil
		})
	default:
		a.finish(id, run, nil, fmt.Errorf("the workload's task could not be found after the agent restarted: %w", err))
	}
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
