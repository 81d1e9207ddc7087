package driver

import (
	"context"
	"time"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	cstructs "github.com/hashicorp/nomad/client/structs"

	"github.com/berthd/berth/api"
)

// stats sends berth's readings of the workload every interval until ctx
// ends or the task does.
func (d *Driver) stats(ctx context.Context, h *taskHandle, interval time.Duration, ch chan<- *cstructs.TaskResourceUsage) {
	defer close(ch)
	if interval <= 0 {
		interval = time.Second
	}
	var prev *api.Stats
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.done:
			return
		case <-h.ctx.Done():
			return
		case <-t.C:
			t.Reset(interval)
		}
		qctx, cancel := context.WithTimeout(ctx, agentTimeout)
		st, err := d.agent().Stats(qctx, h.state.WorkloadID)
		cancel()
		if err != nil {
			d.logger.Debug("workload stats", "workload_id", h.state.WorkloadID, "error", err)
			continue
		}
		d.mu.Lock()
		compute := d.compute
		d.mu.Unlock()
		u := Usage(prev, st, compute)
		prev = st
		select {
		case ch <- u:
		case <-ctx.Done():
			return
		}
	}
}

// Usage is Nomad's form of a berth reading. CPU percent (of one core)
// needs the previous reading (nil: 0); Nomad's ticks are that share of a
// core in MHz.
func Usage(prev, cur *api.Stats, compute cpustats.Compute) *cstructs.TaskResourceUsage {
	cpu := &cstructs.CpuStats{Measured: []string{"Total Ticks", "Percent"}}
	if prev != nil && cur.Time.After(prev.Time) && cur.CPUUsageNanos >= prev.CPUUsageNanos {
		cpu.Percent = 100 * float64(cur.CPUUsageNanos-prev.CPUUsageNanos) / float64(cur.Time.Sub(prev.Time).Nanoseconds())
	}
	if compute.NumCores > 0 {
		cpu.TotalTicks = cpu.Percent / 100 * float64(compute.TotalCompute) / float64(compute.NumCores)
	}
	return &cstructs.TaskResourceUsage{
		ResourceUsage: &cstructs.ResourceUsage{
			MemoryStats: &cstructs.MemoryStats{
				RSS:      cur.MemoryBytes,
				Usage:    cur.MemoryBytes,
				Measured: []string{"RSS", "Usage"},
			},
			CpuStats: cpu,
		},
		Timestamp: cur.Time.UnixNano(),
	}
}
