package placement

import (
	"strings"
	"testing"
)

const execPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: no-exec-into-pci
    match: {labels: {compliance: pci}}
    exec: deny
  - name: untrusted-in-vms
    match: {labels: {trust: untrusted}}
    isolation: vm
    exec: allow
  - name: big-ones-locked
    when: workload.resources.memory_mb > 4096
    isolation: vm
    exec: deny
`

func TestDecideExec(t *testing.T) {
	p, err := Parse("exec.yaml", []byte(execPolicy))
	if err != nil {
		t.Fatal(err)
	}
	n := NodeFacts{ContainerAvailable: true, VMAvailable: true}
	for _, tc := range []struct {
		name   string
		w      Workload
		denyBy string
		reason string
	}{
		{"no rule", Workload{Image: "busybox"}, "", ""},
		{"exec-only rule", Workload{Image: "busybox", Labels: map[string]string{"compliance": "pci"}}, "no-exec-into-pci", "label compliance=pci"},
		{"exec allow", Workload{Image: "busybox", Labels: map[string]string{"trust": "untrusted"}}, "", ""},
		{"when", Workload{Image: "busybox", Resources: Resources{MemoryMB: 8192}}, "big-ones-locked", "workload.resources.memory_mb > 4096"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := DecideExec(tc.w, p, n)
			if d.Allowed != (tc.denyBy == "") || d.Rule != tc.denyBy || !strings.Contains(d.Reason, tc.reason) {
				t.Errorf("DecideExec = %+v, want denied by %q (%q)", d, tc.denyBy, tc.reason)
			}
			if d.PolicyVersion != p.Version() || !strings.Contains(d.Explanation, p.Version()) {
				t.Errorf("decision %+v does not name the policy version %s", d, p.Version())
			}
			if !d.Allowed && !strings.Contains(d.Explanation, tc.denyBy) {
				t.Errorf("explanation %q does not name the rule", d.Explanation)
			}
		})
	}
	// A rule about exec alone places nothing: the workload it matches is
	// placed by the rest of the policy.
	d := Decide(Workload{Image: "busybox", Labels: map[string]string{"compliance": "pci"}}, p, n)
	if d.Isolation != IsolationContainer || len(d.Matched) != 0 || d.DecidingRule != DecidedByDefault {
		t.Errorf("Decide with an exec-only rule matching = %+v, want the default and no match", d)
	}
	if d := DecideExec(Workload{}, nil, n); d.Allowed {
		t.Errorf("DecideExec without a policy allowed exec")
	}
}

func TestParseExecKey(t *testing.T) {
	_, err := Parse("bad.yaml", []byte(`apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: typo
    match: {privileged: true}
    exec: forbid
`))
	if err == nil || !strings.Contains(err.Error(), "bad.yaml:7:11") || !strings.Contains(err.Error(), "exec must be deny") {
		t.Errorf("Parse of exec: forbid = %v, want an error at 7:11 naming the values", err)
	}
}

// network on a rule about exec alone would be ignored by placement (such a
// rule places nothing): it is refused, with its position, not accepted.
func TestParseNetworkNeedsAnOutcome(t *testing.T) {
	_, err := Parse("bad.yaml", []byte(`apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: untrusted
    match: {labels: {trust: untrusted}}
    exec: deny
    network: none
`))
	if err == nil || !strings.Contains(err.Error(), "bad.yaml:8:14") || !strings.Contains(err.Error(), "network needs an outcome") {
		t.Errorf("Parse of network on an exec-only rule = %v, want an error at 8:14", err)
	}
}
