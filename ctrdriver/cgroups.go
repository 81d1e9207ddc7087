package ctrdriver

import (
	"errors"
	"fmt"
	"os"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"

	"github.com/berthd/berth/driver"
)

// cgroupMode names the host's cgroup layout the way operators know it.
func cgroupMode() string {
	switch cgroups.Mode() {
	case cgroups.Legacy:
		return "v1"
	case cgroups.Hybrid:
		return "hybrid"
	case cgroups.Unified:
		return "v2"
	default:
		return "unavailable"
	}
}

// checkControllers reports a missing controller that berth's limits need.
func checkControllers() error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load("/")
		if err != nil {
			return fmt.Errorf("load cgroup v2 root: %w", err)
		}
		ctrls, err := m.RootControllers()
		if err != nil {
			return fmt.Errorf("read cgroup v2 controllers: %w", err)
		}
		have := map[string]bool{}
		for _, c := range ctrls {
			have[c] = true
		}
		for _, want := range []string{"cpu", "memory", "pids"} {
			if !have[want] {
				return fmt.Errorf("cgroup v2 controller %q is not enabled at the root", want)
			}
		}
		return nil
	}
	for _, want := range []string{"cpu", "cpuacct", "memory", "pids"} {
		if _, err := os.Stat("/sys/fs/cgroup/" + want); err != nil {
			return fmt.Errorf("cgroup v1 controller %q is not mounted under /sys/fs/cgroup", want)
		}
	}
	return nil
}

// readStats reads the task's cgroup. A cgroup that is gone means the task is
// gone: errdefs.ErrNotFound through os.ErrNotExist is left to the caller.
func readStats(id string) (*driver.Stats, error) {
	path := cgroupPath(id)
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return nil, err
		}
		st, err := m.Stat()
		if err != nil {
			return nil, err
		}
		out := &driver.Stats{}
		if st.CPU != nil {
			out.CPUUsageNanos = st.CPU.UsageUsec * 1000
		}
		if st.Memory != nil {
			out.MemoryBytes = st.Memory.Usage
			out.MemoryLimit = st.Memory.UsageLimit
			out.MemoryWorkingSetBytes = workingSet(st.Memory.Usage, st.Memory.InactiveFile)
		}
		if st.Pids != nil {
			out.Pids, out.PidsLimit = st.Pids.Current, st.Pids.Limit
		}
		return out, nil
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		if errors.Is(err, cgroup1.ErrCgroupDeleted) {
			return nil, os.ErrNotExist
		}
		return nil, err
	}
	st, err := cg.Stat(cgroup1.IgnoreNotExist)
	if err != nil {
		return nil, err
	}
	out := &driver.Stats{}
	if st.CPU != nil && st.CPU.Usage != nil {
		out.CPUUsageNanos = st.CPU.Usage.Total
	}
	if st.Memory != nil && st.Memory.Usage != nil {
		out.MemoryBytes = st.Memory.Usage.Usage
		out.MemoryWorkingSetBytes = workingSet(st.Memory.Usage.Usage, st.Memory.TotalInactiveFile)
		if st.Memory.Usage.Limit < 1<<62 { // "unlimited" is a page-rounded max int
			out.MemoryLimit = st.Memory.Usage.Limit
		}
	}
	if st.Pids != nil {
		out.Pids, out.PidsLimit = st.Pids.Current, st.Pids.Limit
	}
	return out, nil
}

// oomKilled reports whether the kernel's OOM killer struck inside the task's
// memory cgroup. It must be read before runc deletes the cgroup.
func oomKilled(id string) bool {
	path := cgroupPath(id)
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.Load(path)
		if err != nil {
			return false
		}
		st, err := m.Stat()
		return err == nil && st.MemoryEvents != nil && st.MemoryEvents.OomKill > 0
	}
	cg, err := cgroup1.Load(cgroup1.StaticPath(path))
	if err != nil {
		return false
	}
	st, err := cg.Stat(cgroup1.IgnoreNotExist)
	return err == nil && st.MemoryOomControl != nil && st.MemoryOomControl.OomKill > 0
}

// cgroupControllers are the v1 hierarchies runc makes a container's
// cgroup in.
var cgroupControllers = []string{"memory", "pids", "cpu", "cpuacct", "devices", "freezer", "blkio", "cpuset"}

// removeCgroup removes the task's cgroup where it is left empty: runc
// delete does not remove it for a container whose create was cut short (a
// hung runc killed, a start called off), and nothing else would. A cgroup
// that still has processes stays (rmdir fails with EBUSY) and is reported
// by cgroupExists.
func removeCgroup(id string) {
	if cgroups.Mode() == cgroups.Unified {
		_ = os.Remove("/sys/fs/cgroup" + cgroupPath(id))
		return
	}
	for _, c := range cgroupControllers {
		_ = os.Remove("/sys/fs/cgroup/" + c + cgroupPath(id))
	}
}

// cgroupExists reports whether any controller still holds the task's cgroup.
func cgroupExists(id string) bool {
	if cgroups.Mode() == cgroups.Unified {
		_, err := os.Stat("/sys/fs/cgroup" + cgroupPath(id))
		return err == nil
	}
	for _, c := range cgroupControllers {
		if _, err := os.Stat("/sys/fs/cgroup/" + c + cgroupPath(id)); err == nil {
			return true
		}
	}
	return false
}

// workingSet is cAdvisor's working set: usage less the inactive file
// cache, which the kernel reclaims first.
func workingSet(usage, inactiveFile uint64) uint64 {
	if inactiveFile > usage {
		return 0
	}
	return usage - inactiveFile
}
