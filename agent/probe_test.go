package agent

import (
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
)

// An exec health check makes a running workload healthy, then unhealthy
// once the check fails Retries times in a row (each change an event that
// moves the index); with on_unhealthy the workload is restarted under its
// restart policy, and starts over as starting.
func TestHealthCheckFlipsAndRestarts(t *testing.T) {
	e := newEnv(t)
	marker := filepath.Join(t.TempDir(), "sick")
	spec := sh("sleep 1000")
	spec.Health = &api.HealthCheck{Exec: []string{"sh", "-c", "test ! -e " + marker}, Interval: api.Duration(100 * time.Millisecond), Retries: 2}
	spec.Restart = api.RestartSpec{Policy: api.RestartAlways, OnUnhealthy: true}
	from := e.agent.events.lastID()
	w := e.submit(spec)
	healthy := e.waitFor(w.ID, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthHealthy })
	if len(healthy.Health.Log) == 0 || !healthy.Health.Log[len(healthy.Health.Log)-1].OK {
		t.Errorf("healthy workload's log: %+v", healthy.Health.Log)
	}
	idx, _ := e.agent.Index()
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	restarted := e.waitFor(w.ID, func(w *api.Workload) bool { return w.RestartCount >= 1 && w.State == api.StateRunning })
	if restarted.Health != nil && restarted.Health.Status == api.HealthUnhealthy {
		t.Errorf("the restarted run inherited the health of the last: %+v", restarted.Health)
	}
	if now, _ := e.agent.Index(); now <= idx {
		t.Errorf("the index did not move: %d then %d", idx, now)
	}
	evs, _, _ := e.agent.events.after(from, func(ev *api.Event) bool { return ev.Type == api.EventWorkloadHealth && ev.WorkloadID == w.ID })
	var seen []string
	for _, ev := range evs {
		seen = append(seen, ev.Attrs["status"])
	}
	if len(seen) < 2 || seen[0] != api.HealthHealthy || seen[1] != api.HealthUnhealthy {
		t.Errorf("health events %v, want healthy then unhealthy", seen)
	}
	os.Remove(marker)
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthHealthy })

	// Without on_unhealthy, an unhealthy workload keeps running.
	spec.Restart = api.RestartSpec{Policy: api.RestartNever}
	spec.Name = "kept"
	k := e.submit(spec)
	e.waitFor(k.ID, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthHealthy })
	os.WriteFile(marker, nil, 0o600)
	got := e.waitFor(k.ID, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthUnhealthy })
	if got.State != api.StateRunning || got.RestartCount != 0 {
		t.Errorf("unhealthy without on_unhealthy: %s restarts %d", got.State, got.RestartCount)
	}
}

// A health check is one of exec, http, tcp, within bounds; on_unhealthy
// needs one.
func TestHealthCheckValidation(t *testing.T) {
	for name, h := range map[string]*api.HealthCheck{
		"none":          {},
		"two":           {Exec: []string{"true"}, TCP: &api.TCPCheck{Port: 80}},
		"bad port":      {TCP: &api.TCPCheck{Port: 70000}},
		"bad path":      {HTTP: &api.HTTPCheck{Port: 80, Path: "healthz"}},
		"fast interval": {Exec: []string{"true"}, Interval: api.Duration(time.Millisecond)},
		"retries":       {Exec: []string{"true"}, Retries: -1},
	} {
		spec := sh("true")
		spec.Image = testImage
		spec.Health = h
		if _, err := normalize(spec, defaultsLikeConfig); err == nil {
			t.Errorf("%s: accepted %+v", name, h)
		}
	}
	spec := sh("true")
	spec.Image = testImage
	spec.Restart.OnUnhealthy = true
	if _, err := normalize(spec, defaultsLikeConfig); err == nil {
		t.Error("on_unhealthy without a health check accepted")
	}
	spec.Health = &api.HealthCheck{HTTP: &api.HTTPCheck{Port: 8080}}
	got, err := normalize(spec, defaultsLikeConfig)
	if err != nil || got.Health.HTTP.Path != "/" || time.Duration(got.Health.Interval) != 30*time.Second || got.Health.Retries != 3 {
		t.Errorf("defaults: %+v %v", got.Health, err)
	}
}

// http and tcp checks reach the workload's address (the node's loopback
// for one without a bridge address): healthy while something answers
// there, unhealthy once it is gone.
func TestHTTPAndTCPHealthChecks(t *testing.T) {
	e := newEnv(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			http.NotFound(w, r)
		}
	}))
	_, portStr, _ := net.SplitHostPort(strings.TrimPrefix(srv.URL, "http://"))
	port, _ := strconv.Atoi(portStr)
	every := api.Duration(100 * time.Millisecond)
	checks := map[string]*api.HealthCheck{
		"http": {HTTP: &api.HTTPCheck{Port: port, Path: "/healthz"}, Interval: every, Retries: 1},
		"tcp":  {TCP: &api.TCPCheck{Port: port}, Interval: every, Retries: 1},
	}
	ids := map[string]string{}
	for name, h := range checks {
		spec := sh("sleep 1000")
		spec.Health = h
		ids[name] = e.submit(spec).ID
	}
	bad := sh("sleep 1000")
	bad.Health = &api.HealthCheck{HTTP: &api.HTTPCheck{Port: port, Path: "/missing"}, Interval: every, Retries: 1}
	badID := e.submit(bad).ID
	for _, id := range ids {
		e.waitFor(id, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthHealthy })
	}
	got := e.waitFor(badID, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthUnhealthy })
	if last := got.Health.Log[len(got.Health.Log)-1]; last.OK || !strings.Contains(last.Output, "404") {
		t.Errorf("a 404: %+v", last)
	}
	srv.Close()
	for name, id := range ids {
		w := e.waitFor(id, func(w *api.Workload) bool { return w.Health != nil && w.Health.Status == api.HealthUnhealthy })
		if w.State != api.StateRunning {
			t.Errorf("%s: %s", name, w.State)
		}
	}
}
