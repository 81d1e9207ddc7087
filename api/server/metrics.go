package server

import (
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/berthd/berth/api"
)

// Metrics is what GET /metrics exposes: the agent's own registry (never
// the process-global one, so two agents in one test binary do not share
// counters), the API's request histogram, the workloads' start
// durations, and collectors that read the node, the policy and the
// running workloads at scrape time. docs/metrics.md lists every family.
type Metrics struct {
	reg *prometheus.Registry

	requests      *prometheus.CounterVec
	requestTime   *prometheus.HistogramVec
	startTime     *prometheus.HistogramVec
	startFailures *prometheus.CounterVec
}

// NewMetrics returns an empty registry with berth's own families and the
// Go runtime's and the process's. It is given to one Server (Options), and
// its ObserveStart to the agent, which is made first.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_http_requests_total",
			Help: "API requests by method, route pattern and status code.",
		}, []string{"method", "route", "code"}),
		requestTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "berth_http_request_duration_seconds",
			Help:    "Time to serve an API request, by method, route pattern and status code (streams and blocking queries count until they end).",
			Buckets: prometheus.DefBuckets,
		}, []string{"method", "route", "code"}),
		startTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "berth_workload_start_duration_seconds",
			Help: "Time from starting to running of each workload start that succeeded, by isolation.",
			// Containers start in tens of milliseconds to a second, VMs
			// under TCG in several seconds.
			Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 30, 60, 120},
		}, []string{"isolation"}),
		startFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "berth_workload_start_failures_total",
			Help: "Workload starts that failed, by isolation.",
		}, []string{"isolation"}),
	}
	m.reg.MustRegister(m.requests, m.requestTime, m.startTime, m.startFailures,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is the registry /metrics serves (tests gather and lint it).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ObserveStart records one start's outcome; it is agent.Options.OnStart.
func (m *Metrics) ObserveStart(iso api.Isolation, took time.Duration, err error) {
	if err != nil {
		m.startFailures.WithLabelValues(string(iso)).Inc()
		return
	}
	m.startTime.WithLabelValues(string(iso)).Observe(took.Seconds())
}

// knownMethods bound the method label: a client can send any token as a
// method, and each would otherwise make new series.
var knownMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

// observeRequest counts one request under its chi route pattern, so the
// label set is bounded whatever the paths.
func (m *Metrics) observeRequest(method, route string, status int, took time.Duration) {
	if route == "" {
		route = "unmatched"
	}
	if !knownMethods[method] {
		method = "other"
	}
	code := strconv.Itoa(status)
	m.requests.WithLabelValues(method, route, code).Inc()
	m.requestTime.WithLabelValues(method, route, code).Observe(took.Seconds())
}

// metricsHandler serves the registry in the text format Prometheus
// scrapes (or OpenMetrics / protobuf when the scraper asks for them).
func (m *Metrics) handler(s *Server) http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      slogPrinter{s},
		ErrorHandling: promhttp.ContinueOnError,
	})
}

// slogPrinter hands promhttp's errors (a collector that failed) to the
// server's logger.
type slogPrinter struct{ s *Server }

func (p slogPrinter) Println(v ...any) { p.s.log.Warn("metrics", "err", v) }
