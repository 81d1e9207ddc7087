package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// Delete removes a workload and everything it left on the node: its task
// (bundle, rootfs layer, cgroup, domain, disks), its network attachment,
// its logs, its secrets and its record. A workload that still runs is refused unless
// force, which kills it. The delete is the agent's once asked: Delete
// waits for it while ctx lives, and it goes on when the caller leaves. A
// failed attempt is retried by the agent (a driver's passing trouble is
// then not the caller's); after deleteWaitAttempts failed ones Delete
// returns the last error (ErrUnavailable), which the workload shows while
// the agent keeps trying.
func (a *Agent) Delete(ctx context.Context, ref string, force bool) error {
	r, err := a.requestDelete(ref, force)
	if err != nil {
		return err
	}
	id, failed := r.Workload.ID, r.DeleteAttempts
	r, err = a.waitRecord(ctx, id, func(r *record) bool { return r.DeleteAttempts >= failed+deleteWaitAttempts })
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil // gone: done
	}
	if err != nil {
		return err
	}
	return fmt.Errorf("delete workload %s: %s; the agent retries it: %w", id, r.DeleteError, errdefs.ErrUnavailable)
}

// deleteWaitAttempts is how many failed attempts of a delete Delete waits
// through before it reports the failure.
const deleteWaitAttempts = 3

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
	if err := a.releaseVolumes(id); err != nil {
		return fmt.Errorf("release its volumes: %w", err)
	}
	if err := os.RemoveAll(a.logDir(id)); err != nil {
		return fmt.Errorf("remove its logs: %w", err)
	}
	// The task that read them is gone: its secrets go before its record,
	// so no file outlives the workload that names it.
	if err := a.store.removeSecrets(id); err != nil {
		return fmt.Errorf("remove its secrets: %w", err)
	}
	if err := a.removeRecord(id); err != nil {
		return err
	}
	a.log.Info("workload deleted", "workload_id", id)
	return nil
}
