package agent

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// defaultsLikeConfig are configs/berth.yaml's workload defaults.
var defaultsLikeConfig = Defaults{CPU: 0.1, MemoryMB: 64, CPULimit: 1, MemoryLimitMB: 256, Pids: 1024}

// Twenty workloads that name no resources run at once on a 2-core node:
// each requests 0.1 core (what admission counts) and is limited to a core
// and 256 MiB (what the driver enforces). The twenty-first does not fit.
func TestTwentyDefaultWorkloadsOnTwoCores(t *testing.T) {
	e := newEnvWith(t, func(o *Options) {
		o.Capacity = &api.NodeResources{CPU: 2, MemoryMB: 8 << 10}
		o.Defaults = defaultsLikeConfig
	})
	ctx := context.Background()
	var ids []string
	for range 20 {
		ids = append(ids, e.submit(sh("sleep 1000")).ID)
	}
	for _, id := range ids {
		w := e.waitFor(id, running)
		if r := w.Spec.Resources; r.CPU != 0.1 || r.MemoryMB != 64 || r.Limits == nil || *r.Limits != (api.ResourceLimits{CPU: 1, MemoryMB: 256}) {
			t.Fatalf("workload %s resources %+v limits %+v", id, r, r.Limits)
		}
	}
	st, err := e.agent.Stats(ctx, ids[0])
	if err != nil || st.MemoryLimit != 256<<20 {
		t.Errorf("the driver got memory limit %v (%v), want the default limit 256 MiB", st, err)
	}
	n := e.agent.Node(ctx)
	if n.Allocated.Workloads != 20 || n.Allocated.CPU < 1.999 || n.Allocated.MemoryMB != 20*64 ||
		n.Limited.CPU < 19.999 || n.Limited.MemoryMB != 20*256 {
		t.Errorf("node: allocated %+v, limited %+v", n.Allocated, n.Limited)
	}
	spec := sh("sleep 1000")
	spec.Image = testImage
	if _, _, err := e.agent.Submit(ctx, spec); !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "cpu") {
		t.Errorf("the 21st default workload: %v, want resource_exhausted (cpu)", err)
	}
	// The limits are the record's: they survive an agent restart.
	e.restart()
	if w, _ := e.agent.Get(ctx, ids[0]); w.Spec.Resources.Limits == nil || w.Spec.Resources.Limits.MemoryMB != 256 {
		t.Errorf("after a restart: %+v", w.Spec.Resources)
	}
}

// A request alone is also the limit, a limit alone also the request, and
// a limit below the request is a bad request naming the field.
func TestRequestsAndLimits(t *testing.T) {
	cases := []struct {
		in       api.Resources
		req      api.Resources
		lim      api.ResourceLimits
		badField string
	}{
		{in: api.Resources{}, req: api.Resources{CPU: 0.1, MemoryMB: 64}, lim: api.ResourceLimits{CPU: 1, MemoryMB: 256}},
		{in: api.Resources{CPU: 0.5, MemoryMB: 512}, req: api.Resources{CPU: 0.5, MemoryMB: 512}, lim: api.ResourceLimits{CPU: 0.5, MemoryMB: 512}},
		{in: api.Resources{Limits: &api.ResourceLimits{CPU: 2, MemoryMB: 1024}}, req: api.Resources{CPU: 2, MemoryMB: 1024}, lim: api.ResourceLimits{CPU: 2, MemoryMB: 1024}},
		{in: api.Resources{CPU: 0.25, Limits: &api.ResourceLimits{CPU: 2}}, req: api.Resources{CPU: 0.25, MemoryMB: 64}, lim: api.ResourceLimits{CPU: 2, MemoryMB: 256}},
		{in: api.Resources{CPU: 1, Limits: &api.ResourceLimits{CPU: 0.5}}, badField: "resources.limits.cpu"},
		{in: api.Resources{MemoryMB: 128, Limits: &api.ResourceLimits{MemoryMB: 64}}, badField: "resources.limits.memory_mb"},
		{in: api.Resources{Limits: &api.ResourceLimits{MemoryMB: 4}}, badField: "resources.limits.memory_mb"},
		{in: api.Resources{Limits: &api.ResourceLimits{CPU: -1}}, badField: "resources.limits.cpu"},
	}
	for _, c := range cases {
		spec := sh("true")
		spec.Image = testImage
		spec.Resources = c.in
		got, err := normalize(spec, defaultsLikeConfig)
		if c.badField != "" {
			var v *errdefs.ValidationError
			if !errors.As(err, &v) || len(v.Fields) == 0 || v.Fields[0].Field != c.badField {
				t.Errorf("%+v %+v: %v, want a bad %s", c.in, c.in.Limits, err, c.badField)
			}
			continue
		}
		if err != nil {
			t.Errorf("%+v: %v", c.in, err)
			continue
		}
		r := got.Resources
		if r.CPU != c.req.CPU || r.MemoryMB != c.req.MemoryMB || r.Limits == nil || *r.Limits != c.lim {
			t.Errorf("%+v %+v: requests %g/%d, limits %+v; want %g/%d and %+v", c.in, c.in.Limits, r.CPU, r.MemoryMB, r.Limits, c.req.CPU, c.req.MemoryMB, c.lim)
		}
	}
}
