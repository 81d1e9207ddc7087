package server

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/berthd/berth/api"
)

// nodeCollector turns the node document and the policy status into
// metrics at scrape time. Both are kept in the agent's memory: reading
// them never waits on a driver.
type nodeCollector struct {
	b Backend
}

var (
	descInfo            = prometheus.NewDesc("berth_info", "Agent version and node id (always 1).", []string{"version", "node_id"}, nil)
	descUptime          = prometheus.NewDesc("berth_uptime_seconds", "Seconds since the agent started.", nil, nil)
	descStateIndex      = prometheus.NewDesc("berth_state_index", "The node's state index (moves on every change).", nil, nil)
	descWorkloads       = prometheus.NewDesc("berth_workloads", "Workloads on the node by state.", []string{"state"}, nil)
	descWorkloadsByIso  = prometheus.NewDesc("berth_workloads_by_isolation", "Workloads on the node by isolation.", []string{"isolation"}, nil)
	descNodeCPU         = prometheus.NewDesc("berth_node_cpu_cores", "Node CPU cores: capacity, reserved, allocatable and allocated to workloads.", []string{"kind"}, nil)
	descNodeMemory      = prometheus.NewDesc("berth_node_memory_bytes", "Node memory: capacity, reserved, allocatable and allocated to workloads.", []string{"kind"}, nil)
	descDriverHealthy   = prometheus.NewDesc("berth_driver_healthy", "1 when the driver can run workloads.", []string{"driver"}, nil)
	descDriverInfo      = prometheus.NewDesc("berth_driver_info", "Each driver's version (always 1).", []string{"driver", "version"}, nil)
	descCondition       = prometheus.NewDesc("berth_node_condition", "Node conditions (1 = true).", []string{"condition", "reason"}, nil)
	descPolicyInfo      = prometheus.NewDesc("berth_policy_info", "The active isolation policy (always 1).", []string{"version", "source"}, nil)
	descPolicyReloads   = prometheus.NewDesc("berth_policy_reloads_total", "Policy file changes applied.", nil, nil)
	descPolicyFailures  = prometheus.NewDesc("berth_policy_reload_failures_total", "Policy file changes rejected (invalid or unreadable).", nil, nil)
	descPolicyReloadErr = prometheus.NewDesc("berth_policy_reload_error", "1 while the policy file on disk is not the active policy.", nil, nil)
)

func (c *nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInfo, descUptime, descStateIndex, descWorkloads, descWorkloadsByIso,
		descNodeCPU, descNodeMemory, descDriverHealthy, descDriverInfo, descCondition,
		descPolicyInfo, descPolicyReloads, descPolicyFailures, descPolicyReloadErr} {
		ch <- d
	}
}

func (c *nodeCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n := c.b.Node(ctx)
	pol := c.b.Policy(ctx)
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	gauge(descInfo, 1, n.Version, n.ID)
	gauge(descUptime, n.UptimeSeconds)
	gauge(descStateIndex, float64(n.Index))
	// Every state and isolation has a series, zero included: a series
	// that appears only when it is non-zero breaks rate() and alerts.
	byState := map[api.State]int{api.StatePending: 0, api.StateStarting: 0, api.StateRunning: 0,
		api.StateStopping: 0, api.StateExited: 0, api.StateFailed: 0}
	for st, count := range n.Workloads.ByState {
		byState[st] = count
	}
	for st, count := range byState {
		gauge(descWorkloads, float64(count), string(st))
	}
	byIso := map[api.Isolation]int{api.IsolationContainer: 0, api.IsolationVM: 0}
	for iso, count := range n.Workloads.ByIsolation {
		byIso[iso] = count
	}
	for iso, count := range byIso {
		gauge(descWorkloadsByIso, float64(count), string(iso))
	}
	for kind, res := range map[string]struct {
		cpu float64
		mb  int64
	}{
		"capacity":    {n.Capacity.CPU, n.Capacity.MemoryMB},
		"reserved":    {n.Reserved.CPU, n.Reserved.MemoryMB},
		"allocatable": {n.Allocatable.CPU, n.Allocatable.MemoryMB},
		"allocated":   {n.Allocated.CPU, n.Allocated.MemoryMB},
	} {
		gauge(descNodeCPU, res.cpu, kind)
		gauge(descNodeMemory, float64(res.mb<<20), kind)
	}
	for name, d := range n.Drivers {
		gauge(descDriverHealthy, b2f(d.Healthy), name)
		gauge(descDriverInfo, 1, name, d.Version)
	}
	seen := map[[2]string]bool{}
	for _, cond := range n.Conditions {
		k := [2]string{cond.Type, cond.Reason}
		if seen[k] { // one series per label set, or the scrape fails
			continue
		}
		seen[k] = true
		gauge(descCondition, b2f(cond.Status), cond.Type, cond.Reason)
	}
	gauge(descPolicyInfo, 1, pol.Version, pol.Source)
	counter(descPolicyReloads, float64(pol.Reloads))
	counter(descPolicyFailures, float64(pol.ReloadFailures))
	gauge(descPolicyReloadErr, b2f(pol.LastReloadError != nil))
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
