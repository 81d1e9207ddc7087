package daemon_test

import (
	"context"
	"runtime"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
)

// Twenty workloads that name no resources run at once on real runc under
// the built-in workload defaults: each requests 0.1 core and 64 MiB and is
// limited to a core and 256 MiB (the cgroup's memory limit says so). On a
// 2-core node the twenty-first is refused.
func TestTwentyDefaultWorkloads(t *testing.T) {
	requireRunc(t)
	builtin, err := config.Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, t.TempDir(), "127.0.0.1:0")
	stop := cfg.WorkloadDefaults.StopTimeout
	cfg.WorkloadDefaults = builtin.WorkloadDefaults
	cfg.WorkloadDefaults.StopTimeout = stop
	cfg.Node.ReservedCPU = 0
	c, _ := serve(t, cfg)
	importBusybox(t, c)
	ctx := context.Background()
	var ids []string
	for range 20 {
		w, err := c.Submit(ctx, sh("sleep 1000"))
		if err != nil {
			t.Fatalf("default workload %d: %v", len(ids)+1, err)
		}
		ids = append(ids, w.ID)
	}
	for _, id := range ids {
		waitRunning(t, c, id)
	}
	st, err := c.Stats(ctx, ids[0])
	if err != nil || st.MemoryLimit != 256<<20 {
		t.Errorf("a default workload's cgroup: %+v %v, want a memory limit of 256 MiB", st, err)
	}
	n, _, err := c.Node(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n.Allocated.Workloads != 20 || n.Allocated.MemoryMB != 20*64 || n.Limited.MemoryMB != 20*256 || n.Limited.CPU < 19.999 {
		t.Errorf("node: allocated %+v, limited %+v", n.Allocated, n.Limited)
	}
	if runtime.NumCPU() == 2 {
		if _, err := c.Submit(ctx, sh("sleep 1000")); !client.IsReason(err, api.ReasonResourceExhausted) {
			t.Errorf("the 21st default workload on 2 cores: %v, want resource_exhausted", err)
		}
	}
}
