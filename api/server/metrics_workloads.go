package server

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/berthd/berth/api"
)

// Per-workload usage is named as Kubernetes' cAdvisor names a container's,
// so dashboards and alerts written for pods read berth's workloads too;
// the labels are the workload's id, name, tenant, image and isolation.
var (
	workloadLabels   = []string{"id", "name", "tenant", "image", "isolation"}
	descCPU          = prometheus.NewDesc("container_cpu_usage_seconds_total", "Cumulative CPU time the workload consumed (a VM's: all its vCPUs).", workloadLabels, nil)
	descMemUsage     = prometheus.NewDesc("container_memory_usage_bytes", "The workload's memory usage, cache included (a VM's: its QEMU process's resident memory).", workloadLabels, nil)
	descMemWorkSet   = prometheus.NewDesc("container_memory_working_set_bytes", "The workload's working set: usage less inactive file cache (a VM's: its QEMU process's resident memory).", workloadLabels, nil)
	descMemLimit     = prometheus.NewDesc("container_spec_memory_limit_bytes", "The workload's memory limit (a VM's: its guest memory); 0 when unlimited.", workloadLabels, nil)
	descThreads      = prometheus.NewDesc("container_threads", "Tasks (threads) in the workload's pids cgroup; 1 for a VM.", workloadLabels, nil)
	descThreadsMax   = prometheus.NewDesc("container_threads_max", "The workload's task limit; 0 when unlimited.", workloadLabels, nil)
	descStatsAge     = prometheus.NewDesc("berth_workload_stats_age_seconds", "Age of the oldest per-workload reading in this scrape (a slow driver's readings age while it does not answer).", nil, nil)
	descStatsOmitted = prometheus.NewDesc("berth_workload_stats_omitted", "Running workloads left out of the per-workload series because there are more than the cap.", nil, nil)
)

const (
	// statsMaxAge: a scrape younger than this after the last refresh is
	// served the readings it made, so several scrapers cost one round.
	statsMaxAge = 5 * time.Second
	// statsWait is how long a scrape waits for a refresh it started
	// before it serves what it has: a hung driver delays no scrape more.
	statsWait = time.Second
	// statsTimeout bounds each driver read, in the background.
	statsTimeout = 10 * time.Second
	// statsWorkers read in parallel, so one slow VM does not hold up the
	// containers' readings.
	statsWorkers = 4
	// maxWorkloadSeries caps the per-workload series (six each).
	maxWorkloadSeries = 1000
)

type reading struct {
	id, name, tenant, image string
	iso                     api.Isolation
	st                      api.Stats
	at                      time.Time
}

// workloadCollector serves per-workload usage from a cache that a scrape
// refreshes in the background: the scrape never waits on a driver longer
// than statsWait, and no goroutine runs while nobody scrapes.
type workloadCollector struct {
	b Backend
	// maxAge, wait, timeout, workers and maxSeries are the constants
	// above (tests shorten them).
	maxAge, wait, timeout time.Duration
	workers, maxSeries    int

	mu         sync.Mutex
	readings   map[string]reading
	refreshing chan struct{} // closed when the running refresh ends
	refreshed  time.Time     // when the last refresh began
	omitted    int
}

func newWorkloadCollector(b Backend) *workloadCollector {
	return &workloadCollector{b: b, readings: map[string]reading{},
		maxAge: statsMaxAge, wait: statsWait, timeout: statsTimeout, workers: statsWorkers, maxSeries: maxWorkloadSeries}
}

func (c *workloadCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCPU, descMemUsage, descMemWorkSet, descMemLimit, descThreads, descThreadsMax, descStatsAge, descStatsOmitted} {
		ch <- d
	}
}

func (c *workloadCollector) Collect(ch chan<- prometheus.Metric) {
	if done := c.refresh(); done != nil {
		t := time.NewTimer(c.wait)
		select {
		case <-done:
		case <-t.C:
		}
		t.Stop()
	}
	c.mu.Lock()
	rs := make([]reading, 0, len(c.readings))
	for _, r := range c.readings {
		rs = append(rs, r)
	}
	omitted := c.omitted
	c.mu.Unlock()
	var oldest time.Time
	for _, r := range rs {
		l := []string{r.id, r.name, r.tenant, r.image, string(r.iso)}
		ch <- prometheus.MustNewConstMetric(descCPU, prometheus.CounterValue, float64(r.st.CPUUsageNanos)/1e9, l...)
		ch <- prometheus.MustNewConstMetric(descMemUsage, prometheus.GaugeValue, float64(r.st.MemoryBytes), l...)
		ch <- prometheus.MustNewConstMetric(descMemWorkSet, prometheus.GaugeValue, float64(r.st.MemoryWorkingSetBytes), l...)
		ch <- prometheus.MustNewConstMetric(descMemLimit, prometheus.GaugeValue, float64(r.st.MemoryLimit), l...)
		ch <- prometheus.MustNewConstMetric(descThreads, prometheus.GaugeValue, float64(r.st.Pids), l...)
		ch <- prometheus.MustNewConstMetric(descThreadsMax, prometheus.GaugeValue, float64(r.st.PidsLimit), l...)
		if oldest.IsZero() || r.at.Before(oldest) {
			oldest = r.at
		}
	}
	age := 0.0
	if !oldest.IsZero() {
		age = time.Since(oldest).Seconds()
	}
	ch <- prometheus.MustNewConstMetric(descStatsAge, prometheus.GaugeValue, age)
	ch <- prometheus.MustNewConstMetric(descStatsOmitted, prometheus.GaugeValue, float64(omitted))
}

// refresh starts a background read of every running workload unless one
// runs or the last began less than statsMaxAge ago; it returns the channel
// closed when the running refresh ends, or nil when none runs.
func (c *workloadCollector) refresh() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.refreshing != nil {
		return c.refreshing
	}
	if !c.refreshed.IsZero() && time.Since(c.refreshed) < c.maxAge {
		return nil
	}
	done := make(chan struct{})
	c.refreshing, c.refreshed = done, time.Now()
	go c.readAll(done)
	return done
}

// readAll reads each running workload's usage, publishing each reading as
// it arrives. A read that fails or times out keeps the workload's last
// reading (its counters stay monotonic); workloads no longer running are
// dropped at the end.
func (c *workloadCollector) readAll(done chan struct{}) {
	defer func() {
		c.mu.Lock()
		c.refreshing = nil
		c.mu.Unlock()
		close(done)
	}()
	var ws []api.Workload
	for _, st := range []api.State{api.StateRunning, api.StateStopping} {
		ws = append(ws, c.b.List(context.Background(), api.ListFilter{State: st})...)
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i].ID < ws[j].ID })
	omitted := 0
	if len(ws) > c.maxSeries {
		omitted, ws = len(ws)-c.maxSeries, ws[:c.maxSeries]
	}
	work := make(chan api.Workload)
	var wg sync.WaitGroup
	for range min(c.workers, len(ws)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for w := range work {
				ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
				st, err := c.b.Stats(ctx, w.ID)
				cancel()
				if err != nil {
					continue
				}
				c.mu.Lock()
				c.readings[w.ID] = reading{id: w.ID, name: w.Name, tenant: w.Tenant, image: w.Spec.Image, iso: w.Isolation, st: *st, at: time.Now()}
				c.mu.Unlock()
			}
		}()
	}
	for _, w := range ws {
		work <- w
	}
	close(work)
	wg.Wait()
	keep := make(map[string]bool, len(ws))
	for _, w := range ws {
		keep[w.ID] = true
	}
	c.mu.Lock()
	for id := range c.readings {
		if !keep[id] {
			delete(c.readings, id)
		}
	}
	c.omitted = omitted
	c.mu.Unlock()
}
