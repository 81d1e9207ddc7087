package agent

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
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
		if !startsUnseen(r) && !a.onDisk(r) {
			return
		}
		switch {
		case r.Deleting:
			a.deleteWork(id)
		case r.Workload.State == api.StatePending && r.StopRequested:
			a.endStopped(id, msgStoppedBeforeStart)
		case r.Workload.State == api.StatePending:
			if a.waitBackoff(id, s) {
				onFreshStack(func() { a.start(id, s) })
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
			continue
		default:
			return // ended
		}
		if cur := a.record(id); cur != nil && cur.Workload.ModifyIndex == r.Workload.ModifyIndex {
			// Nothing moved (the store refused a write?): do not spin.
			timer := time.NewTimer(time.Second)
			select {
			case <-s.kick:
			case <-timer.C:
			case <-a.ctx.Done():
			}
			timer.Stop()
		}
	}
}

// onFreshStack runs f on a goroutine of its own and waits for it. A
// start's deep calls (the driver's mounts, files and runtime, the
// commits) grow the stack of the goroutine that makes them, and the
// runtime gives a parked goroutine's stack back only a half at a time, at
// collections an idle agent seldom runs: made by a goroutine that ends
// with it, the growth goes at once, instead of staying with the
// supervisor that waits out the whole run (measured with 100 running
// containers: the agent's stack 15 KiB a container with the start made
// by the supervisor itself, 11 KiB with it made here).
func onFreshStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
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
	// The image first, while the workload is pending: a stop or a delete
	// calls the download off (sctx).
	if cur := a.record(id); cur != nil && cur.Workload.State == api.StatePending && !cur.StopRequested && !cur.Deleting {
		if err := a.pullFor(sctx, id); err != nil {
			if a.ctx.Err() != nil || sctx.Err() != nil {
				return // shutting down (recovery pulls again) or stopped
			}
			a.log.Warn("workload's image could not be pulled", "workload_id", id, "err", err)
			a.failPull(id, err)
			return
		}
	}
	r, err := a.mutateLocked(id, func(r *record) error {
		if r.Workload.State != api.StatePending || r.StopRequested || r.Deleting {
			return errSkip
		}
		r.Workload.State = api.StateStarting
		r.NextStart = nil
		r.StartBoot = a.opts.BootID
		return nil
	})
	if err != nil || r.Workload.State != api.StateStarting {
		return
	}
	// The driver prepares the task while starting goes to disk, and waits
	// for it (Commit) before anything of the workload can run: a crash or
	// a power loss before then finds the workload pending on disk with
	// nothing of it run (recovery releases what was prepared), one after
	// finds it starting.
	committed := sync.OnceValue(func() error { return a.commits.durable(r.Workload.ModifyIndex) })
	run := r.Workload.RestartCount
	began := time.Now()
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
		if err == nil && r.Workload.Network != nil && r.Workload.Network.Mode == api.NetworkBridge {
			// Nothing is attached to the node's network for a record a
			// crash could take back (startsUnseen).
			err = committed()
		}
		if err == nil {
			cfg.Network, netStatus, err = a.attachNetwork(sctx, &r.Workload)
		}
		if err == nil {
			var h *driver.Handle
			cfg.Commit = committed
			h, err = d.Start(sctx, cfg)
			if cerr := committed(); cerr != nil {
				// The state database failed (the agent reports itself
				// not ready): nothing more can be recorded.
				a.log.Error("record starting workload", "workload_id", id, "err", cerr)
				if err == nil {
					_ = d.Destroy(context.WithoutCancel(a.ctx), id)
				}
				return
			}
			if err == nil {
				now := time.Now().UTC()
				// Published at once, not waited for on disk: what follows
				// (waiting for the end, a stop) needs no more, and a crash
				// before it is written finds the task through the starting
				// record (reattach). A short run's end is seen sooner.
				_, cerr := a.mutateLocked(id, func(r *record) error {
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
				a.observeStart(r.Workload.Isolation, time.Since(began), nil)
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
	a.observeStart(r.Workload.Isolation, time.Since(began), err)
	a.unlockedFinish(id, run, nil, err)
}

func (a *Agent) observeStart(iso api.Isolation, took time.Duration, err error) {
	if a.opts.OnStart != nil {
		a.opts.OnStart(iso, took, err)
	}
}

// endStopped ends a workload that a stop caught before it ran: exited,
// with no exit code and msg as the reason. What its start attached to the
// network is released first.
func (a *Agent) endStopped(id, msg string) {
	if err := a.detachNetwork(context.WithoutCancel(a.ctx), id); err != nil {
		a.log.Warn("release the network of a start that was called off", "workload_id", id, "err", err)
	}
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
	// The driver is asked for the result once it says the task has
	// ended: a running workload costs no goroutine parked in Wait.
	waitc := make(chan waited, 1)
	endc, err := d.Ended(id)
	if err != nil {
		waitc <- waited{nil, err}
	}
	if r.Workload.Spec.Health != nil {
		// The health check runs while this run is waited for.
		go a.probe(wctx, id, run)
	}
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
		if r.StopRequested && !ended && retry == nil && a.onDisk(r) {
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
		case <-endc:
			endc = nil
			go func() {
				res, err := d.Wait(wctx, id)
				waitc <- waited{res, err}
			}()
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
			if w.res.Err != "" && r.StopRequested {
				if st, err := d.Inspect(a.ctx, id); err == nil && st.StartedAt.IsZero() {
					// It never ran: the stop called its start off (the
					// driver had made the task when the agent restarted).
					a.endStopped(id, msgStoppedStarting)
					return
				}
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
		w.State, w.Error = api.StateExited, fmt.Sprintf("killed by the kernel's OOM killer: the workload exceeded its memory limit of %d MiB", limits(w.Spec.Resources).MemoryMB)
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

// startsUnseen reports whether r is a first start that may begin before
// its record is on disk: a submitted workload, pending, with no task of an
// earlier run. Its start prepares the task while the submit's record and
// the starting record go to disk, and the driver waits for the starting
// record (TaskConfig.Commit) before anything of the workload runs, as the
// network attach does; a crash before then leaves a task no record on
// disk claims, which reconciliation removes. A restart (the previous
// run's task is destroyed first), a stop or a delete waits as onDisk says.
func startsUnseen(r *record) bool {
	return r.Workload.State == api.StatePending && r.Handle == nil && r.Workload.RestartCount == 0 && !r.StopRequested && !r.Deleting
}

// onDisk waits until r's version of its record is on disk: a supervisor
// acts on the node (a start, a stop, a delete) only on what a crash
// cannot take back. A state database that failed leaves nothing more to
// do until the agent restarts: it then waits for the shutdown and says
// false.
func (a *Agent) onDisk(r *record) bool {
	if err := a.commits.durable(r.Workload.ModifyIndex); err != nil {
		<-a.ctx.Done()
		return false
	}
	return true
}
