package agent

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// defaultReconcileInterval is how often the agent compares its records
// with what the drivers hold when Options.ReconcileInterval is zero.
const defaultReconcileInterval = 30 * time.Second

// runningGrace is how long a record may say running before a missing task
// counts as vanished: a start that is being recorded is not a drift.
const runningGrace = 5 * time.Second

// ReconcileReport says what a reconciliation pass changed.
type ReconcileReport struct {
	// Orphans are driver tasks no record claimed; they were destroyed.
	Orphans []string
	// Vanished are workloads whose task disappeared from the node behind
	// the agent's back; they were marked failed.
	Vanished []string
	// Errors are drivers that could not be listed, and why.
	Errors []string
}

// Reconcile compares the store with what the drivers report and repairs
// the difference: it removes tasks no workload owns and marks workloads
// whose task vanished as failed (a restart policy then starts them again).
// Deletes are their supervisors' work, not reconciliation's. Every change is logged and published as an event, so the node's state
// never drifts silently.
func (a *Agent) Reconcile(ctx context.Context) ReconcileReport {
	var rep ReconcileReport
	for iso, d := range a.drivers {
		ids, err := d.List(ctx)
		if err != nil {
			a.noteDriverError(iso, err)
			rep.Errors = append(rep.Errors, fmt.Sprintf("%s: %v", iso, err))
			continue
		}
		present := make(map[string]bool, len(ids))
		for _, id := range ids {
			present[id] = true
			a.mu.Lock()
			_, known := a.recs[id]
			a.mu.Unlock()
			if known {
				continue
			}
			// Records are committed before their task is made and removed
			// only after it is destroyed: a task without one is a leftover.
			a.log.Warn("reconcile: removing a task no workload owns", "driver", iso, "task_id", id)
			if err := d.Destroy(ctx, id); err != nil {
				a.noteDriverError(iso, err)
				a.log.Warn("reconcile: remove orphaned task", "driver", iso, "task_id", id, "err", err)
				continue
			}
			rep.Orphans = append(rep.Orphans, id)
			a.events.publish(api.Event{Type: api.EventWorkloadReconciled, WorkloadID: id,
				Message: fmt.Sprintf("removed %s task %s that no workload owned", iso, id),
				Attrs:   map[string]string{"action": "orphan_removed", "driver": string(iso)}})
		}

		for _, r := range a.snapshotRecords() {
			w := &r.Workload
			if w.Isolation != iso || present[w.ID] {
				continue
			}
			if r.Deleting {
				continue
			}
			if w.State != api.StateRunning && w.State != api.StateStopping {
				continue
			}
			if w.StartedAt != nil && time.Since(*w.StartedAt) < runningGrace {
				continue
			}
			// Listing races with the task's own end; ask once more.
			if _, err := d.Inspect(ctx, w.ID); !errors.Is(err, errdefs.ErrNotFound) {
				continue
			}
			cause := fmt.Errorf("its %s task disappeared from the node (removed outside berth)", iso)
			a.log.Warn("reconcile: workload's task vanished", "workload_id", w.ID, "driver", iso)
			a.finish(w.ID, w.RestartCount, nil, cause)
			rep.Vanished = append(rep.Vanished, w.ID)
			a.events.publish(api.Event{Type: api.EventWorkloadReconciled, WorkloadID: w.ID,
				Message: "marked failed: " + cause.Error(),
				Attrs:   map[string]string{"action": "marked_failed", "driver": string(iso)}})
		}
	}
	a.reconcileNetwork(ctx, &rep)
	a.reconcileVolumes()
	return rep
}

// snapshotRecords returns the current records (immutable once published).
func (a *Agent) snapshotRecords() []*record {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]*record, 0, len(a.recs))
	for _, r := range a.recs {
		out = append(out, r)
	}
	return out
}

// reconcileLoop runs Reconcile periodically until the agent closes.
func (a *Agent) reconcileLoop() {
	defer a.wg.Done()
	every := a.opts.ReconcileInterval
	if every <= 0 {
		every = defaultReconcileInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			ctx, cancel := context.WithTimeout(a.ctx, every)
			a.Reconcile(ctx)
			cancel()
		case <-a.ctx.Done():
			return
		}
	}
}
