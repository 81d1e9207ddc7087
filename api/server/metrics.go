package server

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/berthd/berth/api"
)

// httpMetrics counts requests by route and status class, and their
// latency, for /metrics. Routes are chi patterns, so the label set is
// bounded whatever the paths.
type httpMetrics struct {
	mu   sync.Mutex
	reqs map[reqKey]*reqStat
}

type reqKey struct{ method, route, code string }

type reqStat struct {
	count uint64
	sum   float64 // seconds
}

func (m *httpMetrics) observe(method, route string, status int, d time.Duration) {
	if route == "" {
		route = "unmatched"
	}
	k := reqKey{method, route, strconv.Itoa(status)}
	m.mu.Lock()
	if m.reqs == nil {
		m.reqs = map[reqKey]*reqStat{}
	}
	st := m.reqs[k]
	if st == nil {
		st = &reqStat{}
		m.reqs[k] = st
	}
	st.count++
	st.sum += d.Seconds()
	m.mu.Unlock()
}

// promWriter writes the Prometheus text exposition format (version 0.0.4).
type promWriter struct {
	w    io.Writer
	err  error
	seen map[string]bool
}

func (p *promWriter) family(name, typ, help string) {
	if p.seen[name] {
		return
	}
	p.seen[name] = true
	p.printf("# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
}

func (p *promWriter) sample(name string, value float64, labels ...string) {
	var b strings.Builder
	b.WriteString(name)
	if len(labels) > 0 {
		b.WriteByte('{')
		for i := 0; i+1 < len(labels); i += 2 {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(labels[i])
			b.WriteString(`="`)
			b.WriteString(escapeLabel(labels[i+1]))
			b.WriteByte('"')
		}
		b.WriteByte('}')
	}
	p.printf("%s %s\n", b.String(), formatFloat(value))
}

func (p *promWriter) printf(format string, args ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, args...)
	}
}

func escapeLabel(v string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`).Replace(v)
}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// metrics is GET /metrics: the node document and the policy status as
// Prometheus metrics, plus the API's own request counters. It reads only
// what the agent keeps in memory.
func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	be := s.be(r)
	n := be.Node(r.Context())
	pol := be.Policy(r.Context())
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	p := &promWriter{w: w, seen: map[string]bool{}}

	p.family("berth_info", "gauge", "Agent version and node id (always 1).")
	p.sample("berth_info", 1, "version", n.Version, "node_id", n.ID)
	p.family("berth_uptime_seconds", "gauge", "Seconds since the agent started.")
	p.sample("berth_uptime_seconds", n.UptimeSeconds)
	p.family("berth_state_index", "gauge", "The node's state index (moves on every change).")
	p.sample("berth_state_index", float64(n.Index))

	p.family("berth_workloads", "gauge", "Workloads on the node by state.")
	states := make([]string, 0, len(n.Workloads.ByState))
	for st := range n.Workloads.ByState {
		states = append(states, string(st))
	}
	sort.Strings(states)
	for _, st := range states {
		p.sample("berth_workloads", float64(n.Workloads.ByState[api.State(st)]), "state", st)
	}
	p.family("berth_workloads_by_isolation", "gauge", "Workloads on the node by isolation.")
	isos := make([]string, 0, len(n.Workloads.ByIsolation))
	for iso := range n.Workloads.ByIsolation {
		isos = append(isos, string(iso))
	}
	sort.Strings(isos)
	for _, iso := range isos {
		p.sample("berth_workloads_by_isolation", float64(n.Workloads.ByIsolation[api.Isolation(iso)]), "isolation", iso)
	}

	for _, res := range []struct {
		name string
		v    api.NodeResources
	}{{"capacity", n.Capacity}, {"allocatable", n.Allocatable}, {"allocated", n.Allocated}} {
		p.family("berth_node_cpu_cores", "gauge", "Node CPU cores: capacity, allocatable and allocated to workloads.")
		p.sample("berth_node_cpu_cores", res.v.CPU, "kind", res.name)
		p.family("berth_node_memory_bytes", "gauge", "Node memory: capacity, allocatable and allocated to workloads.")
		p.sample("berth_node_memory_bytes", float64(res.v.MemoryMB<<20), "kind", res.name)
	}

	names := make([]string, 0, len(n.Drivers))
	for name := range n.Drivers {
		names = append(names, name)
	}
	sort.Strings(names)
	p.family("berth_driver_healthy", "gauge", "1 when the driver can run workloads.")
	for _, name := range names {
		p.sample("berth_driver_healthy", b2f(n.Drivers[name].Healthy), "driver", name)
	}
	for _, c := range n.Conditions {
		p.family("berth_node_condition", "gauge", "Node conditions (1 = true).")
		p.sample("berth_node_condition", b2f(c.Status), "condition", c.Type, "reason", c.Reason)
	}

	p.family("berth_policy_info", "gauge", "The active isolation policy (always 1).")
	p.sample("berth_policy_info", 1, "version", pol.Version, "source", pol.Source)
	p.family("berth_policy_reloads_total", "counter", "Policy file changes applied.")
	p.sample("berth_policy_reloads_total", float64(pol.Reloads))
	p.family("berth_policy_reload_failures_total", "counter", "Policy file changes rejected (invalid or unreadable).")
	p.sample("berth_policy_reload_failures_total", float64(pol.ReloadFailures))
	p.family("berth_policy_reload_error", "gauge", "1 while the policy file on disk is not the active policy.")
	p.sample("berth_policy_reload_error", b2f(pol.LastReloadError != nil))

	s.httpm.mu.Lock()
	rk := make([]reqKey, 0, len(s.httpm.reqs))
	for k := range s.httpm.reqs {
		rk = append(rk, k)
	}
	sort.Slice(rk, func(i, j int) bool {
		a, b := rk[i], rk[j]
		return a.route+a.method+a.code < b.route+b.method+b.code
	})
	stats := make([]reqStat, len(rk))
	for i, k := range rk {
		stats[i] = *s.httpm.reqs[k]
	}
	s.httpm.mu.Unlock()
	p.family("berth_http_requests_total", "counter", "API requests by method, route and status.")
	for i, k := range rk {
		p.sample("berth_http_requests_total", float64(stats[i].count), "method", k.method, "route", k.route, "code", k.code)
	}
	p.family("berth_http_request_duration_seconds_sum", "counter", "Total seconds spent serving API requests by method, route and status.")
	for i, k := range rk {
		p.sample("berth_http_request_duration_seconds_sum", stats[i].sum, "method", k.method, "route", k.route, "code", k.code)
	}
	if p.err != nil {
		s.log.Debug("write metrics", "err", p.err)
	}
}
