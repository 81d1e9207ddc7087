package server_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/berthd/berth/api"
)

// scrape gets /metrics as Prometheus does (text format) and parses it
// with the client library's own parser, which rejects what Prometheus
// would: a family's samples split by another's, a duplicate series, a
// malformed line.
func (e *env) scrape() (map[string]*dto.MetricFamily, []byte) {
	e.t.Helper()
	resp, err := http.Get(e.srv.URL + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain; version=0.0.4") {
		e.t.Fatalf("%s %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		e.t.Fatalf("/metrics does not parse: %v\n%s", err, body)
	}
	return fams, body
}

// sample finds the series of family name whose labels include want.
func sample(fams map[string]*dto.MetricFamily, name string, want map[string]string) *dto.Metric {
	f := fams[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

func TestMetricsParseAndLint(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	w := e.submitSleep(c)
	// A request that fails, to see it counted under its route and code.
	if _, _, err := c.Get(context.Background(), "no-such-workload", nil); err == nil {
		t.Fatal("get of a missing workload succeeded")
	}
	e.waitWorkload(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	// A start that fails is counted apart from the durations.
	e.ctr.FailNext("Start", errors.New("injected start failure"))
	bad := e.submitSleep(c)
	e.waitWorkload(bad.ID, func(w *api.Workload) bool { return w.State.Terminal() })

	var fams map[string]*dto.MetricFamily
	var body []byte
	deadline := time.Now().Add(15 * time.Second)
	for {
		// The per-workload reading is made in the background of a scrape.
		fams, body = e.scrape()
		if sample(fams, "container_cpu_usage_seconds_total", map[string]string{"id": w.ID}) != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no per-workload series for %s in:\n%s", w.ID, body)
		}
		time.Sleep(50 * time.Millisecond)
	}

	problems, err := promlint.New(bytes.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint (scraped text): %s: %s", p.Metric, p.Text)
	}
	problems, err = testutil.GatherAndLint(e.metrics.Registry())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint (registry): %s: %s", p.Metric, p.Text)
	}

	gauge := func(name string, labels map[string]string, want float64) {
		t.Helper()
		m := sample(fams, name, labels)
		if m == nil {
			t.Errorf("no %s%v", name, labels)
			return
		}
		if got := m.GetGauge().GetValue(); got != want {
			t.Errorf("%s%v = %v, want %v", name, labels, got, want)
		}
	}
	gauge("berth_workloads", map[string]string{"state": "running"}, 1)
	gauge("berth_workloads_by_isolation", map[string]string{"isolation": "container"}, 2)
	gauge("berth_driver_healthy", map[string]string{"driver": "container"}, 1)
	gauge("berth_node_condition", map[string]string{"condition": "Ready", "reason": "DriversHealthy"}, 1)
	gauge("berth_node_cpu_cores", map[string]string{"kind": "allocated"}, 1)

	if m := sample(fams, "berth_http_requests_total", map[string]string{"method": "GET", "route": "/v1/workloads/{ref}", "code": "404"}); m.GetCounter().GetValue() != 1 {
		t.Errorf("404s of GET /v1/workloads/{ref}: %v", m)
	}
	if f := fams["berth_http_request_duration_seconds"]; f.GetType() != dto.MetricType_HISTOGRAM {
		t.Errorf("request durations are a %v, want a histogram", f.GetType())
	}
	if m := sample(fams, "berth_http_request_duration_seconds", map[string]string{"method": "GET", "route": "/v1/workloads/{ref}", "code": "404"}); m.GetHistogram().GetSampleCount() != 1 {
		t.Errorf("404 durations of GET /v1/workloads/{ref}: %v", m)
	}
	if m := sample(fams, "berth_workload_start_duration_seconds", map[string]string{"isolation": "container"}); m.GetHistogram().GetSampleCount() != 1 {
		t.Errorf("container start durations: %v, want one start", m)
	}
	if m := sample(fams, "berth_workload_start_failures_total", map[string]string{"isolation": "container"}); m.GetCounter().GetValue() != 1 {
		t.Errorf("container start failures: %v, want one", m)
	}

	labels := map[string]string{"id": w.ID, "name": w.Name, "image": testImage, "isolation": "container"}
	if m := sample(fams, "container_memory_working_set_bytes", labels); m.GetGauge().GetValue() <= 0 {
		t.Errorf("working set of %s: %v", w.ID, m)
	}
	if m := sample(fams, "container_spec_memory_limit_bytes", labels); m.GetGauge().GetValue() != 128<<20 {
		t.Errorf("memory limit of %s: %v, want 128 MiB", w.ID, m)
	}
	// The failed workload never ran: no usage series for it.
	if m := sample(fams, "container_cpu_usage_seconds_total", map[string]string{"id": bad.ID}); m != nil {
		t.Errorf("usage series for %s, which never ran: %v", bad.ID, m)
	}
	if fams["go_goroutines"] == nil || fams["process_resident_memory_bytes"] == nil {
		t.Error("no Go runtime or process metrics")
	}
}

// TestMetricsKeepNames: every family (and the one series) that /metrics
// had before it moved to the client library is still served under the
// same name and labels, so dashboards keep working. docs/metrics.md says
// what changed type.
func TestMetricsKeepNames(t *testing.T) {
	e := newEnv(t)
	c := e.client()
	if _, _, err := c.Get(context.Background(), "no-such-workload", nil); err == nil {
		t.Fatal("get of a missing workload succeeded")
	}
	fams, body := e.scrape()
	for name, labels := range map[string][]string{
		"berth_info":                         {"version", "node_id"},
		"berth_uptime_seconds":               nil,
		"berth_state_index":                  nil,
		"berth_workloads":                    {"state"},
		"berth_workloads_by_isolation":       {"isolation"},
		"berth_node_cpu_cores":               {"kind"},
		"berth_node_memory_bytes":            {"kind"},
		"berth_driver_healthy":               {"driver"},
		"berth_node_condition":               {"condition", "reason"},
		"berth_policy_info":                  {"version", "source"},
		"berth_policy_reloads_total":         nil,
		"berth_policy_reload_failures_total": nil,
		"berth_policy_reload_error":          nil,
		"berth_http_requests_total":          {"method", "route", "code"},
	} {
		f := fams[name]
		if f == nil || len(f.GetMetric()) == 0 {
			t.Errorf("family %s is gone", name)
			continue
		}
		have := map[string]bool{}
		for _, l := range f.GetMetric()[0].GetLabel() {
			have[l.GetName()] = true
		}
		for _, l := range labels {
			if !have[l] {
				t.Errorf("%s lost its label %s", name, l)
			}
		}
	}
	// The old counter berth_http_request_duration_seconds_sum is now the
	// histogram's sum series: same name and labels in the scraped text.
	want := `berth_http_request_duration_seconds_sum{code="404",method="GET",route="/v1/workloads/{ref}"} `
	if !bytes.Contains(body, []byte(want)) {
		t.Errorf("no %q in:\n%s", want, body)
	}
}
