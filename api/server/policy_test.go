package server_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/internal/openapitest"
)

const denyPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: untrusted
    match: {labels: {trust: untrusted}}
    isolation: vm
  - name: no-crypto-miners
    match: {images: ["**/miner*"]}
    action: deny
`

// newPolicyEnv is newEnv with the agent running policy from a file, and a
// container driver only.
func newPolicyEnv(t *testing.T, policy string) *env {
	t.Helper()
	e := newEnv(t)
	file := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(file, []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	e.ctr = fake.New("container", fake.NewNode())
	a, err := agent.New(context.Background(), agent.Options{Capacity: &api.NodeResources{CPU: 1024, MemoryMB: 1 << 20},
		DataDir:     t.TempDir(),
		Drivers:     []driver.Driver{e.ctr},
		Images:      e.imgs,
		Defaults:    agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout: 2 * time.Second,
		PolicyFile:  file,
		Logger:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(openapitest.Handler(t, server.New(a, server.Options{MaxBodyBytes: 4096, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})))
	t.Cleanup(func() {
		hs.Close()
		for _, w := range a.List(context.Background(), api.ListFilter{}) {
			_ = a.Delete(context.Background(), w.ID, true)
		}
		a.Close()
	})
	e.agent, e.srv = a, hs
	return e
}

// effects is what a request could change; fingerprint calls are left out
// (drivers are probed whenever their cached health goes stale).
type effects struct {
	workloads int
	index     uint64
	starts    int
}

func (e *env) effects() effects {
	idx, _ := e.agent.Index()
	n := 0
	for _, c := range e.ctr.Calls() {
		if c.Method == "Start" {
			n++
		}
	}
	return effects{len(e.agent.List(context.Background(), api.ListFilter{})), idx, n}
}

// waitRunning waits until the workload runs, so its start no longer moves
// the state index.
func (e *env) waitRunning(ref string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		_, changed := e.agent.Index()
		w, err := e.agent.Get(ctx, ref)
		if err != nil {
			e.t.Fatal(err)
		}
		if w.State == api.StateRunning {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			e.t.Fatalf("workload %s stuck in %s", ref, w.State)
		}
	}
}

func decodeBody[T any](t *testing.T, resp *http.Response) T {
	t.Helper()
	defer resp.Body.Close()
	var v T
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatalf("decode %s answer: %v", resp.Request.URL.Path, err)
	}
	return v
}

func TestPlacementsDecideWithoutSideEffects(t *testing.T) {
	e := newPolicyEnv(t, denyPolicy)
	// One workload, so "nothing changed" is checked against a non-empty list.
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(`{"name":"keep","image":"`+testImage+`","command":["sleep","60"],"resources":{"cpu":0.1,"memory_mb":16}}`))
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("setup submit: %s", resp.Status)
	}
	resp.Body.Close()
	e.waitRunning("keep")
	before := e.effects()

	cases := []struct {
		body, verdict, iso, rule string
	}{
		{`{"image":"` + testImage + `"}`, api.VerdictAllow, "container", "default"},
		{`{"image":"busybox","labels":{"trust":"untrusted"}}`, api.VerdictUnschedulable, "vm", "untrusted"},
		{`{"image":"evil.example/miner:1","labels":{"trust":"untrusted"}}`, api.VerdictDeny, "vm", "no-crypto-miners"},
		{`{"image":"busybox","labels":{"trust":"untrusted"},"isolation":"container"}`, api.VerdictRefused, "vm", "untrusted"},
	}
	for _, tc := range cases {
		resp := e.do("POST", "/v1/placements", "application/json", strings.NewReader(tc.body))
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			t.Fatalf("POST /v1/placements %s: %s %s", tc.body, resp.Status, b)
		}
		d := decodeBody[api.PlacementDecision](t, resp)
		if d.Verdict != tc.verdict || string(d.Isolation) != tc.iso || d.DecidingRule != tc.rule || d.PolicyVersion == "" ||
			!strings.Contains(d.Explanation, d.PolicyVersion) {
			t.Errorf("%s: decision %+v; want %s %s by %s", tc.body, d, tc.verdict, tc.iso, tc.rule)
		}
		if d.Denied != (tc.verdict == api.VerdictDeny) {
			t.Errorf("%s: denied = %v", tc.body, d.Denied)
		}
	}
	if after := e.effects(); after != before {
		t.Errorf("placements changed state: before %+v, after %+v", before, after)
	}
}

func TestPlacementsRejectBadInput(t *testing.T) {
	e := newPolicyEnv(t, denyPolicy)
	before := e.effects()
	cases := []struct {
		name, contentType, body string
		status                  int
		reason, field           string
	}{
		{"malformed JSON", "application/json", `{"image":`, 400, api.ReasonMalformedBody, ""},
		{"unknown field", "application/json", `{"image":"busybox","isolaton":"vm"}`, 400, api.ReasonInvalidArgument, "isolaton"},
		{"wrong type", "application/json", `{"image":"busybox","privileged":"yes"}`, 400, api.ReasonInvalidArgument, "privileged"},
		{"two documents", "application/json", `{"image":"busybox"}{}`, 400, api.ReasonMalformedBody, ""},
		{"no image", "application/json", `{"labels":{"trust":"untrusted"}}`, 400, api.ReasonInvalidArgument, "image"},
		{"bad isolation", "application/json", `{"image":"busybox","isolation":"jail"}`, 400, api.ReasonInvalidArgument, "isolation"},
		{"negative memory", "application/json", `{"image":"busybox","resources":{"memory_mb":-1}}`, 400, api.ReasonInvalidArgument, "resources.memory_mb"},
		{"bad label key", "application/json", `{"image":"busybox","labels":{"a b":"c"}}`, 400, api.ReasonInvalidArgument, "labels.a b"},
		{"wrong media type", "text/yaml", `image: busybox`, 415, api.ReasonUnsupportedMedia, ""},
		{"oversized", "application/json", `{"image":"busybox","labels":{"x":"` + strings.Repeat("y", 5000) + `"}}`, 413, api.ReasonBodyTooLarge, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := e.do("POST", "/v1/placements", tc.contentType, strings.NewReader(tc.body))
			if resp.StatusCode != tc.status {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, b)
			}
			if ct := resp.Header.Get("Content-Type"); ct != api.ProblemMediaType {
				t.Errorf("Content-Type %q", ct)
			}
			p := decodeBody[api.Problem](t, resp)
			if p.Reason != tc.reason || p.Status != tc.status {
				t.Errorf("problem %+v; want reason %s", p, tc.reason)
			}
			if tc.field != "" {
				named := false
				for _, f := range p.Fields {
					named = named || f.Field == tc.field
				}
				if !named {
					t.Errorf("problem does not name field %q: %+v", tc.field, p)
				}
			}
		})
	}
	if after := e.effects(); after != before {
		t.Errorf("bad placements changed state: before %+v, after %+v", before, after)
	}
}

// TestSubmitRefusalsAreProblems checks the statuses and stable reasons of
// the ways a policy refuses a submit.
func TestSubmitRefusalsAreProblems(t *testing.T) {
	e := newPolicyEnv(t, denyPolicy)
	cases := []struct {
		name, body string
		status     int
		reason     string
		detail     []string
	}{
		{"vm required, no vm driver", `{"image":"` + testImage + `","command":["true"],"labels":{"trust":"untrusted"}}`,
			http.StatusConflict, api.ReasonFailedPrecondition, []string{"unschedulable", `"untrusted"`, "no vm driver"}},
		{"container requested, vm required", `{"image":"` + testImage + `","command":["true"],"labels":{"trust":"untrusted"},"isolation":"container"}`,
			http.StatusForbidden, api.ReasonDenied, []string{"refused", `"untrusted"`, "never lower"}},
	}
	before := e.effects()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(tc.body))
			p := decodeBody[api.Problem](t, resp)
			if resp.StatusCode != tc.status || p.Reason != tc.reason {
				t.Fatalf("%d %+v; want %d %s", resp.StatusCode, p, tc.status, tc.reason)
			}
			for _, s := range tc.detail {
				if !strings.Contains(p.Detail, s) {
					t.Errorf("detail %q does not say %q", p.Detail, s)
				}
			}
		})
	}
	if after := e.effects(); after != before {
		t.Errorf("refused submits changed state: before %+v, after %+v", before, after)
	}
}

func TestSubmitDeniedIs403(t *testing.T) {
	// Deny whatever runs the test image.
	e := newPolicyEnv(t, strings.Replace(denyPolicy, `"**/miner*"`, `"`+testImage+`"`, 1))
	resp := e.do("POST", "/v1/workloads", "application/json", strings.NewReader(`{"image":"`+testImage+`","command":["true"]}`))
	p := decodeBody[api.Problem](t, resp)
	if resp.StatusCode != http.StatusForbidden || p.Reason != api.ReasonDenied || !strings.Contains(p.Detail, `rule "no-crypto-miners"`) {
		t.Errorf("denied submit: %d %+v", resp.StatusCode, p)
	}
	if n := len(e.agent.List(context.Background(), api.ListFilter{})); n != 0 {
		t.Errorf("denied submit stored %d workloads", n)
	}
}

func TestGetPolicy(t *testing.T) {
	e := newPolicyEnv(t, denyPolicy)
	resp := e.do("GET", "/v1/policy", "", nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /v1/policy: %s", resp.Status)
	}
	st := decodeBody[api.PolicyStatus](t, resp)
	if !strings.HasPrefix(st.Version, "sha256:") || !strings.HasSuffix(st.Source, "policy.yaml") || st.Default != "container" ||
		st.LoadedAt.IsZero() || !st.Watching || st.LastReloadError != nil || st.ReloadFailures != 0 {
		t.Errorf("status = %+v", st)
	}
	if len(st.Rules) != 2 || st.Rules[0].Name != "untrusted" || st.Rules[0].Line != 5 || st.Rules[1].Outcome != "deny" ||
		!strings.Contains(st.Rules[1].Match, "**/miner*") {
		t.Errorf("rules = %+v", st.Rules)
	}
}
