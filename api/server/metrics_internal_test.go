package server

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/berthd/berth/api"
)

// hungBackend lists two running workloads; the stats of "slow" wait
// until release is closed or their ctx ends (a hung driver).
type hungBackend struct {
	Backend // nil: only List and Stats are called
	release chan struct{}

	mu    sync.Mutex
	calls map[string]int
	ws    []api.Workload
}

func (b *hungBackend) List(ctx context.Context, f api.ListFilter) []api.Workload {
	if f.State != api.StateRunning {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]api.Workload(nil), b.ws...)
}

func (b *hungBackend) Stats(ctx context.Context, ref string) (*api.Stats, error) {
	b.mu.Lock()
	b.calls[ref]++
	b.mu.Unlock()
	if ref == "slow" {
		select {
		case <-b.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return &api.Stats{CPUUsageNanos: 2e9, MemoryBytes: 1 << 20, MemoryWorkingSetBytes: 1 << 19}, nil
}

func (b *hungBackend) callsOf(ref string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.calls[ref]
}

// cpuSeries is the container_cpu_usage_seconds_total series by id.
func cpuSeries(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "container_cpu_usage_seconds_total" {
			continue
		}
		for _, m := range f.GetMetric() {
			out[labelOf(m, "id")] = m.GetCounter().GetValue()
		}
	}
	return out
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// TestWorkloadStatsDoNotWaitOnAHungDriver: a driver whose stats never
// answer delays no scrape past the collector's wait, holds up no other
// workload's reading, and is asked once, not once per scrape.
func TestWorkloadStatsDoNotWaitOnAHungDriver(t *testing.T) {
	b := &hungBackend{release: make(chan struct{}), calls: map[string]int{},
		ws: []api.Workload{{ID: "fast", Name: "f", Isolation: api.IsolationContainer}, {ID: "slow", Name: "s", Isolation: api.IsolationVM}}}
	c := newWorkloadCollector(b)
	c.maxAge, c.wait, c.timeout = 0, 20*time.Millisecond, time.Hour
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)

	// Scrapes return while "slow" hangs (each Gather returning at all is
	// the point: the hung read's timeout is an hour); "fast" shows up.
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := cpuSeries(t, reg)
		if _, ok := got["slow"]; ok {
			t.Fatalf("a reading of the hung workload: %v", got)
		}
		if got["fast"] == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reading of the fast workload: %v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := b.callsOf("slow"); n != 1 {
		t.Fatalf("the hung driver was asked %d times, want once (one refresh at a time)", n)
	}

	close(b.release)
	for {
		if got := cpuSeries(t, reg); got["slow"] == 2 && got["fast"] == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reading of the released workload: %v", cpuSeries(t, reg))
		}
		time.Sleep(10 * time.Millisecond)
	}

	// A workload that stops running loses its series.
	b.mu.Lock()
	b.ws = b.ws[:1]
	b.mu.Unlock()
	for {
		got := cpuSeries(t, reg)
		if _, ok := got["slow"]; !ok && got["fast"] == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the gone workload's series stayed: %v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWorkloadStatsCap: past the cap, workloads are left out and counted.
func TestWorkloadStatsCap(t *testing.T) {
	b := &hungBackend{release: make(chan struct{}), calls: map[string]int{}}
	for i := range 5 {
		b.ws = append(b.ws, api.Workload{ID: fmt.Sprintf("w%d", i), Isolation: api.IsolationContainer})
	}
	c := newWorkloadCollector(b)
	c.maxSeries, c.wait = 3, time.Hour // wait for the whole refresh
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	if got := cpuSeries(t, reg); len(got) != 3 {
		t.Fatalf("%d series, want the cap of 3: %v", len(got), got)
	}
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == "berth_workload_stats_omitted" {
			if v := f.GetMetric()[0].GetGauge().GetValue(); v != 2 {
				t.Fatalf("omitted = %v, want 2", v)
			}
			return
		}
	}
	t.Fatal("no berth_workload_stats_omitted")
}
