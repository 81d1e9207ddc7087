package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/auth"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/openapitest"
	"github.com/berthd/berth/volume"
)

// syncBuffer is a log sink tests read while the server writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type authEnv struct {
	t      testing.TB
	srv    *httptest.Server
	api    *server.Server
	agent  *agent.Agent
	tokens map[string]string // caller name -> token
	audit  *syncBuffer
	log    *syncBuffer
}

// newAuthEnv serves the real agent over the fake driver with auth on: one
// token per role, and submitters for tenant a, for tenant b, and for
// tenants a and b. imgOpts configure the image store.
func newAuthEnv(t testing.TB, imgOpts ...image.Option) *authEnv {
	t.Helper()
	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"), imgOpts...)
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
	vols, err := volume.Open(volume.Options{Root: filepath.Join(dir, "volumes"), DataDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), agent.Options{Capacity: &api.NodeResources{CPU: 1024, MemoryMB: 1 << 20},
		DataDir:        dir,
		Volumes:        vols,
		Drivers:        []driver.Driver{fake.New("container", fake.NewNode())},
		Images:         imgs,
		Defaults:       agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout:    2 * time.Second,
		HealthInterval: 20 * time.Millisecond,
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	e := &authEnv{t: t, agent: a, tokens: map[string]string{}, audit: &syncBuffer{}, log: &syncBuffer{}}
	var file []string
	for _, c := range []struct {
		name    string
		role    auth.Role
		tenants []string
	}{
		{"admin", auth.RoleAdmin, nil},
		{"operator", auth.RoleOperator, nil},
		{"sub-a", auth.RoleSubmitter, []string{"a"}},
		{"sub-ab", auth.RoleSubmitter, []string{"a", "b"}},
		{"sub-b", auth.RoleSubmitter, []string{"b"}},
		{"reader", auth.RoleReader, nil},
	} {
		tok, line, err := auth.NewToken(c.name, c.role, c.tenants)
		if err != nil {
			t.Fatal(err)
		}
		e.tokens[c.name] = tok
		file = append(file, line)
	}
	e.tokens["bad"] = auth.TokenPrefix + "not-a-token-anyone-has"
	tokens, err := auth.Parse([]byte(strings.Join(file, "\n")))
	if err != nil {
		t.Fatal(err)
	}
	s := server.New(a, server.Options{
		MaxBodyBytes: 4096,
		Logger:       slog.New(slog.NewTextHandler(e.log, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Auth:         tokens,
		Audit:        slog.New(slog.NewJSONHandler(e.audit, nil)),
	})
	e.api = s
	e.srv = httptest.NewServer(openapitest.Handler(t, s))
	t.Cleanup(func() {
		e.srv.Close()
		for _, w := range a.List(context.Background(), api.ListFilter{}) {
			_ = a.Delete(context.Background(), w.ID, true)
		}
		a.Close()
	})
	return e
}

// submit creates a workload directly through the agent.
func (e *authEnv) submit(name, tenant string) *api.Workload {
	e.t.Helper()
	spec := api.WorkloadSpec{Name: name, Image: testImage, Command: []string{"sleep", "60"}}
	if tenant != "" {
		spec.Labels = map[string]string{"tenant": tenant}
	}
	w, _, err := e.agent.Submit(context.Background(), spec)
	if err != nil {
		e.t.Fatal(err)
	}
	return w
}

func (e *authEnv) waitRunning(ref string) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		w, err := e.agent.Get(context.Background(), ref)
		if err != nil {
			e.t.Fatal(err)
		}
		if w.State == api.StateRunning {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("%s is %s, not running", ref, w.State)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// do sends a request as caller ("" sends no credential) and returns the
// status and the body. Streams are cut once their headers arrive.
func (e *authEnv) do(caller, method, path, body string) (int, string) {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, e.srv.URL+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if caller != "" {
		req.Header.Set("Authorization", "Bearer "+e.tokens[caller])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") || strings.Contains(path, "follow=true") {
		return resp.StatusCode, ""
	}
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data)
}

// TestAuthMatrix is who may do what: every role (and no or a bad token)
// against every kind of endpoint, with workloads of tenant a, tenant b and
// none. Another tenant's workload answers exactly as a missing one does.
func TestAuthMatrix(t *testing.T) {
	e := newAuthEnv(t)
	e.submit("wa", "a")
	e.submit("wb", "b")
	e.submit("wn", "")
	for _, n := range []string{"wa-stop", "wa-del", "wb-stop", "wb-del"} {
		e.submit(n, n[1:2])
	}
	e.waitRunning("a/wa")
	spec := func(labels string) string {
		return `{"image":"` + testImage + `","command":["true"]` + labels + `}`
	}
	cases := []struct {
		caller, method, path, body string
		want                       int
	}{
		// Probes are public.
		{"", "GET", "/healthz", "", 200},
		{"bad", "GET", "/healthz", "", 200},
		{"reader", "GET", "/readyz", "", 200},
		// No or a bad credential: 401 everywhere else, even for routes
		// that do not exist.
		{"", "GET", "/v1/node", "", 401},
		{"bad", "GET", "/v1/node", "", 401},
		{"", "GET", "/v1/workloads", "", 401},
		{"bad", "POST", "/v1/workloads", spec(""), 401},
		{"", "GET", "/v1/no-such-route", "", 401},
		// Node status, events and metrics-like reads.
		{"admin", "GET", "/v1/node", "", 200},
		{"operator", "GET", "/v1/node", "", 200},
		{"reader", "GET", "/v1/node", "", 200},
		{"sub-a", "GET", "/v1/node", "", 403},
		{"reader", "GET", "/v1/events?since=0", "", 200},
		{"sub-a", "GET", "/v1/events?since=0", "", 200},
		{"sub-a", "GET", "/v1/events?workload=wb", "", 404},
		{"sub-ab", "GET", "/v1/events?workload=wb", "", 200},
		// Policy and placement.
		{"operator", "GET", "/v1/policy", "", 200},
		{"sub-a", "GET", "/v1/policy", "", 403},
		{"reader", "GET", "/v1/policy", "", 403},
		{"operator", "POST", "/v1/placements", spec(""), 200},
		{"sub-a", "POST", "/v1/placements", spec(""), 200},
		{"sub-a", "POST", "/v1/placements", spec(`,"labels":{"tenant":"b"}`), 403},
		{"reader", "POST", "/v1/placements", spec(""), 403},
		// Images.
		{"sub-a", "GET", "/v1/images", "", 200},
		{"reader", "GET", "/v1/images", "", 403},
		{"operator", "DELETE", "/v1/images?ref=berth.test/none:latest", "", 404},
		{"sub-a", "DELETE", "/v1/images?ref=" + testImage, "", 403},
		{"sub-a", "POST", "/v1/images", "", 403},
		{"reader", "POST", "/v1/images/pull", `{"ref":"berth.test/x:y"}`, 403},
		// Reading workloads. Names are per tenant: other roles than
		// submitters say TENANT/NAME (the '/' escaped in the path).
		{"admin", "GET", "/v1/workloads/b%2Fwb", "", 200},
		{"operator", "GET", "/v1/workloads/b%2Fwb", "", 200},
		{"operator", "GET", "/v1/workloads/wn", "", 200},
		{"reader", "GET", "/v1/workloads/wa", "", 403},
		{"reader", "GET", "/v1/workloads", "", 403},
		{"sub-a", "GET", "/v1/workloads/wa", "", 200},
		{"sub-a", "GET", "/v1/workloads/wb", "", 404},
		{"sub-a", "GET", "/v1/workloads/wn", "", 404},
		{"sub-a", "GET", "/v1/workloads/nothing", "", 404},
		{"sub-ab", "GET", "/v1/workloads/wb", "", 200},
		{"sub-a", "GET", "/v1/workloads/wa/stats", "", 200},
		{"sub-a", "GET", "/v1/workloads/wb/stats", "", 404},
		{"sub-a", "GET", "/v1/workloads/wa/logs", "", 200},
		{"sub-a", "GET", "/v1/workloads/wb/logs", "", 404},
		{"sub-a", "GET", "/v1/workloads/wb/logs?follow=true", "", 404},
		{"operator", "GET", "/v1/workloads/b%2Fwb/logs", "", 200},
		{"sub-a", "GET", "/v1/workloads?index=1&wait=1ms", "", 200},
		// Creating workloads.
		{"admin", "POST", "/v1/workloads", spec(""), 201},
		{"operator", "POST", "/v1/workloads", spec(""), 403},
		{"reader", "POST", "/v1/workloads", spec(""), 403},
		{"sub-a", "POST", "/v1/workloads", spec(""), 201},
		{"sub-a", "POST", "/v1/workloads", spec(`,"labels":{"tenant":"a"}`), 201},
		{"sub-a", "POST", "/v1/workloads", spec(`,"labels":{"tenant":"b"}`), 403},
		{"sub-ab", "POST", "/v1/workloads", spec(""), 400},
		{"sub-ab", "POST", "/v1/workloads", spec(`,"labels":{"tenant":"b"}`), 201},
		// Stopping and deleting.
		{"operator", "POST", "/v1/workloads/wa-stop/stop", "", 403},
		{"reader", "DELETE", "/v1/workloads/wa-del", "", 403},
		{"sub-a", "POST", "/v1/workloads/wb-stop/stop", "", 404},
		{"sub-a", "DELETE", "/v1/workloads/wb-del?force=true", "", 404},
		{"sub-a", "POST", "/v1/workloads/wa-stop/stop?timeout=1s", "", 200},
		{"sub-a", "DELETE", "/v1/workloads/wa-del?force=true", "", 204},
		{"sub-ab", "POST", "/v1/workloads/wb-stop/stop?timeout=1s", "", 200},
		{"admin", "DELETE", "/v1/workloads/b%2Fwb-del?force=true", "", 204},
		// Routes the table does not know: admins only; unknown paths 404.
		{"admin", "GET", "/v1/no-such-route", "", 404},
		{"sub-a", "GET", "/v1/no-such-route", "", 404},
		{"admin", "PUT", "/v1/node", "", 405},
	}
	if len(cases) < 40 {
		t.Fatalf("only %d cases", len(cases))
	}
	for _, c := range cases {
		name := fmt.Sprintf("%s %s %s", c.caller, c.method, c.path)
		if c.caller == "" {
			name = "anonymous " + c.method + " " + c.path
		}
		if got, body := e.do(c.caller, c.method, c.path, c.body); got != c.want {
			t.Errorf("%s: %d, want %d (%s)", name, got, c.want, strings.TrimSpace(body))
		}
	}
	// The wb-stop and wb-del the submitter of tenant a was refused are
	// untouched by it.
	if w, err := e.agent.Get(context.Background(), "b/wb-del"); err == nil {
		t.Errorf("wb-del still exists after the admin deleted it: %s", w.State)
	}
}

// TestHiddenWorkloadLooksMissing: the 404 for another tenant's workload is
// byte for byte the 404 for a name nobody uses.
func TestHiddenWorkloadLooksMissing(t *testing.T) {
	e := newAuthEnv(t)
	e.submit("taken", "b")
	for _, suffix := range []string{"", "/stats", "/logs", "/stop"} {
		method := "GET"
		if suffix == "/stop" {
			method = "POST"
		}
		_, hidden := e.do("sub-a", method, "/v1/workloads/taken"+suffix, "")
		_, missing := e.do("sub-a", method, "/v1/workloads/takem"+suffix, "")
		if strings.ReplaceAll(hidden, "taken", "takem") != missing {
			t.Errorf("%s: hidden %s\nmissing %s", suffix, hidden, missing)
		}
	}
}

// TestSubmitterSeesOnlyItsTenants: lists and event streams leave other
// tenants out; a submit gets the submitter's tenant label.
func TestSubmitterSeesOnlyItsTenants(t *testing.T) {
	e := newAuthEnv(t)
	wa := e.submit("wa", "a")
	wb := e.submit("wb", "b")
	e.submit("wn", "")
	status, body := e.do("sub-a", "POST", "/v1/workloads", `{"name":"mine","image":"`+testImage+`","command":["true"]}`)
	if status != 201 {
		t.Fatalf("submit: %d %s", status, body)
	}
	var mine api.Workload
	json.Unmarshal([]byte(body), &mine)
	if mine.Spec.Labels["tenant"] != "a" {
		t.Errorf("a submit by the tenant-a submitter has labels %v, want tenant=a", mine.Spec.Labels)
	}
	ids := func(caller string) []string {
		_, body := e.do(caller, "GET", "/v1/workloads", "")
		var list api.WorkloadList
		if err := json.Unmarshal([]byte(body), &list); err != nil {
			t.Fatalf("%s list: %v: %s", caller, err, body)
		}
		var names []string
		for _, w := range list.Workloads {
			names = append(names, w.Name)
		}
		return names
	}
	if got := strings.Join(ids("sub-a"), ","); got != "mine,wa" && got != "wa,mine" {
		t.Errorf("tenant a lists %q, want mine and wa", got)
	}
	if got := ids("operator"); len(got) != 4 {
		t.Errorf("the operator lists %v, want all 4", got)
	}
	if _, body := e.do("sub-a", "GET", "/v1/workloads?label=tenant=b", ""); strings.Contains(body, wb.ID) {
		t.Error("a label filter reached another tenant's workload")
	}

	// Events: the stream of sub-a holds its own tenant's workloads'
	// events, never another tenant's or untenanted ones. The stream starts
	// at "now", so the workloads whose events it must (not) see are
	// submitted while it is open, until it has seen two of its own.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+"/v1/events?since=0", nil)
	req.Header.Set("Authorization", "Bearer "+e.tokens["sub-a"])
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var mu sync.Mutex
	own, foreign := map[string]bool{wa.ID: true, mine.ID: true}, map[string]bool{wb.ID: true}
	stop := make(chan struct{})
	submitted := make(chan struct{})
	go func() {
		defer close(submitted)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			a, b, n := e.submit(fmt.Sprintf("ev-a-%d", i), "a"), e.submit(fmt.Sprintf("ev-b-%d", i), "b"), e.submit(fmt.Sprintf("ev-n-%d", i), "")
			mu.Lock()
			own[a.ID], foreign[b.ID], foreign[n.ID] = true, true, true
			mu.Unlock()
		}
	}()
	seenOwn := 0
	// Events of a workload submitted but not yet recorded by the goroutine
	// (its submit's own events come before the answer): classified once
	// it is recorded.
	var pending []api.Event
	classify := func(ev api.Event) (done bool) {
		mu.Lock()
		isOwn, isForeign := own[ev.WorkloadID], foreign[ev.WorkloadID]
		mu.Unlock()
		switch {
		case isForeign:
			t.Errorf("tenant a saw event %s %q of another tenant's workload %q", ev.Type, ev.Message, ev.WorkloadID)
		case isOwn:
			seenOwn++
		default:
			return false
		}
		return true
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() && seenOwn < 2 {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		var ev api.Event
		if err := json.Unmarshal([]byte(data), &ev); err != nil {
			t.Fatal(err)
		}
		if ev.WorkloadID != "" && !classify(ev) {
			pending = append(pending, ev)
		}
		pending = slices.DeleteFunc(pending, classify)
	}
	close(stop)
	<-submitted
	for _, ev := range pending {
		classify(ev) // each submitted workload is recorded by now
	}
	if seenOwn < 2 {
		t.Errorf("tenant a's stream showed %d events of its own workloads, want 2", seenOwn)
	}
}

// TestAuditLog: a mutating request and a refused one each leave one
// record with who, what and the outcome; no token reaches any log.
func TestAuditLog(t *testing.T) {
	e := newAuthEnv(t)
	status, body := e.do("sub-a", "POST", "/v1/workloads", `{"name":"audited","image":"`+testImage+`","command":["true"]}`)
	if status != 201 {
		t.Fatalf("submit: %d %s", status, body)
	}
	var w api.Workload
	json.Unmarshal([]byte(body), &w)
	e.do("bad", "GET", "/v1/node", "")
	e.do("reader", "DELETE", "/v1/workloads/audited", "")
	e.do("sub-a", "GET", "/v1/workloads/audited", "") // a read: not audited
	e.do("sub-a", "DELETE", "/v1/workloads/audited?force=true", "")

	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(e.audit.String()), "\n") {
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	if len(recs) != 4 {
		t.Fatalf("%d audit records, want 4 (submit, 401, 403, delete):\n%s", len(recs), e.audit)
	}
	want := []map[string]any{
		{"audit": true, "identity": "sub-a", "via": "token", "role": "submitter", "tenant": "a", "method": "POST", "route": "/v1/workloads", "workload": w.ID, "isolation": "container", "status": 201.0},
		{"audit": true, "identity": "", "via": "none", "method": "GET", "route": "/v1/node", "status": 401.0, "msg": "api request refused"},
		{"identity": "reader", "role": "reader", "method": "DELETE", "route": "/v1/workloads/{ref}", "status": 403.0},
		{"identity": "sub-a", "tenant": "a", "method": "DELETE", "workload": w.ID, "status": 204.0},
	}
	for i, wantRec := range want {
		for k, v := range wantRec {
			if recs[i][k] != v {
				t.Errorf("audit record %d: %s = %v, want %v\n%v", i, k, recs[i][k], v, recs[i])
			}
		}
	}
	if _, ok := recs[0]["policy_version"]; !ok {
		t.Errorf("the submit's record lacks the placement decision: %v", recs[0])
	}
	for name, tok := range e.tokens {
		if strings.Contains(e.audit.String(), tok) || strings.Contains(e.log.String(), tok) {
			t.Errorf("the token of %s is in a log", name)
		}
	}
}

// TestAuthOffIsAnonymousAdmin: without an authenticator everything is
// allowed (the agent then listens on loopback and its socket only), and
// mutations are still audited.
func TestAuthOffIsAnonymousAdmin(t *testing.T) {
	e := newEnv(t)
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(`{"image":"`+testImage+`","command":["true"],"labels":{"tenant":"x"}}`))
	resp.Body.Close()
	if resp.StatusCode != 201 {
		t.Fatalf("submit without auth: %s", resp.Status)
	}
	resp = e.do("GET", "/v1/node", "", nil)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("node without auth: %s", resp.Status)
	}
}
