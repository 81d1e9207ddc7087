package driver

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/client/lib/cpustats"
	"github.com/hashicorp/nomad/helper/pluginutils/hclutils"
	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// A job's health block, as Nomad decodes it from HCL, becomes the spec's
// health check; restart.on_unhealthy stays off whatever the block says,
// so that Nomad's check_restart alone restarts the task.
func TestHealthBlockBecomesTheSpecsCheck(t *testing.T) {
	for _, tc := range []struct {
		name, hcl string
		want      *api.HealthCheck
	}{
		{"exec", `
config {
  image = "busybox"
  health {
    exec         = ["test", "-f", "/tmp/ready"]
    interval     = "2s"
    timeout      = "1s"
    retries      = 2
    start_period = "1m"
  }
}`, &api.HealthCheck{Exec: []string{"test", "-f", "/tmp/ready"}, Interval: api.Duration(2 * time.Second), Timeout: api.Duration(time.Second), Retries: 2, StartPeriod: api.Duration(time.Minute)}},
		{"http", `
config {
  image = "busybox"
  health {
    http {
      port = 8080
      path = "/ready"
    }
  }
}`, &api.HealthCheck{HTTP: &api.HTTPCheck{Port: 8080, Path: "/ready"}}},
		{"tcp", `
config {
  image = "busybox"
  health {
    tcp { port = 6379 }
    interval = "500ms"
  }
}`, &api.HealthCheck{TCP: &api.TCPCheck{Port: 6379}, Interval: api.Duration(500 * time.Millisecond)}},
		{"none", `
config {
  image = "busybox"
}`, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfg TaskConfig
			hclutils.NewConfigParser(taskConfigSpec).ParseHCL(t, tc.hcl, &cfg)
			if err := cfg.validate(); err != nil {
				t.Fatal(err)
			}
			spec := Spec(&drivers.TaskConfig{ID: "a/t/1", AllocID: "a", Name: "t"}, &cfg, cpustats.Compute{})
			if !reflect.DeepEqual(spec.Health, tc.want) {
				t.Errorf("health %+v, want %+v", spec.Health, tc.want)
			}
			if spec.Restart.OnUnhealthy || spec.Restart.Policy != api.RestartNever {
				t.Errorf("restart %+v: berth must not restart a Nomad task", spec.Restart)
			}
		})
	}
}

// A health block berth could not use fails the task's start with the
// field named, before anything is submitted.
func TestBadHealthBlockIsRefused(t *testing.T) {
	for _, tc := range []struct {
		health *TaskHealth
		want   string
	}{
		{&TaskHealth{Exec: []string{"true"}, Interval: "soon"}, "health.interval"},
		{&TaskHealth{Exec: []string{"true"}, Timeout: "-1s"}, "health.timeout"},
		{&TaskHealth{Exec: []string{"true"}, StartPeriod: "1 minute"}, "health.start_period"},
		{&TaskHealth{}, "exactly one of exec, http or tcp"},
		{&TaskHealth{Exec: []string{"true"}, TCP: &TaskHealthTCP{Port: 1}}, "exactly one of exec, http or tcp"},
	} {
		cfg := TaskConfig{Image: "busybox", Health: tc.health}
		if err := cfg.validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error naming %q", tc.health, err, tc.want)
		}
	}
}

// A change of health is a Nomad task event saying the new state (with the
// failing probe's output when unhealthy), and the task's driver
// attributes carry the current state.
func TestHealthIsReportedToNomad(t *testing.T) {
	msg, attrs := healthEvent(api.Event{Type: api.EventWorkloadHealth, Attrs: map[string]string{"status": "unhealthy", "previous": "healthy", "output": "connection refused\n"}})
	if msg != "berth: health check: unhealthy (connection refused)" || attrs["health"] != "unhealthy" || attrs["previous"] != "healthy" {
		t.Errorf("event %q %v", msg, attrs)
	}
	msg, attrs = healthEvent(api.Event{Type: api.EventWorkloadHealth, Attrs: map[string]string{"status": "healthy", "previous": "starting"}})
	if msg != "berth: health check: healthy" || attrs["health"] != "healthy" {
		t.Errorf("event %q %v", msg, attrs)
	}
	w := &api.Workload{Health: &api.HealthStatus{Status: "unhealthy", FailingStreak: 3, Log: []api.HealthResult{{Output: "ok"}, {Output: "exit 1"}}}}
	if got := healthAttributes(w); got["health"] != "unhealthy" || got["health_failing_streak"] != "3" || got["health_output"] != "exit 1" {
		t.Errorf("attributes %v", got)
	}
	if got := healthAttributes(&api.Workload{}); got != nil {
		t.Errorf("a workload without a check has health attributes %v", got)
	}
}

// Through the driver: a berth workload.health event of a task's workload
// becomes a Nomad task event, and InspectTask carries the workload's
// health in the task's driver attributes.
func TestHealthReachesNomadThroughTheDriver(t *testing.T) {
	const id = "w1"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/events":
			if r.URL.Query().Get("workload") != id {
				http.Error(w, "wrong workload", http.StatusBadRequest)
				return
			}
			w.Header().Set("Content-Type", "text/event-stream")
			data, _ := json.Marshal(api.Event{ID: 1, Type: api.EventWorkloadHealth, WorkloadID: id, Message: "workload w1 is unhealthy",
				Attrs: map[string]string{"status": "unhealthy", "previous": "healthy", "output": "exit status 1"}})
			fmt.Fprintf(w, "id: 1\ndata: %s\n\n", data)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		case "/v1/workloads/" + id:
			json.NewEncoder(w).Encode(api.Workload{ID: id, State: api.StateRunning,
				Health: &api.HealthStatus{Status: api.HealthUnhealthy, FailingStreak: 2, Log: []api.HealthResult{{Output: "exit status 1"}}}})
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	d := New(hclog.NewNullLogger())
	defer d.Shutdown()
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	d.client = c
	cfg := &drivers.TaskConfig{ID: "a/web/1", AllocID: "a", Name: "web"}
	h := newTaskHandle(d, cfg, State{WorkloadID: id, Isolation: "container", StartedAt: time.Now()})
	d.tasks[cfg.ID] = h
	defer h.close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	events, err := d.TaskEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	go h.forwardEvents()
	select {
	case ev := <-events:
		if ev.TaskID != cfg.ID || ev.Message != "berth: health check: unhealthy (exit status 1)" || ev.Annotations["health"] != "unhealthy" {
			t.Errorf("task event %+v", ev)
		}
	case <-ctx.Done():
		t.Fatal("no task event")
	}

	st, err := d.InspectTask(cfg.ID)
	if err != nil {
		t.Fatal(err)
	}
	if a := st.DriverAttributes; a["health"] != "unhealthy" || a["health_failing_streak"] != "2" || a["health_output"] != "exit status 1" {
		t.Errorf("driver attributes %v", a)
	}
}
