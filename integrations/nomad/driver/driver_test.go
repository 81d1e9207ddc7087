package driver

import (
	"reflect"
	"testing"
	"time"

	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/nomad/structs"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
)

func TestWorkloadName(t *testing.T) {
	alloc := "2f4a1c9e-0b7d-4e55-9a3c-1d2e3f4a5b6c"
	for _, tc := range []struct{ alloc, task, want string }{
		{alloc, alloc + "/hello/8c1f2a3b", "nomad-" + alloc + "-8c1f2a3b"},
		{alloc, alloc + "/Hello/8C1F2A3B", "nomad-" + alloc + "-8c1f2a3b"},
		{alloc, alloc + "/t/" + alloc + alloc, ""}, // too long: berth names it
		{"a_b", "a_b/t/x", ""}, // not a DNS label
	} {
		if got := WorkloadName(tc.alloc, tc.task); got != tc.want {
			t.Errorf("WorkloadName(%q, %q) = %q, want %q", tc.alloc, tc.task, got, tc.want)
		}
	}
}

func TestResources(t *testing.T) {
	compute := cpustats.Compute{TotalCompute: 4000, NumCores: 2}
	res := func(shares int64, cores []uint16, mem, memMax int64) *drivers.Resources {
		return &drivers.Resources{NomadResources: &structs.AllocatedTaskResources{
			Cpu:    structs.AllocatedCpuResources{CpuShares: shares, ReservedCores: cores},
			Memory: structs.AllocatedMemoryResources{MemoryMB: mem, MemoryMaxMB: memMax},
		}}
	}
	for _, tc := range []struct {
		name string
		in   *drivers.Resources
		want api.Resources
	}{
		{"half a core in MHz", res(1000, nil, 128, 0), api.Resources{CPU: 0.5, MemoryMB: 128}},
		{"reserved cores", res(4000, []uint16{0, 1}, 64, 0), api.Resources{CPU: 2, MemoryMB: 64}},
		{"memory_max is the limit", res(100, nil, 128, 512), api.Resources{CPU: 0.05, MemoryMB: 128, Limits: &api.ResourceLimits{CPU: 0.05, MemoryMB: 512}}},
		{"none", nil, api.Resources{}},
	} {
		if got := Resources(tc.in, compute); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v, want %+v", tc.name, got, tc.want)
		}
	}
}

func TestSpec(t *testing.T) {
	alloc := "2f4a1c9e-0b7d-4e55-9a3c-1d2e3f4a5b6c"
	cfg := &drivers.TaskConfig{
		ID: alloc + "/web/0a1b2c3d", AllocID: alloc, JobName: "shop", TaskGroupName: "g", Name: "web",
		Env: map[string]string{"NOMAD_ALLOC_ID": alloc, "NOMAD_META_a.b": "dotted", "SHARED": "nomad"},
	}
	tc := &TaskConfig{
		Image: "busybox", Command: "sh", Args: []string{"-c", "true"},
		Env: map[string]string{"SHARED": "task"}, Labels: map[string]string{"team": "a", "nomad.job": ""},
		Isolation: "vm",
	}
	spec := Spec(cfg, tc, cpustats.Compute{})
	if spec.Name != "nomad-"+alloc+"-0a1b2c3d" || spec.Isolation != api.IsolationVM || spec.Restart.Policy != api.RestartNever {
		t.Errorf("spec %+v", spec)
	}
	if len(spec.Command) != 1 || spec.Command[0] != "sh" || len(spec.Args) != 2 {
		t.Errorf("command %q args %q", spec.Command, spec.Args)
	}
	if spec.Env["SHARED"] != "task" || spec.Env["NOMAD_ALLOC_ID"] != alloc {
		t.Errorf("env %v: the task's env overrides Nomad's", spec.Env)
	}
	if _, ok := spec.Env["NOMAD_META_a.b"]; ok {
		t.Errorf("env %v: a name berth refuses was passed on", spec.Env)
	}
	if spec.Labels[LabelAllocID] != alloc || spec.Labels["team"] != "a" {
		t.Errorf("labels %v", spec.Labels)
	}
	if _, ok := spec.Labels[LabelJob]; ok {
		t.Errorf("labels %v: an empty label value removes the label", spec.Labels)
	}
	if spec := Spec(cfg, &TaskConfig{Image: "busybox"}, cpustats.Compute{}); spec.Isolation != api.IsolationAuto || spec.Command != nil {
		t.Errorf("defaults: %+v", spec)
	}
}

func TestTaskConfigValidate(t *testing.T) {
	if err := (&TaskConfig{Image: "x", Isolation: "vm"}).validate(); err != nil {
		t.Error(err)
	}
	if err := (&TaskConfig{Isolation: "vm"}).validate(); err == nil {
		t.Error("no image: want an error")
	}
	if err := (&TaskConfig{Image: "x", Isolation: "gvisor"}).validate(); err == nil {
		t.Error("unknown isolation: want an error")
	}
}

func TestNodeFingerprint(t *testing.T) {
	n := &api.Node{
		ID: "n1", Version: "v1",
		Drivers: map[string]api.DriverStatus{
			"container": {Healthy: true},
			"vm":        {Healthy: true, Details: map[string]string{"accel": "tcg"}},
		},
		Policy: api.NodePolicy{Version: "sha256:abc"},
	}
	fp := NodeFingerprint(n)
	if fp.Health != drivers.HealthStateHealthy {
		t.Errorf("health %s", fp.Health)
	}
	for k, want := range map[string]string{"driver.berth.vm": "true", "driver.berth.container": "true", "driver.berth.accel": "tcg", "driver.berth.policy_version": "sha256:abc"} {
		if got := fp.Attributes[k].GoString(); got != want {
			t.Errorf("%s = %s, want %s", k, got, want)
		}
	}

	n.Drivers["vm"] = api.DriverStatus{Healthy: false, Reason: "no libvirt"}
	fp = NodeFingerprint(n)
	if fp.Health != drivers.HealthStateHealthy || fp.Attributes["driver.berth.vm"].GoString() != "false" || fp.Attributes["driver.berth.accel"] != nil {
		t.Errorf("no VMs: %s %v", fp.Health, fp.Attributes)
	}
	n.Drivers["container"] = api.DriverStatus{Healthy: false, Reason: "no runc"}
	if fp := NodeFingerprint(n); fp.Health != drivers.HealthStateUnhealthy {
		t.Errorf("no driver: health %s, want unhealthy", fp.Health)
	}
}

func TestUsage(t *testing.T) {
	t0 := time.Unix(1000, 0)
	prev := &api.Stats{Time: t0, CPUUsageNanos: 1e9, MemoryBytes: 1 << 20}
	cur := &api.Stats{Time: t0.Add(2 * time.Second), CPUUsageNanos: 2e9, MemoryBytes: 2 << 20}
	u := Usage(prev, cur, cpustats.Compute{TotalCompute: 4000, NumCores: 2})
	if u.ResourceUsage.CpuStats.Percent != 50 || u.ResourceUsage.CpuStats.TotalTicks != 1000 {
		t.Errorf("cpu %+v, want 50%% and 1000 ticks", u.ResourceUsage.CpuStats)
	}
	if u.ResourceUsage.MemoryStats.RSS != 2<<20 || u.Timestamp != cur.Time.UnixNano() {
		t.Errorf("usage %+v", u)
	}
	if u := Usage(nil, cur, cpustats.Compute{}); u.ResourceUsage.CpuStats.Percent != 0 {
		t.Errorf("first reading: %+v", u.ResourceUsage.CpuStats)
	}
}
