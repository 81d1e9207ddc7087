package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/placement"
)

// policyA sends untrusted workloads to VMs and denies anything labelled
// banned; the rest runs as containers.
const policyA = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: untrusted
    match:
      labels: {trust: untrusted}
    isolation: vm
  - name: no-banned
    match:
      labels_exist: [banned]
    action: deny
`

// policyB also sends team=ml to VMs, with CEL.
const policyB = policyA + `  - name: ml-in-vm
    when: '"team" in workload.labels && workload.labels.team == "ml"'
    isolation: vm
`

// policyC sends everything to VMs.
const policyC = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: vm
rules:
  - name: no-banned
    match:
      labels_exist: [banned]
    action: deny
`

// policyBad has a misspelt key (line 5, so the name is missing too) and a
// bad outcome (line 8).
const policyBad = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - nmae: typo
    match:
      labels: {trust: untrusted}
    isolation: jail
`

// syncBuffer is a log sink the watcher goroutine writes while tests read.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type policyEnv struct {
	*env
	vm   *fake.Driver // nil without a vm driver
	file string       // "" for the built-in policy
	logs *syncBuffer
}

// newPolicyEnv is newEnv with an agent running policy (the built-in one
// when empty) over a container driver and, with vm, a vm driver. The vm
// driver's fingerprint is set before the agent takes one.
func newPolicyEnv(t *testing.T, policy string, vm *driver.Fingerprint) *policyEnv {
	t.Helper()
	e := &policyEnv{env: newEnv(t), logs: &syncBuffer{}}
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	e.agent = nil
	if policy != "" {
		e.file = filepath.Join(t.TempDir(), "policy.yaml")
		if err := os.WriteFile(e.file, []byte(policy), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	drivers := []driver.Driver{e.ctr}
	if vm != nil {
		e.vm = fake.New("vm", e.node)
		e.vm.SetFingerprint(*vm)
		drivers = append(drivers, e.vm)
	}
	a, err := New(context.Background(), Options{Capacity: testCapacity,
		DataDir:     e.dir,
		Drivers:     drivers,
		Images:      e.imgs,
		Defaults:    Defaults{CPU: 1, MemoryMB: 128, Pids: 256},
		StopTimeout: 2 * time.Second,
		PolicyFile:  e.file,
		Logger:      slog.New(slog.NewTextHandler(e.logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	e.agent = a
	return e
}

var healthyVM = &driver.Fingerprint{Healthy: true, Version: "fake", Details: map[string]string{"accel": "tcg"}}

func labelled(kv ...string) api.WorkloadSpec {
	spec := sh("sleep 1000")
	spec.Image = testImage
	// Small, so that admission control never refuses the tests' workloads.
	spec.Resources = api.Resources{CPU: 0.1, MemoryMB: 16}
	spec.Labels = map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		spec.Labels[kv[i]] = kv[i+1]
	}
	return spec
}

func version(t *testing.T, policy []byte) string {
	t.Helper()
	p, err := placement.Parse("x", policy)
	if err != nil {
		t.Fatal(err)
	}
	return p.Version()
}

// starts counts Start calls across the given drivers.
func starts(ds ...*fake.Driver) int {
	n := 0
	for _, d := range ds {
		if d == nil {
			continue
		}
		for _, c := range d.Calls() {
			if c.Method == "Start" {
				n++
			}
		}
	}
	return n
}

func TestDecisionIsRecordedOnTheWorkload(t *testing.T) {
	e := newPolicyEnv(t, "", healthyVM)
	builtin := version(t, configs.DefaultPolicy)

	w := e.submit(labelled("trust", "untrusted"))
	p := w.Placement
	if w.Isolation != api.IsolationVM || p == nil || p.Isolation != api.IsolationVM || p.DecidingRule != "untrusted-to-vm" ||
		p.PolicyVersion != builtin || p.Denied {
		t.Fatalf("untrusted workload: isolation %s, placement %+v", w.Isolation, p)
	}
	if len(p.Matched) != 1 || p.Matched[0].Rule != "untrusted-to-vm" || p.Matched[0].Outcome != "vm" ||
		!strings.Contains(p.Matched[0].Reason, "trust=untrusted") {
		t.Errorf("matched = %+v", p.Matched)
	}
	if !strings.HasPrefix(p.Explanation, "vm: ") || !strings.Contains(p.Explanation, builtin) {
		t.Errorf("explanation = %q", p.Explanation)
	}
	e.waitFor(w.ID, func(w *api.Workload) bool { return w.State == api.StateRunning })
	if starts(e.vm) != 1 || starts(e.ctr) != 0 {
		t.Errorf("starts: vm %d, container %d; want the vm driver to run it", starts(e.vm), starts(e.ctr))
	}

	plain := e.submit(labelled("team", "web"))
	if plain.Isolation != api.IsolationContainer || plain.Placement.DecidingRule != placement.DecidedByDefault || len(plain.Placement.Matched) != 0 {
		t.Errorf("plain workload: %s %+v", plain.Isolation, plain.Placement)
	}
	raised := labelled()
	raised.Isolation = api.IsolationVM
	if w := e.submit(raised); w.Isolation != api.IsolationVM || w.Placement.DecidingRule != placement.DecidedByRequest {
		t.Errorf("vm request: %s %+v", w.Isolation, w.Placement)
	}

	// The record, decision included, survives a restart unchanged.
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	a, err := New(context.Background(), Options{Capacity: testCapacity, DataDir: e.dir, Drivers: []driver.Driver{e.ctr, e.vm}, Images: e.imgs,
		Defaults: Defaults{CPU: 1, MemoryMB: 128, Pids: 256}, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	e.agent = a
	got, err := a.Get(context.Background(), w.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !equalJSON(t, got.Placement, p) {
		t.Errorf("placement after restart = %+v, want %+v", got.Placement, p)
	}
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Equal(ja, jb)
}

func TestRefusedSubmitsStoreNothing(t *testing.T) {
	cases := []struct {
		name string
		vm   *driver.Fingerprint
		spec api.WorkloadSpec
		err  error
		want []string // in the error
	}{
		{"deny rule", healthyVM, labelled("banned", "yes"), errdefs.ErrDenied,
			[]string{"denied", `"no-banned"`, "label banned present"}},
		{"deny wins over a vm request", healthyVM, func() api.WorkloadSpec {
			s := labelled("banned", "")
			s.Isolation = api.IsolationVM
			return s
		}(), errdefs.ErrDenied, []string{`"no-banned"`}},
		{"container requested, vm required", healthyVM, func() api.WorkloadSpec {
			s := labelled("trust", "untrusted")
			s.Isolation = api.IsolationContainer
			return s
		}(), errdefs.ErrDenied, []string{"refused", "container was requested", `"untrusted"`, "never lower"}},
		{"vm required, no vm driver", nil, labelled("trust", "untrusted"), errdefs.ErrFailedPrecondition,
			[]string{"unschedulable", `"untrusted"`, "no vm driver is configured"}},
		{"vm requested, no vm driver", nil, func() api.WorkloadSpec {
			s := labelled()
			s.Isolation = api.IsolationVM
			return s
		}(), errdefs.ErrFailedPrecondition, []string{"unschedulable", "requested vm", "no vm driver"}},
		{"vm required, vm driver unhealthy", &driver.Fingerprint{Healthy: false, Reason: "libvirtd is not running"},
			labelled("trust", "untrusted"), errdefs.ErrUnavailable,
			[]string{"unschedulable", "vm driver is unhealthy", "libvirtd is not running"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newPolicyEnv(t, policyA, tc.vm)
			w, _, err := e.agent.Submit(context.Background(), tc.spec)
			if !errors.Is(err, tc.err) {
				t.Fatalf("Submit = %+v, %v; want %v", w, err, tc.err)
			}
			for _, s := range tc.want {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			if n := len(e.agent.List(context.Background(), api.ListFilter{})); n != 0 {
				t.Errorf("refused submit stored %d workloads", n)
			}
			if idx, _ := e.agent.Index(); idx != 1 { // a fresh agent starts at 1
				t.Errorf("state index %d after a refused submit, want 1 (untouched)", idx)
			}
			if n := starts(e.ctr, e.vm); n != 0 {
				t.Errorf("%d driver starts after a refused submit", n)
			}
		})
	}
}

func TestPlaceExplainsWithoutSideEffects(t *testing.T) {
	e := newPolicyEnv(t, policyA, nil)
	ctx := context.Background()
	for _, tc := range []struct {
		spec    api.WorkloadSpec
		verdict string
		iso     api.Isolation
	}{
		{labelled(), api.VerdictAllow, api.IsolationContainer},
		{labelled("banned", "x"), api.VerdictDeny, api.IsolationContainer},
		{labelled("trust", "untrusted"), api.VerdictUnschedulable, api.IsolationVM},
	} {
		d, err := e.agent.Place(ctx, tc.spec)
		if err != nil {
			t.Fatalf("Place(%v): %v", tc.spec.Labels, err)
		}
		if d.Verdict != tc.verdict || d.Isolation != tc.iso || d.PolicyVersion != version(t, []byte(policyA)) || d.Explanation == "" {
			t.Errorf("Place(%v) = %+v; want %s %s", tc.spec.Labels, d, tc.verdict, tc.iso)
		}
		if d.Spec.Image != "berth.test/busybox:latest" || d.Spec.Resources.Pids != 256 {
			t.Errorf("decision spec not normalized: %+v", d.Spec)
		}
		if !d.Node.ContainerAvailable || d.Node.VMAvailable || !strings.Contains(d.Node.VMReason, "no vm driver") {
			t.Errorf("node facts = %+v", d.Node)
		}
	}
	// Images need not be on the node to ask.
	if _, err := e.agent.Place(ctx, api.WorkloadSpec{Image: "elsewhere.example/app:1"}); err != nil {
		t.Errorf("Place of an absent image: %v", err)
	}
	bad := labelled()
	bad.Resources.MemoryMB = -1
	bad.Isolation = "chroot"
	_, err := e.agent.Place(ctx, bad)
	var v *errdefs.ValidationError
	if !errors.As(err, &v) || len(v.Fields) != 2 {
		t.Errorf("Place(bad spec) = %v; want a validation error naming 2 fields", err)
	}
	if idx, _ := e.agent.Index(); idx != 1 || starts(e.ctr) != 0 {
		t.Errorf("Place changed state: index %d, %d starts", idx, starts(e.ctr))
	}
}

func TestNamedRetryKeepsItsDecisionAcrossReloads(t *testing.T) {
	e := newPolicyEnv(t, policyA, healthyVM)
	spec := labelled("team", "ml")
	spec.Name = "trainer"
	w1 := e.submit(spec)
	if w1.Isolation != api.IsolationContainer {
		t.Fatalf("before reload: %s", w1.Isolation)
	}
	// The new policy would deny it; the retry still gets the admitted one.
	writeFile(t, e.file, policyA+`  - name: no-ml
    match:
      labels: {team: ml}
    action: deny
`)
	if err := e.agent.pol.reload(); err != nil {
		t.Fatal(err)
	}
	w2, created, err := e.agent.Submit(context.Background(), spec)
	if err != nil || created || w2.ID != w1.ID || !equalJSON(t, w2.Placement, w1.Placement) {
		t.Fatalf("retry after reload = %+v, created %v, %v; want the admitted workload", w2, created, err)
	}
	other := labelled("team", "ml")
	if _, _, err := e.agent.Submit(context.Background(), other); !errors.Is(err, errdefs.ErrDenied) {
		t.Errorf("new submit under the new policy: %v, want denied", err)
	}
}

func TestStartWithInvalidPolicyFails(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "policy.yaml")
	writeFile(t, file, policyBad)
	_, err := New(context.Background(), Options{Capacity: testCapacity, DataDir: filepath.Join(dir, "data"), PolicyFile: file,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil {
		t.Fatal("agent started on an invalid policy")
	}
	for _, want := range []string{file + ":5:5: ", file + ":8:16: "} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not hold %q:\n%v", want, err)
		}
	}
	_, err = New(context.Background(), Options{Capacity: testCapacity, DataDir: filepath.Join(dir, "data"), PolicyFile: filepath.Join(dir, "absent.yaml"),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing policy file: %v, want ErrNotExist", err)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// replaceFile replaces path atomically, as editors and config managers do:
// a temporary file renamed over it.
func replaceFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// within polls cond until it holds or d has passed since start.
func within(t *testing.T, start time.Time, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestPolicyHotReload edits the policy file under a running agent.
func TestPolicyHotReload(t *testing.T) {
	e := newPolicyEnv(t, policyA, healthyVM)
	ctx := context.Background()
	hs := httptest.NewServer(server.New(e.agent, server.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}))
	defer hs.Close()
	getPolicy := func() api.PolicyStatus {
		t.Helper()
		resp, err := http.Get(hs.URL + "/v1/policy")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st api.PolicyStatus
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /v1/policy: %s", resp.Status)
		}
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	isolationOf := func(spec api.WorkloadSpec) api.Isolation {
		t.Helper()
		d, err := e.agent.Place(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		return d.Isolation
	}
	vA, vB, vC := version(t, []byte(policyA)), version(t, []byte(policyB)), version(t, []byte(policyC))

	st := getPolicy()
	if st.Version != vA || st.Source != e.file || !st.Watching || st.Default != "container" || len(st.Rules) != 2 ||
		st.Rules[0].Name != "untrusted" || st.Rules[0].Outcome != "vm" || st.Rules[1].Outcome != "deny" || st.LastReloadError != nil {
		t.Fatalf("initial policy status = %+v", st)
	}
	ml := labelled("team", "ml")
	before := e.submit(ml)
	if before.Isolation != api.IsolationContainer || before.Placement.PolicyVersion != vA {
		t.Fatalf("under policy A: %+v", before.Placement)
	}

	// 1. A valid edit in place takes effect for the next submission.
	start := time.Now()
	writeFile(t, e.file, policyB)
	within(t, start, time.Second, "edit in place", func() bool { return isolationOf(ml) == api.IsolationVM })
	after := e.submit(ml)
	if after.Isolation != api.IsolationVM || after.Placement.DecidingRule != "ml-in-vm" || after.Placement.PolicyVersion != vB {
		t.Errorf("under policy B: %s %+v", after.Isolation, after.Placement)
	}
	if !strings.Contains(e.logs.String(), "old_version="+vA+" new_version="+vB) {
		t.Errorf("reload not logged with old and new version:\n%s", e.logs)
	}

	// 2. So does an atomic replacement (rename over the file).
	start = time.Now()
	replaceFile(t, e.file, policyC)
	within(t, start, time.Second, "rename over", func() bool { return isolationOf(labelled()) == api.IsolationVM })
	if st := getPolicy(); st.Version != vC || st.Reloads != 2 || st.ReloadFailures != 0 {
		t.Errorf("after rename: %+v", st)
	}

	// 3. An invalid edit is reported and the previous policy stays.
	start = time.Now()
	writeFile(t, e.file, policyBad)
	within(t, start, time.Second, "invalid edit reported", func() bool { return getPolicy().LastReloadError != nil })
	st = getPolicy()
	if st.Version != vC || st.ReloadFailures != 1 {
		t.Errorf("after an invalid edit: version %s, failures %d; want %s, 1", st.Version, st.ReloadFailures, vC)
	}
	re := st.LastReloadError
	pos := regexp.MustCompile(regexp.QuoteMeta(e.file) + `:\d+:\d+: `)
	if !pos.MatchString(re.Message) || len(re.Errors) != 3 || re.Errors[0].Line != 5 || re.Errors[0].Column != 5 ||
		re.Errors[2].Line != 8 || re.Errors[2].Column != 16 || !strings.Contains(re.Errors[2].Message, "jail") {
		t.Errorf("last reload error = %+v", re)
	}
	if w := e.submit(labelled()); w.Isolation != api.IsolationVM || w.Placement.PolicyVersion != vC {
		t.Errorf("after an invalid edit, policy C must still decide: %s %+v", w.Isolation, w.Placement)
	}
	if !strings.Contains(e.logs.String(), "isolation policy change rejected") {
		t.Errorf("rejection not logged:\n%s", e.logs)
	}

	// 4. Fixing the file clears the error; the failure count stays.
	start = time.Now()
	replaceFile(t, e.file, policyA)
	within(t, start, time.Second, "fix", func() bool { return getPolicy().Version == vA })
	if st := getPolicy(); st.LastReloadError != nil || st.ReloadFailures != 1 || st.Reloads != 3 {
		t.Errorf("after the fix: %+v", st)
	}

	// Decisions already made never change.
	for _, w := range []*api.Workload{before, after} {
		got, err := e.agent.Get(ctx, w.ID)
		if err != nil {
			t.Fatal(err)
		}
		if !equalJSON(t, got.Placement, w.Placement) || got.Isolation != w.Isolation {
			t.Errorf("workload %s's decision changed: %+v, was %+v", w.ID, got.Placement, w.Placement)
		}
	}
}

func TestPolicyFileRemovedKeepsPolicy(t *testing.T) {
	e := newPolicyEnv(t, policyA, nil)
	if err := os.Remove(e.file); err != nil {
		t.Fatal(err)
	}
	within(t, time.Now(), 2*time.Second, "removal reported", func() bool { return e.agent.Policy(context.Background()).LastReloadError != nil })
	st := e.agent.Policy(context.Background())
	if st.Version != version(t, []byte(policyA)) || !strings.Contains(st.LastReloadError.Message, "no such file") {
		t.Errorf("after removal: %+v", st)
	}
	start := time.Now()
	writeFile(t, e.file, policyC)
	within(t, start, time.Second, "re-created file", func() bool {
		return e.agent.Policy(context.Background()).Version == version(t, []byte(policyC))
	})
}

func TestCloseStopsWatching(t *testing.T) {
	e := newPolicyEnv(t, policyA, nil)
	h := e.agent.pol
	if err := e.agent.Close(); err != nil {
		t.Fatal(err)
	}
	e.agent = nil
	select {
	case <-h.watcher.Done():
	default:
		t.Fatal("the policy watcher still runs after Close")
	}
}
