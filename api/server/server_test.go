package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/openapitest"
)

const testImage = "berth.test/busybox:latest"

type env struct {
	t     *testing.T
	srv   *httptest.Server
	api   *server.Server
	agent *agent.Agent
	ctr   *fake.Driver
	imgs  *image.Store
	// metrics is the registry /metrics serves; the agent reports its
	// starts to it.
	metrics *server.Metrics
	// dir is the agent's data directory.
	dir string
}

// newEnv serves the real agent (state in bbolt, a real image store holding
// the busybox test image) over a fake driver that runs host processes.
func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, testImage); err != nil {
		t.Fatal(err)
	}
	if _, err := imgs.Import(context.Background(), &buf, ""); err != nil {
		t.Fatal(err)
	}
	ctr := fake.New("container", fake.NewNode())
	m := server.NewMetrics()
	a, err := agent.New(context.Background(), agent.Options{Capacity: &api.NodeResources{CPU: 1024, MemoryMB: 1 << 20},
		DataDir:        dir,
		Drivers:        []driver.Driver{ctr},
		Images:         imgs,
		Defaults:       agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout:    2 * time.Second,
		HealthInterval: 20 * time.Millisecond,
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnStart:        m.ObserveStart,
	})
	if err != nil {
		t.Fatal(err)
	}
	s := server.New(a, server.Options{MaxBodyBytes: 4096, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: m})
	hs := httptest.NewServer(openapitest.Handler(t, s))
	t.Cleanup(func() {
		hs.Close()
		for _, w := range a.List(context.Background(), api.ListFilter{}) {
			_ = a.Delete(context.Background(), w.ID, true)
		}
		a.Close()
	})
	return &env{t: t, srv: hs, api: s, agent: a, ctr: ctr, imgs: imgs, metrics: m, dir: dir}
}

func (e *env) do(method, path, contentType string, body io.Reader) *http.Response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.srv.URL+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp
}

// snapshot is everything a request could change: workloads, images, the
// state index and every call that reached the driver.
type snapshot struct {
	workloads int
	images    int
	index     uint64
	calls     int
}

// taskCalls counts the driver calls that change something: reads (a
// supervisor's Ended and Wait, Inspect, Stats, List, Fingerprint) happen
// in the background whenever they happen.
func (e *env) taskCalls() int {
	n := 0
	for _, c := range e.ctr.Calls() {
		switch c.Method {
		case "Fingerprint", "Ended", "Wait", "Inspect", "Stats", "List":
		default:
			n++
		}
	}
	return n
}

func (e *env) snapshot() snapshot {
	idx, _ := e.agent.Index()
	return snapshot{
		workloads: len(e.agent.List(context.Background(), api.ListFilter{})),
		images:    len(e.imgs.List()),
		index:     idx,
		calls:     e.taskCalls(),
	}
}

func TestBadInputIsRejectedAndChangesNothing(t *testing.T) {
	e := newEnv(t)
	// One real workload, so requests naming something that does not exist
	// are checked against a non-empty store.
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(`{"name":"keep","image":"`+testImage+`","command":["sleep","60"]}`))
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("setup submit: %s", resp.Status)
	}
	resp.Body.Close()
	// Let its start settle so the driver's call count is stable.
	deadline := time.Now().Add(10 * time.Second)
	for {
		w, err := e.agent.Get(context.Background(), "keep")
		if err != nil {
			t.Fatal(err)
		}
		if w.State == api.StateRunning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("setup workload stuck in %s", w.State)
		}
		time.Sleep(10 * time.Millisecond)
	}

	spec := func(fields string) string {
		return `{"image":"` + testImage + `","command":["true"]` + fields + `}`
	}
	cases := []struct {
		name        string
		method      string
		path        string
		contentType string
		body        string
		status      int
		reason      string
		field       string // a field the problem must name, if any
	}{
		{"malformed JSON", "POST", "/v1/workloads", "application/json", `{"image":`, 400, api.ReasonMalformedBody, ""},
		{"not an object", "POST", "/v1/workloads", "application/json", `["busybox"]`, 400, api.ReasonInvalidArgument, ""},
		{"unknown field", "POST", "/v1/workloads", "application/json", spec(`,"imagee":"x"`), 400, api.ReasonInvalidArgument, "imagee"},
		{"wrong type", "POST", "/v1/workloads", "application/json", `{"image":"` + testImage + `","command":"true"}`, 400, api.ReasonInvalidArgument, "command"},
		{"trailing data", "POST", "/v1/workloads", "application/json", spec("") + `{}`, 400, api.ReasonMalformedBody, ""},
		{"empty body", "POST", "/v1/workloads", "application/json", ``, 400, api.ReasonMalformedBody, ""},
		{"wrong media type", "POST", "/v1/workloads", "text/plain", spec(""), 415, api.ReasonUnsupportedMedia, ""},
		{"oversized body", "POST", "/v1/workloads", "application/json", spec(`,"labels":{"big":"` + strings.Repeat("x", 8000) + `"}`), 413, api.ReasonBodyTooLarge, ""},
		{"bad image_pull", "POST", "/v1/workloads", "application/json", spec(`,"image_pull":"sometimes"`), 400, api.ReasonInvalidArgument, "image_pull"},
		{"no image", "POST", "/v1/workloads", "application/json", `{"command":["true"]}`, 400, api.ReasonInvalidArgument, "image"},
		{"bad image reference", "POST", "/v1/workloads", "application/json", `{"image":"Not A/Ref::x","command":["true"]}`, 400, api.ReasonInvalidArgument, "image"},
		{"image not on node", "POST", "/v1/workloads", "application/json", `{"image":"berth.test/absent:1","image_pull":"never","command":["true"]}`, 400, api.ReasonImageNotFound, "image"},
		{"bad name", "POST", "/v1/workloads", "application/json", spec(`,"name":"Not_A_Label"`), 400, api.ReasonInvalidArgument, "name"},
		{"negative memory", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"memory_mb":-5}`), 400, api.ReasonInvalidArgument, "resources.memory_mb"},
		{"negative disk", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"disk_mb":-1}`), 400, api.ReasonInvalidArgument, "resources.disk_mb"},
		{"disk too small for a filesystem", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"disk_mb":4}`), 400, api.ReasonInvalidArgument, "resources.disk_mb"},
		{"disk past 16 TiB", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"disk_mb":99999999999}`), 400, api.ReasonInvalidArgument, "resources.disk_mb"},
		{"absurd cpu", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"cpu":1e9}`), 400, api.ReasonInvalidArgument, "resources.cpu"},
		{"negative pids", "POST", "/v1/workloads", "application/json", spec(`,"resources":{"pids":-1}`), 400, api.ReasonInvalidArgument, "resources.pids"},
		{"unknown isolation", "POST", "/v1/workloads", "application/json", spec(`,"isolation":"chroot"`), 400, api.ReasonInvalidArgument, "isolation"},
		{"unknown restart policy", "POST", "/v1/workloads", "application/json", spec(`,"restart":{"policy":"sometimes"}`), 400, api.ReasonInvalidArgument, "restart.policy"},
		{"bad env name", "POST", "/v1/workloads", "application/json", spec(`,"env":{"A=B":"c"}`), 400, api.ReasonInvalidArgument, "env.A=B"},
		{"relative workdir", "POST", "/v1/workloads", "application/json", spec(`,"workdir":"tmp"`), 400, api.ReasonInvalidArgument, "workdir"},
		{"bad label key", "POST", "/v1/workloads", "application/json", spec(`,"labels":{"bad key":"v"}`), 400, api.ReasonInvalidArgument, "labels.bad key"},
		{"empty program", "POST", "/v1/workloads", "application/json", `{"image":"` + testImage + `","command":[""]}`, 400, api.ReasonInvalidArgument, "command[0]"},
		{"same name, other spec", "POST", "/v1/workloads", "application/json", `{"name":"keep","image":"` + testImage + `","command":["sleep","61"]}`, 409, api.ReasonAlreadyExists, ""},
		{"get unknown workload", "GET", "/v1/workloads/nope", "", "", 404, api.ReasonNotFound, ""},
		{"delete unknown workload", "DELETE", "/v1/workloads/nope", "", "", 404, api.ReasonNotFound, ""},
		{"delete running without force", "DELETE", "/v1/workloads/keep", "", "", 409, api.ReasonFailedPrecondition, ""},
		{"stop with bad timeout", "POST", "/v1/workloads/keep/stop?timeout=soon", "", "", 400, api.ReasonInvalidArgument, "timeout"},
		{"logs with negative tail", "GET", "/v1/workloads/keep/logs?tail=-3", "", "", 400, api.ReasonInvalidArgument, "tail"},
		{"logs of unknown stream", "GET", "/v1/workloads/keep/logs?stream=stdin", "", "", 400, api.ReasonInvalidArgument, "stream"},
		{"logs since no time", "GET", "/v1/workloads/keep/logs?since=yesterday", "", "", 400, api.ReasonInvalidArgument, "since"},
		{"logs since a negative duration", "GET", "/v1/workloads/keep/logs?since=-5m", "", "", 400, api.ReasonInvalidArgument, "since"},
		{"logs with bad timestamps", "GET", "/v1/workloads/keep/logs?timestamps=maybe", "", "", 400, api.ReasonInvalidArgument, "timestamps"},
		{"list with bad state", "GET", "/v1/workloads?state=sleeping", "", "", 400, api.ReasonInvalidArgument, "state"},
		{"list with bad index", "GET", "/v1/workloads?index=minus-one", "", "", 400, api.ReasonInvalidArgument, "index"},
		{"get until an unknown condition", "GET", "/v1/workloads/keep?until=running", "", "", 400, api.ReasonInvalidArgument, "until"},
		{"import garbage", "POST", "/v1/images", "application/x-tar", "this is not a tarball", 400, "", ""},
		{"pull without ref", "POST", "/v1/images/pull", "application/json", `{}`, 400, api.ReasonInvalidArgument, "ref"},
		{"remove image in use", "DELETE", "/v1/images?ref=" + testImage, "", "", 409, api.ReasonFailedPrecondition, ""},
		{"remove image without ref", "DELETE", "/v1/images", "", "", 400, api.ReasonInvalidArgument, "ref"},
		{"unknown route", "GET", "/v1/nodes/everything", "", "", 404, api.ReasonRouteNotFound, ""},
		{"wrong method", "PUT", "/v1/workloads", "application/json", spec(""), 405, api.ReasonMethodNotAllowed, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot()
			var body io.Reader
			if tc.body != "" {
				body = strings.NewReader(tc.body)
			}
			resp := e.do(tc.method, tc.path, tc.contentType, body)
			defer resp.Body.Close()
			if resp.StatusCode != tc.status {
				b, _ := io.ReadAll(resp.Body)
				t.Fatalf("status %d, want %d; body %s", resp.StatusCode, tc.status, b)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/problem+json") {
				t.Fatalf("Content-Type %q, want application/problem+json", ct)
			}
			var p api.Problem
			if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
				t.Fatalf("problem body: %v", err)
			}
			if p.Status != tc.status || p.Title == "" || p.Reason == "" {
				t.Errorf("incomplete problem: %+v", p)
			}
			if tc.reason != "" && p.Reason != tc.reason {
				t.Errorf("reason %q, want %q (%s)", p.Reason, tc.reason, p.Detail)
			}
			if tc.field != "" {
				named := strings.Contains(p.Detail, tc.field)
				for _, f := range p.Fields {
					named = named || f.Field == tc.field
				}
				if !named {
					t.Errorf("problem does not name field %q: %+v", tc.field, p)
				}
			}
			if after := e.snapshot(); after != before {
				t.Errorf("state changed: before %+v, after %+v", before, after)
			}
		})
	}
}

// TestUnhealthyDriver checks that an unhealthy driver makes the agent
// unready and refuses submits with 503 and the driver's reason.
func TestUnhealthyDriver(t *testing.T) {
	e := newEnv(t)
	health := e.do("GET", "/healthz", "", nil)
	health.Body.Close()
	if health.StatusCode != 200 {
		t.Errorf("/healthz: %d", health.StatusCode)
	}
	// Fingerprints are cached and refreshed in the background (every
	// 20ms here): readiness must turn within a few refreshes.
	e.ctr.SetFingerprint(driver.Fingerprint{Healthy: false, Reason: "runc is gone"})
	deadline := time.Now().Add(5 * time.Second)
	for {
		ready := e.do("GET", "/readyz", "", nil)
		var h api.Health
		_ = json.NewDecoder(ready.Body).Decode(&h)
		ready.Body.Close()
		if ready.StatusCode == 503 && h.Status == "unavailable" && strings.Contains(h.Checks["agent"], "runc is gone") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz with an unhealthy driver: %d %+v", ready.StatusCode, h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(`{"image":"`+testImage+`","command":["true"]}`))
	defer resp.Body.Close()
	var sp api.Problem
	_ = json.NewDecoder(resp.Body).Decode(&sp)
	if resp.StatusCode != 503 || sp.Reason != api.ReasonUnavailable || !strings.Contains(sp.Detail, "runc is gone") {
		t.Errorf("submit to an unhealthy driver: %d %+v", resp.StatusCode, sp)
	}
	if n := len(e.agent.List(context.Background(), api.ListFilter{})); n != 0 {
		t.Errorf("refused submit left %d workloads", n)
	}
}

// waitWorkload polls GET until ok says the workload is what the test waits
// for; gone (404) is passed to ok as nil.
func (e *env) waitWorkload(id string, ok func(w *api.Workload) bool) *api.Workload {
	e.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		resp := e.do("GET", "/v1/workloads/"+id, "", nil)
		var w *api.Workload
		if resp.StatusCode == http.StatusOK {
			w = &api.Workload{}
			if err := json.NewDecoder(resp.Body).Decode(w); err != nil {
				e.t.Fatal(err)
			}
		} else if resp.StatusCode != http.StatusNotFound {
			e.t.Fatalf("GET %s: %s", id, resp.Status)
		}
		resp.Body.Close()
		if ok(w) {
			return w
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("workload %s: still %+v", id, w)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *env) running(body string) *api.Workload {
	e.t.Helper()
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(body))
	defer resp.Body.Close()
	var w api.Workload
	if resp.StatusCode != http.StatusCreated {
		e.t.Fatalf("submit: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&w); err != nil {
		e.t.Fatal(err)
	}
	return e.waitWorkload(w.ID, func(w *api.Workload) bool { return w != nil && w.State == api.StateRunning })
}

// awaitLog waits until the workload's stdout log holds want.
func (e *env) awaitLog(id, want string) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp := e.do("GET", "/v1/workloads/"+id+"/logs?stream=stdout", "", nil)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) == want {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("stdout log %q, want %q", body, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// POST .../stop?wait=false and DELETE ...?wait=false answer 202 with the
// workload at once; the agent finishes the work; a workload being deleted
// answers GET (deleting: true) until it is gone.
func TestStopAndDeleteWithoutWaiting(t *testing.T) {
	e := newEnv(t)
	w := e.running(`{"image":"` + testImage + `","command":["sleep","1000"]}`)
	resp := e.do("POST", "/v1/workloads/"+w.ID+"/stop?wait=false&timeout=1s", "", nil)
	var got api.Workload
	_ = json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || got.State != api.StateStopping || resp.Header.Get(server.IndexHeader) == "" {
		t.Fatalf("stop without waiting: %s %+v, want 202 with the workload stopping", resp.Status, got)
	}
	e.waitWorkload(w.ID, func(w *api.Workload) bool { return w.State == api.StateExited })

	e.ctr.Delay("Destroy", 500*time.Millisecond)
	resp = e.do("DELETE", "/v1/workloads/"+w.ID+"?wait=false", "", nil)
	got = api.Workload{}
	_ = json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || !got.Deleting {
		t.Fatalf("delete without waiting: %s %+v, want 202 with the workload deleting", resp.Status, got)
	}
	if cur := e.waitWorkload(w.ID, func(*api.Workload) bool { return true }); cur == nil || !cur.Deleting {
		t.Errorf("GET while the delete is in progress: %+v, want the workload, deleting", cur)
	}
	e.waitWorkload(w.ID, func(w *api.Workload) bool { return w == nil })

	resp = e.do("POST", "/v1/workloads/"+w.ID+"/stop?wait=maybe", "", nil)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("wait=maybe: %s, want 400", resp.Status)
	}
}

// A client that leaves while its stop waits is not a server error: the
// request is counted as 499, and the stop goes on.
func TestClientLeavingIsNotAServerError(t *testing.T) {
	e := newEnv(t)
	w := e.running(`{"image":"` + testImage + `","command":["sh","-c","trap '' TERM; echo armed; sleep 1000"]}`)
	// Running means started, not that the shell has set its trap yet: a
	// stop before the trap would end it at once and answer in time.
	e.awaitLog(w.ID, "armed\n")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "POST", e.srv.URL+"/v1/workloads/"+w.ID+"/stop?timeout=1s", nil)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("the stop answered %s before its grace period", resp.Status)
	}
	e.waitWorkload(w.ID, func(w *api.Workload) bool { return w.State.Terminal() })
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp := e.do("GET", "/metrics", "", nil)
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		m := string(data)
		if strings.Contains(m, `code="500",method="POST",route="/v1/workloads/{ref}/stop"`) {
			t.Fatalf("the stop was counted as a server error:\n%s", m)
		}
		if strings.Contains(m, `code="499",method="POST",route="/v1/workloads/{ref}/stop"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no 499 for the stop in the metrics:\n%s", m)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
