package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// Reserved is what the node keeps back from workloads: for the system, the
// agent itself, page cache.
type Reserved struct {
	CPU      float64
	MemoryMB int64
	// CPUOvercommit multiplies the host's cores before CPU is reserved;
	// values below 1 count as 1.
	CPUOvercommit float64
	// MaxWorkloads caps the workloads that hold resources at once; 0 means
	// no cap.
	MaxWorkloads int
}

// capacity is the host's, read once: CPUs and memory do not change under a
// running agent (hotplug is rare enough to need a restart).
func hostCapacity() api.NodeResources {
	c := api.NodeResources{CPU: float64(runtime.NumCPU())}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err == nil {
		c.MemoryMB = int64(uint64(si.Totalram) * uint64(si.Unit) >> 20)
	}
	return c
}

// request is what a workload holds while it is placed on the node: its
// requests, and for a VM the guest overhead the node pays on top.
func (a *Agent) request(w *api.Workload) (cpu float64, memMB int64) {
	cpu, memMB = w.Spec.Resources.CPU, w.Spec.Resources.MemoryMB
	if w.Isolation == api.IsolationVM {
		memMB += a.opts.VMOverheadMB
	}
	return cpu, memMB
}

// holdsResources: a workload holds its requests from admission until it
// has ended for good; one waiting to restart keeps them.
func holdsResources(r *record) bool {
	return !r.Workload.State.Terminal() || r.NextStart != nil
}

func (a *Agent) allocatedLocked() api.NodeResources {
	al, _ := a.totalsLocked()
	return al
}

// totalsLocked sums the requests (allocated) and the limits of every
// workload that holds resources; a VM's guest overhead is in both.
func (a *Agent) totalsLocked() (requested, limited api.NodeResources) {
	for _, r := range a.recs {
		if !holdsResources(r) {
			continue
		}
		cpu, mem := a.request(&r.Workload)
		requested.CPU += cpu
		requested.MemoryMB += mem
		requested.Workloads++
		l := limits(r.Workload.Spec.Resources)
		limited.CPU += l.CPU
		limited.MemoryMB += l.MemoryMB
		if r.Workload.Isolation == api.IsolationVM {
			limited.MemoryMB += a.opts.VMOverheadMB
		}
		limited.Workloads++
	}
	return requested, limited
}

func (a *Agent) allocatable() api.NodeResources {
	c, res := a.capacity, a.opts.Reserved
	al := api.NodeResources{CPU: c.CPU*max(res.CPUOvercommit, 1) - res.CPU, MemoryMB: c.MemoryMB - res.MemoryMB, Workloads: res.MaxWorkloads}
	al.CPU = max(al.CPU, 0)
	al.MemoryMB = max(al.MemoryMB, 0)
	return al
}

// admitLocked refuses a workload whose requests do not fit in what is
// left. The caller holds a.writeMu, which every admission and every
// record change takes, so two submits can never both take the last room.
func (a *Agent) admitLocked(w *api.Workload) error {
	a.mu.Lock()
	used := a.allocatedLocked()
	a.mu.Unlock()
	alloc := a.allocatable()
	cpu, mem := a.request(w)
	// Compare in milli-cores: 0.1+0.2 must fit in 0.3.
	milli := func(c float64) int64 { return int64(c*1000 + 0.5) }
	switch {
	case milli(used.CPU)+milli(cpu) > milli(alloc.CPU):
		return fmt.Errorf("not enough cpu: the workload requests %g cores, %g of %g allocatable are in use: %w",
			cpu, used.CPU, alloc.CPU, errdefs.ErrResourceExhausted)
	case used.MemoryMB+mem > alloc.MemoryMB:
		extra := ""
		if w.Isolation == api.IsolationVM && a.opts.VMOverheadMB > 0 {
			extra = fmt.Sprintf(" (%d MiB of it guest overhead)", a.opts.VMOverheadMB)
		}
		return fmt.Errorf("not enough memory: the workload requests %d MiB%s, %d of %d MiB allocatable are in use: %w",
			mem, extra, used.MemoryMB, alloc.MemoryMB, errdefs.ErrResourceExhausted)
	case alloc.Workloads > 0 && used.Workloads+1 > alloc.Workloads:
		return fmt.Errorf("not enough room: the node runs at most %d workloads and has %d: %w",
			alloc.Workloads, used.Workloads, errdefs.ErrResourceExhausted)
	}
	return a.checkPortsLocked(w)
}

// loadNodeID returns the node's identity, made once and kept in the state
// database.
func (a *Agent) loadNodeID() error {
	id, err := a.store.meta(keyNodeID, func() string {
		b := make([]byte, 16)
		_, _ = rand.Read(b)
		return hex.EncodeToString(b)
	})
	a.nodeID = id
	return err
}

// conditions remembers when each condition last changed.
type conditions struct {
	mu    sync.Mutex
	state map[string]api.Condition
}

func (c *conditions) set(cond api.Condition, now time.Time) api.Condition {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state == nil {
		c.state = map[string]api.Condition{}
	}
	prev, ok := c.state[cond.Type]
	if ok && prev.Status == cond.Status && prev.Reason == cond.Reason {
		cond.LastTransitionTime = prev.LastTransitionTime
	} else {
		cond.LastTransitionTime = now
	}
	c.state[cond.Type] = cond
	return cond
}

// Node returns the node-status document. It reads only cached driver
// fingerprints (refreshed in the background), never the drivers
// themselves, so thousands of pollers cost little.
func (a *Agent) Node(ctx context.Context) *api.Node {
	now := time.Now().UTC()
	hostname, _ := os.Hostname()
	n := &api.Node{
		ID:            a.nodeID,
		Hostname:      hostname,
		Version:       a.opts.Version,
		StartedAt:     a.startedAt,
		UptimeSeconds: now.Sub(a.startedAt).Seconds(),
		Capacity:      a.capacity,
		Reserved:      api.NodeResources{CPU: a.opts.Reserved.CPU, MemoryMB: a.opts.Reserved.MemoryMB},
		Allocatable:   a.allocatable(),
		Workloads:     api.NodeWorkloads{ByState: map[api.State]int{}, ByIsolation: map[api.Isolation]int{}},
		Drivers:       map[string]api.DriverStatus{},
	}
	a.mu.Lock()
	n.Index = a.index
	n.Allocated, n.Limited = a.totalsLocked()
	for _, r := range a.recs {
		n.Workloads.Total++
		n.Workloads.ByState[r.Workload.State]++
		n.Workloads.ByIsolation[r.Workload.Isolation]++
	}
	a.mu.Unlock()

	healthy := 0
	for iso := range a.drivers {
		st := a.driverStatus(ctx, iso)
		if st.Healthy {
			healthy++
		}
		n.Drivers[string(iso)] = st
	}
	n.Policy = a.pol.brief()
	pst := n.Policy

	ready := api.Condition{Type: api.ConditionReady, Status: true, Reason: "DriversHealthy", Message: fmt.Sprintf("%d of %d drivers healthy", healthy, len(a.drivers))}
	if healthy == 0 {
		ready.Status, ready.Reason = false, "NoHealthyDriver"
		var why []string
		for name, st := range n.Drivers {
			why = append(why, name+": "+st.Reason)
		}
		sort.Strings(why)
		ready.Message = fmt.Sprintf("no driver can run workloads: %v", why)
	}
	vm := api.Condition{Type: api.ConditionVMCapable, Status: false, Reason: "NoVMDriver", Message: "the VM driver is not configured"}
	if st, ok := n.Drivers[string(api.IsolationVM)]; ok {
		vm.Status, vm.Reason, vm.Message = st.Healthy, "VMDriverHealthy", "accel "+st.Details["accel"]
		if !st.Healthy {
			vm.Reason, vm.Message = "VMDriverUnhealthy", st.Reason
		}
	}
	pol := api.Condition{Type: api.ConditionPolicyValid, Status: true, Reason: "PolicyLoaded", Message: "policy " + pst.Version + " from " + pst.Source}
	if pst.LastReloadError != nil {
		pol.Status, pol.Reason, pol.Message = false, "ReloadRejected", "the policy file on disk is invalid; the previous policy still decides"
	}
	mem := api.Condition{Type: api.ConditionMemoryPressure, Status: false, Reason: "MemoryAvailable"}
	if n.Allocatable.MemoryMB > 0 && n.Allocated.MemoryMB*10 > n.Allocatable.MemoryMB*9 {
		mem.Status, mem.Reason = true, "MemoryAllocatedAbove90Percent"
	}
	mem.Message = fmt.Sprintf("%d of %d MiB allocated", n.Allocated.MemoryMB, n.Allocatable.MemoryMB)
	for _, c := range []api.Condition{ready, vm, pol, mem, a.diskCondition(), a.schedulable(n)} {
		n.Conditions = append(n.Conditions, a.conds.set(c, now))
	}
	return n
}
