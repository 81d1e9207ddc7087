package driver

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/plugins/drivers"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
)

// An agent that answers, hangs or is gone: every round ends within its
// bound, and any failure is an unhealthy fingerprint.
func TestProbeNode(t *testing.T) {
	hang := make(chan struct{})
	defer close(hang)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("index") != "" && r.URL.Query().Get("index") != "0" {
			select { // a blocking query that never returns
			case <-hang:
			case <-r.Context().Done():
			}
			return
		}
		w.Header().Set(client.IndexHeader, "7")
		json.NewEncoder(w).Encode(api.Node{ID: "n1", Drivers: map[string]api.DriverStatus{"container": {Healthy: true}}})
	}))
	c, err := client.New(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	n, idx, err := probeNode(ctx, c, 0, time.Second, time.Second)
	if err != nil || n.ID != "n1" || idx != 7 {
		t.Fatalf("answering agent: %+v %d %v", n, idx, err)
	}
	if fp := NodeFingerprint(n); fp.Health != drivers.HealthStateHealthy {
		t.Errorf("answering agent: health %s", fp.Health)
	}

	start := time.Now()
	_, idx, err = probeNode(ctx, c, 7, 200*time.Millisecond, 300*time.Millisecond)
	if err == nil || idx != 0 {
		t.Fatalf("hung agent: index %d, err %v; want an error and index 0", idx, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("hung agent: the round took %s", d)
	}
	if fp := unreachable(err); fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "no answer within") {
		t.Errorf("hung agent: %s %q", fp.Health, fp.HealthDescription)
	}

	srv.Close()
	start = time.Now()
	_, _, err = probeNode(ctx, c, 0, time.Second, time.Second)
	if err == nil {
		t.Fatal("stopped agent: no error")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("stopped agent: the round took %s", d)
	}
	fp := unreachable(err)
	if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "unreachable") || strings.Contains(fp.HealthDescription, "/v1/node") {
		t.Errorf("stopped agent: %s %q", fp.Health, fp.HealthDescription)
	}
}

// A cordoned or draining berth node is an unhealthy driver to Nomad, which
// then places nothing there; uncordoned, it is healthy again.
func TestNodeFingerprintCordoned(t *testing.T) {
	n := &api.Node{ID: "n1", Schedulable: true, Drivers: map[string]api.DriverStatus{"container": {Healthy: true}}}
	if fp := NodeFingerprint(n); fp.Health != drivers.HealthStateHealthy {
		t.Fatalf("schedulable node: %s %q", fp.Health, fp.HealthDescription)
	}
	n.Schedulable, n.Cordon = false, &api.NodeCordon{Since: time.Now(), Reason: "kernel update"}
	fp := NodeFingerprint(n)
	if fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "cordoned: kernel update") {
		t.Errorf("cordoned node: %s %q", fp.Health, fp.HealthDescription)
	}
	if v, ok := fp.Attributes["driver.berth.schedulable"].GetBool(); !ok || v {
		t.Errorf("cordoned node: driver.berth.schedulable = %v", fp.Attributes["driver.berth.schedulable"])
	}
	n.Cordon.Draining = true
	if fp := NodeFingerprint(n); fp.Health != drivers.HealthStateUnhealthy || !strings.Contains(fp.HealthDescription, "draining") {
		t.Errorf("draining node: %s %q", fp.Health, fp.HealthDescription)
	}
}
