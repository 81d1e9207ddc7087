package agent

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// Get returns a workload by id or name.
func (a *Agent) Get(ctx context.Context, ref string) (*api.Workload, error) {
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	w := cloneWorkload(r.Workload)
	a.withPull(&w)
	return &w, nil
}

// List returns the workloads that match f, oldest first; those being
// deleted are listed (deleting: true) until they are gone.
func (a *Agent) List(ctx context.Context, f api.ListFilter) []api.Workload {
	a.mu.Lock()
	recs := make([]*record, 0, len(a.recs))
	for _, r := range a.recs {
		recs = append(recs, r)
	}
	a.mu.Unlock()
	out := make([]api.Workload, 0, len(recs))
	for _, r := range recs {
		w := &r.Workload
		if f.State != "" && w.State != f.State || f.Isolation != "" && w.Isolation != f.Isolation {
			continue
		}
		match := true
		for k, v := range f.Labels {
			if got, ok := w.Spec.Labels[k]; !ok || (v != "" && got != v) {
				match = false
				break
			}
		}
		if match {
			out = append(out, cloneWorkload(*w))
			a.withPull(&out[len(out)-1])
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Stats reads a running workload's resource usage from its driver.
func (a *Agent) Stats(ctx context.Context, ref string) (*api.Stats, error) {
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	if r.Workload.State != api.StateRunning && r.Workload.State != api.StateStopping {
		return nil, fmt.Errorf("workload %s is %s; stats exist only while it runs: %w", r.Workload.ID, r.Workload.State, errdefs.ErrFailedPrecondition)
	}
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		return nil, err
	}
	st, err := d.Stats(ctx, r.Workload.ID)
	if err != nil {
		return nil, err
	}
	return &api.Stats{
		Time:                  time.Now().UTC(),
		CPUUsageNanos:         st.CPUUsageNanos,
		MemoryBytes:           st.MemoryBytes,
		MemoryWorkingSetBytes: st.MemoryWorkingSetBytes,
		MemoryLimit:           st.MemoryLimit,
		Pids:                  st.Pids,
		PidsLimit:             st.PidsLimit,
	}, nil
}
