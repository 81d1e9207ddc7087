package placement

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to Parse. It must never panic, and must
// return either a usable Policy or an ErrorList of positioned messages,
// never both or neither.
func FuzzParse(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/*.yaml")
	examples, _ := filepath.Glob("../configs/examples/*.yaml")
	seeds = append(seeds, examples...)
	seeds = append(seeds, "../configs/policy.yaml")
	for _, s := range seeds {
		data, err := os.ReadFile(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(testPolicy))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := Parse("fuzz.yaml", data)
		if (p == nil) == (err == nil) {
			t.Fatalf("Parse returned policy %v and error %v", p, err)
		}
		if err != nil {
			var list ErrorList
			if !errors.As(err, &list) || len(list) == 0 {
				t.Fatalf("error %T %q is not a non-empty ErrorList", err, err)
			}
			lines := bytes.Count(data, []byte("\n")) + 1
			for _, e := range list {
				if e.File != "fuzz.yaml" || e.Msg == "" || e.Line < 0 || e.Line > lines+1 || e.Column < 0 {
					t.Fatalf("badly positioned error %+v (file has %d lines)", e, lines)
				}
			}
			if len(list) > maxErrors+1 {
				t.Fatalf("%d errors, more than the cap", len(list))
			}
			return
		}
		if !strings.HasPrefix(p.Version(), "sha256:") {
			t.Fatalf("version %q", p.Version())
		}
		switch p.Default() {
		case OutcomeContainer, OutcomeVM, OutcomeDeny:
		default:
			t.Fatalf("default %q", p.Default())
		}
		seen := map[string]bool{}
		for _, r := range p.Rules() {
			if seen[r.Name] || r.Name == "" || r.Outcome.rank() == 0 {
				t.Fatalf("bad or duplicate rule %+v", r)
			}
			seen[r.Name] = true
		}
		// A policy that parses must decide without panicking.
		for _, w := range []Workload{
			{Image: "docker.io/library/busybox:latest"},
			{Image: "docker.io/untrusted/x:1", Privileged: true, Isolation: IsolationContainer,
				Labels:    map[string]string{"trust": "untrusted", "tenant": "acme"},
				Resources: Resources{CPU: 64, MemoryMB: 1 << 20, Pids: 1 << 20}},
		} {
			d := Decide(w, p, fullNode())
			if d.Verdict == "" || d.Explanation == "" {
				t.Fatalf("empty decision %+v", d)
			}
		}
	})
}

// FuzzDecide runs random workloads and nodes against a fixed policy and
// checks the invariants that make policy safe to compose.
func FuzzDecide(f *testing.F) {
	p := mustParse(f, testPolicy)
	f.Add("web", "docker.io/library/busybox:latest", "trust", "untrusted", "tenant", "acme", false, "", 0.5, int64(512), int64(100), true, true, "kvm", "zone", "dmz")
	f.Add("x", "docker.io/untrusted/app:1", "block", "yes", "team", "ml", true, "container", 8.0, int64(9000), int64(5000), false, true, "tcg", "", "")
	f.Add("", "registry.example.com/a/b:1", "env", "prod", "tier", "web", false, "vm", 0.0, int64(0), int64(0), true, false, "", "k", "v")
	f.Add("", "registry.evil.example/a", "probe", "1", "probe-deny", "1", false, "bogus", -1.0, int64(-5), int64(1001), true, true, "kvm", "zone", "dmz")
	f.Fuzz(func(t *testing.T, name, image, k1, v1, k2, v2 string, priv bool, iso string,
		cpu float64, mem, pids int64, ctrOK, vmOK bool, accel, nk, nv string) {
		w := Workload{
			Name: name, Image: image, Privileged: priv, Isolation: Isolation(iso),
			Labels:    map[string]string{k1: v1, k2: v2},
			Resources: Resources{CPU: cpu, MemoryMB: mem, Pids: pids},
		}
		n := NodeFacts{ContainerAvailable: ctrOK, VMAvailable: vmOK, Accel: accel, Labels: map[string]string{nk: nv}}
		d := Decide(w, p, n)
		checkInvariants(t, p, w, n, d)
	})
}

func checkInvariants(t *testing.T, p *Policy, w Workload, n NodeFacts, d Decision) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("%s\nworkload %+v\nnode %+v\ndecision %+v", fmt.Sprintf(format, args...), w, n, d)
	}
	if d.Isolation != IsolationContainer && d.Isolation != IsolationVM {
		fail("isolation %q", d.Isolation)
	}
	if d.PolicyVersion != p.Version() || d.Explanation == "" || strings.Contains(d.Explanation, "\n") {
		fail("bad version or explanation")
	}
	rules := p.Rules()
	order := make(map[string]int, len(rules))
	outcome := make(map[string]Outcome, len(rules))
	for i, r := range rules {
		order[r.Name], outcome[r.Name] = i, r.Outcome
	}
	var denied, vm bool
	last := -1
	for _, m := range d.Matched {
		i, ok := order[m.Rule]
		if !ok || i <= last || outcome[m.Rule] != m.Outcome || m.Reason == "" {
			fail("bad match %+v", m)
		}
		last = i
		denied = denied || m.Outcome == OutcomeDeny
		vm = vm || m.Outcome == OutcomeVM
	}
	if denied != (d.Verdict == VerdictDeny && d.DecidingRule != DecidedByDefault) {
		fail("a deny rule matched exactly when the verdict is a rule's deny")
	}
	if denied && outcome[d.DecidingRule] != OutcomeDeny {
		fail("deny decided by non-deny rule %q", d.DecidingRule)
	}
	if vm && d.Isolation != IsolationVM {
		fail("a vm rule matched but isolation is %s", d.Isolation)
	}
	req := w.Isolation
	if req == IsolationVM && d.Isolation != IsolationVM {
		fail("vm requested but isolation is %s", d.Isolation)
	}
	if len(d.Matched) == 0 && !slices.Contains([]string{DecidedByDefault, DecidedByRequest}, d.DecidingRule) {
		fail("nothing matched but decided by %q", d.DecidingRule)
	}
	switch d.Verdict {
	case VerdictAllow:
		if req == IsolationContainer && d.Isolation != IsolationContainer {
			fail("allowed with %s though container was requested", d.Isolation)
		}
		if ok, _ := n.available(d.Isolation); !ok {
			fail("allowed on a node that cannot run %s", d.Isolation)
		}
	case VerdictRefused:
		valid := req == "" || req == IsolationAuto || req == IsolationContainer || req == IsolationVM
		if valid && !(req == IsolationContainer && d.Isolation == IsolationVM) {
			fail("refused without a container request against vm")
		}
	case VerdictUnschedulable:
		if ok, _ := n.available(d.Isolation); ok {
			fail("unschedulable on a node that can run %s", d.Isolation)
		}
	case VerdictDeny:
	default:
		fail("verdict %q", d.Verdict)
	}
}
