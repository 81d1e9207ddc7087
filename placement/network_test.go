package placement

import (
	"strings"
	"testing"
)

const networkPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: batch-offline
    match: {labels: {kind: batch}}
    isolation: container
    network: none
  - name: untrusted
    match: {labels: {trust: untrusted}}
    isolation: vm
    network: none
  - name: ingress-on-host
    match: {labels: {role: ingress}}
    isolation: container
    network: host
`

func TestNetworkKnobs(t *testing.T) {
	p, err := Parse("network.yaml", []byte(networkPolicy))
	if err != nil {
		t.Fatal(err)
	}
	facts := NodeFacts{ContainerAvailable: true, VMAvailable: true}
	cases := []struct {
		name    string
		w       Workload
		verdict Verdict
		network string
		rule    string // deciding rule, when refused
		says    string
	}{
		{"bridge by default", Workload{}, VerdictAllow, NetworkBridge, "", ""},
		{"none on request", Workload{Network: "none"}, VerdictAllow, NetworkNone, "", ""},
		{"rule forces none", Workload{Labels: map[string]string{"kind": "batch"}}, VerdictAllow, NetworkNone, "", `network none (rule "batch-offline")`},
		{"forced none with ports is refused", Workload{Labels: map[string]string{"kind": "batch"}, Ports: 1}, VerdictRefused, "", "batch-offline", "publishes ports"},
		{"forced none on a vm", Workload{Labels: map[string]string{"trust": "untrusted"}}, VerdictAllow, NetworkNone, "", "network none"},
		{"host allowed by rule", Workload{Labels: map[string]string{"role": "ingress"}, Network: "host"}, VerdictAllow, NetworkHost, "", ""},
		{"host without a rule", Workload{Network: "host"}, VerdictRefused, "", DecidedByRequest, "no policy rule allows it"},
		{"host in a vm", Workload{Labels: map[string]string{"role": "ingress"}, Network: "host", Isolation: IsolationVM}, VerdictRefused, "", DecidedByRequest, "only for containers"},
		{"host but forced none", Workload{Labels: map[string]string{"role": "ingress", "kind": "batch"}, Network: "host"}, VerdictRefused, "", "batch-offline", "forces network none"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d := Decide(tc.w, p, facts)
			if d.Verdict != tc.verdict || d.Network != tc.network {
				t.Fatalf("verdict %s network %q, want %s %q: %s", d.Verdict, d.Network, tc.verdict, tc.network, d.Explanation)
			}
			if tc.rule != "" && d.DecidingRule != tc.rule {
				t.Errorf("deciding rule %q, want %q", d.DecidingRule, tc.rule)
			}
			if !strings.Contains(d.Explanation, tc.says) {
				t.Errorf("explanation %q does not say %q", d.Explanation, tc.says)
			}
		})
	}
}

func TestNetworkKnobValidation(t *testing.T) {
	_, err := Parse("bad.yaml", []byte(`apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: vm-on-host
    match: {privileged: true}
    isolation: vm
    network: host
  - name: typo
    match: {privileged: false}
    isolation: container
    network: bridged
`))
	if err == nil {
		t.Fatal("invalid network knobs accepted")
	}
	for _, want := range []string{"bad.yaml:8:14: rule \"vm-on-host\": network: host needs isolation: container", "bad.yaml:12:14: rule \"typo\": network must be none"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors do not include %q:\n%v", want, err)
		}
	}
}
