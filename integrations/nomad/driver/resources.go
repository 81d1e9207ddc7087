package driver

import (
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
)

// Resources maps the task's Nomad resources to berth's requests. Nomad's
// CPU is in MHz of the node's total compute; berth's is in cores. Reserved
// cores (resources { cores = N }) count as whole cores. memory is the
// request (what Nomad reserved for the task) and memory_max, when the job
// sets one above it, the limit; without it memory is both.
func Resources(r *drivers.Resources, compute cpustats.Compute) api.Resources {
	var out api.Resources
	if r == nil || r.NomadResources == nil {
		return out
	}
	nr := r.NomadResources
	switch {
	case len(nr.Cpu.ReservedCores) > 0:
		out.CPU = float64(len(nr.Cpu.ReservedCores))
	case nr.Cpu.CpuShares > 0 && compute.TotalCompute > 0 && compute.NumCores > 0:
		mhzPerCore := float64(compute.TotalCompute) / float64(compute.NumCores)
		out.CPU = float64(nr.Cpu.CpuShares) / mhzPerCore
	}
	out.MemoryMB = nr.Memory.MemoryMB
	if nr.Memory.MemoryMaxMB > out.MemoryMB {
		out.Limits = &api.ResourceLimits{CPU: out.CPU, MemoryMB: nr.Memory.MemoryMaxMB}
	}
	return out
}
