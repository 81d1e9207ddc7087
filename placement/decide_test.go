package placement

import (
	"slices"
	"strings"
	"testing"
)

// testPolicy exercises every kind of condition. Rules are kept to one
// condition each, except where a case needs AND.
const testPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: untrusted
    match: {labels: {trust: untrusted}}
    isolation: vm
  - name: accelerators
    match: {labels_exist: [gpu, fpga]}
    isolation: vm
  - name: blocked-images
    match:
      images: ["docker.io/untrusted/*", "*.evil.example/**", "docker.io/evil/app"]
    action: deny
  - name: tenants-in-vms
    match: {tenants: [acme, globex]}
    isolation: vm
  - name: privileged
    match: {privileged: true}
    isolation: vm
  - name: big-memory
    match: {memory_mb_gt: 4096}
    isolation: vm
  - name: many-cpus
    match: {cpu_gt: 4}
    isolation: vm
  - name: many-pids
    match: {pids_gt: 1000}
    isolation: vm
  - name: ml-on-kvm
    when: '"team" in workload.labels && workload.labels.team == "ml" && node.accel == "kvm"'
    isolation: vm
  - name: broken-expression
    match: {labels_exist: [probe]}
    when: workload.labels.missing == "x"
    isolation: vm
  - name: prod-internal
    match:
      labels: {env: prod, tier: web}
      images: ["registry.example.com/**"]
    isolation: container
  - name: blocked-label
    match: {labels: {block: "yes"}}
    action: deny
  - name: broken-deny
    match: {labels_exist: [probe-deny]}
    when: workload.labels["nope"] == "x"
    action: deny
  - name: cpu-heavy
    when: workload.resources.cpu > 0.0 && workload.resources.memory_mb > 0 && workload.resources.cpu * 1024.0 > double(workload.resources.memory_mb)
    isolation: vm
  - name: multi-line
    when: |
      "shape" in workload.labels &&
        workload.labels.shape == "tall"
    isolation: vm
  - name: dmz-node
    when: '"zone" in node.labels && node.labels.zone == "dmz" && workload.isolation == "auto"'
    isolation: vm
`

const defaultVMPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: vm
rules:
  - name: trusted-as-containers
    match: {labels: {trust: trusted}}
    isolation: container
`

const allowListPolicy = `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: deny
rules:
  - name: ours
    match: {images: ["registry.example.com/**"]}
    isolation: container
`

func mustParse(t testing.TB, src string) *Policy {
	t.Helper()
	p, err := Parse("test.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

// fullNode can run both isolations with KVM.
func fullNode() NodeFacts {
	return NodeFacts{ContainerAvailable: true, VMAvailable: true, Accel: "kvm"}
}

func TestDecide(t *testing.T) {
	policies := map[string]*Policy{
		"test":      mustParse(t, testPolicy),
		"defaultvm": mustParse(t, defaultVMPolicy),
		"allowlist": mustParse(t, allowListPolicy),
	}
	noVM := NodeFacts{ContainerAvailable: true, VMReason: "/dev/kvm missing and qemu not installed"}
	noCtr := NodeFacts{VMAvailable: true, Accel: "kvm", ContainerReason: "runc not found"}
	busybox := "docker.io/library/busybox:latest"

	tests := []struct {
		name   string
		policy string // key in policies; "test" when empty
		w      Workload
		n      *NodeFacts // fullNode() when nil

		verdict Verdict
		iso     Isolation
		rule    string
		matched []string // rule names, in order
		reasons []string // substrings that must appear in some Match.Reason
		explain []string // substrings of Explanation
	}{
		{
			name:    "no rule matches: default",
			w:       Workload{Image: busybox},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
			explain: []string{"container: the policy default requires container (no rule matched)"},
		},
		{
			name:    "label equals",
			w:       Workload{Image: busybox, Labels: map[string]string{"trust": "untrusted"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "untrusted",
			matched: []string{"untrusted"},
			reasons: []string{"label trust=untrusted"},
			explain: []string{`vm: rule "untrusted" (label trust=untrusted) requires vm`},
		},
		{
			name:    "label with other value does not match",
			w:       Workload{Image: busybox, Labels: map[string]string{"trust": "trusted"}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "labels_exist first of list",
			w:       Workload{Image: busybox, Labels: map[string]string{"gpu": ""}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "accelerators",
			matched: []string{"accelerators"},
			reasons: []string{"label gpu present"},
		},
		{
			name:    "labels_exist second of list",
			w:       Workload{Image: busybox, Labels: map[string]string{"fpga": "xilinx"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "accelerators",
			reasons: []string{"label fpga present"},
		},
		{
			name:    "image glob within a segment",
			w:       Workload{Image: "docker.io/untrusted/app:1.0"},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "blocked-images",
			matched: []string{"blocked-images"},
			reasons: []string{"image docker.io/untrusted/app:1.0 matches docker.io/untrusted/*"},
			explain: []string{`denied: rule "blocked-images"`},
		},
		{
			name:    "image glob star does not cross slash",
			w:       Workload{Image: "docker.io/untrusted/team/app:1.0"},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "image glob double star crosses slashes",
			w:       Workload{Image: "registry.evil.example/a/b/c@sha256:0123"},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "blocked-images",
			reasons: []string{"matches *.evil.example/**"},
		},
		{
			name:    "image glob without tag matches any tag",
			w:       Workload{Image: "docker.io/evil/app:latest"},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "blocked-images",
			reasons: []string{"matches docker.io/evil/app"},
		},
		{
			name:    "image glob without tag is not a prefix match",
			w:       Workload{Image: "docker.io/evil/application:latest"},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "tenant listed",
			w:       Workload{Image: busybox, Labels: map[string]string{"tenant": "globex"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "tenants-in-vms",
			reasons: []string{"tenant globex"},
		},
		{
			name:    "tenant not listed",
			w:       Workload{Image: busybox, Labels: map[string]string{"tenant": "initech"}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "privileged",
			w:       Workload{Image: busybox, Privileged: true},
			verdict: VerdictAllow, iso: IsolationVM, rule: "privileged",
			matched: []string{"privileged"},
			reasons: []string{"privileged"},
		},
		{
			name:    "memory threshold exceeded",
			w:       Workload{Image: busybox, Resources: Resources{MemoryMB: 8192}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "big-memory",
			matched: []string{"big-memory"},
			reasons: []string{"memory_mb 8192 > 4096"},
		},
		{
			name:    "memory threshold is strict",
			w:       Workload{Image: busybox, Resources: Resources{MemoryMB: 4096}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "cpu threshold",
			w:       Workload{Image: busybox, Resources: Resources{CPU: 8}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "many-cpus",
			reasons: []string{"cpu 8 > 4"},
		},
		{
			name:    "pids threshold",
			w:       Workload{Image: busybox, Resources: Resources{Pids: 2000}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "many-pids",
			reasons: []string{"pids 2000 > 1000"},
		},
		{
			name:    "CEL over labels and node facts",
			w:       Workload{Image: busybox, Labels: map[string]string{"team": "ml"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "ml-on-kvm",
			matched: []string{"ml-on-kvm"},
			reasons: []string{`when: "team" in workload.labels && workload.labels.team == "ml" && node.accel == "kvm" was true`},
		},
		{
			name:    "CEL false on tcg node",
			w:       Workload{Image: busybox, Labels: map[string]string{"team": "ml"}},
			n:       &NodeFacts{ContainerAvailable: true, VMAvailable: true, Accel: "tcg"},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "CEL over resources",
			w:       Workload{Image: busybox, Resources: Resources{CPU: 2, MemoryMB: 1024}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "cpu-heavy",
			matched: []string{"cpu-heavy"},
		},
		{
			name:    "CEL over resources false",
			w:       Workload{Image: busybox, Resources: Resources{CPU: 1, MemoryMB: 2048}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "CEL over node labels",
			w:       Workload{Image: busybox},
			n:       &NodeFacts{ContainerAvailable: true, VMAvailable: true, Labels: map[string]string{"zone": "dmz"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "dmz-node",
		},
		{
			name:    "CEL sees an empty request as auto",
			w:       Workload{Image: busybox, Isolation: ""},
			n:       &NodeFacts{ContainerAvailable: true, VMAvailable: true, Labels: map[string]string{"zone": "dmz"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "dmz-node",
		},
		{
			name:    "CEL evaluation error fails closed",
			w:       Workload{Image: busybox, Labels: map[string]string{"probe": "1"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "broken-expression",
			matched: []string{"broken-expression"},
			reasons: []string{"label probe present", "when: evaluation error: no such key: missing"},
		},
		{
			name:    "CEL evaluation error in a deny rule denies",
			w:       Workload{Image: busybox, Labels: map[string]string{"probe-deny": "1"}},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "broken-deny",
			reasons: []string{"when: evaluation error: no such key: nope"},
		},
		{
			name:    "multi-line expression explained on one line",
			w:       Workload{Image: busybox, Labels: map[string]string{"shape": "tall"}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "multi-line",
			reasons: []string{`when: "shape" in workload.labels && workload.labels.shape == "tall" was true`},
		},
		{
			name:    "control characters in workload values are quoted",
			w:       Workload{Image: "docker.io/untrusted/app\n:1", Labels: map[string]string{"trust": "untrusted"}},
			verdict: VerdictDeny, iso: IsolationVM, rule: "blocked-images",
			reasons: []string{`image "docker.io/untrusted/app\n:1" matches docker.io/untrusted/*`},
		},
		{
			name:    "multi-line driver reason folded into the explanation",
			w:       Workload{Image: busybox, Privileged: true},
			n:       &NodeFacts{ContainerAvailable: true, VMReason: "libvirt: connection refused\n\tis libvirtd running?"},
			verdict: VerdictUnschedulable, iso: IsolationVM, rule: "privileged",
			explain: []string{"cannot run vm workloads: libvirt: connection refused is libvirtd running?"},
		},
		{
			name:    "match conditions are ANDed",
			w:       Workload{Image: "registry.example.com/shop/web:3", Labels: map[string]string{"env": "prod", "tier": "web"}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "prod-internal",
			matched: []string{"prod-internal"},
			reasons: []string{"label env=prod, label tier=web, image registry.example.com/shop/web:3 matches registry.example.com/**"},
			explain: []string{`container: rule "prod-internal"`},
		},
		{
			name:    "one unmet condition of an AND",
			w:       Workload{Image: busybox, Labels: map[string]string{"env": "prod", "tier": "web"}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name: "several rules: strongest wins, first of equals decides",
			w: Workload{Image: "registry.example.com/shop/web:3", Privileged: true,
				Labels:    map[string]string{"env": "prod", "tier": "web", "trust": "untrusted"},
				Resources: Resources{MemoryMB: 9000}},
			verdict: VerdictAllow, iso: IsolationVM, rule: "untrusted",
			matched: []string{"untrusted", "privileged", "big-memory", "prod-internal"},
			explain: []string{`vm: rule "untrusted" (label trust=untrusted) requires vm; 4 rules matched; policy sha256:`},
		},
		{
			name:    "deny wins over vm",
			w:       Workload{Image: "docker.io/untrusted/app:1", Labels: map[string]string{"trust": "untrusted"}},
			verdict: VerdictDeny, iso: IsolationVM, rule: "blocked-images",
			matched: []string{"untrusted", "blocked-images"},
			explain: []string{`denied: rule "blocked-images" (image docker.io/untrusted/app:1 matches docker.io/untrusted/*) denies it; 2 rules matched`},
		},
		{
			name:    "first deny rule decides",
			w:       Workload{Image: "docker.io/untrusted/app:1", Labels: map[string]string{"block": "yes"}},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "blocked-images",
			matched: []string{"blocked-images", "blocked-label"},
		},
		{
			name:    "deny wins over a vm request",
			w:       Workload{Image: busybox, Labels: map[string]string{"block": "yes"}, Isolation: IsolationVM},
			verdict: VerdictDeny, iso: IsolationVM, rule: "blocked-label",
		},
		{
			name:    "deny wins over an invalid request",
			w:       Workload{Image: busybox, Labels: map[string]string{"block": "yes"}, Isolation: "bogus"},
			verdict: VerdictDeny, rule: "blocked-label",
			iso: IsolationContainer,
		},
		{
			name:    "vm request raises container",
			w:       Workload{Image: busybox, Isolation: IsolationVM},
			verdict: VerdictAllow, iso: IsolationVM, rule: "request",
			explain: []string{"vm: the submitter requested vm (the policy alone requires container)"},
		},
		{
			name:    "vm request where policy requires vm names the rule",
			w:       Workload{Image: busybox, Privileged: true, Isolation: IsolationVM},
			verdict: VerdictAllow, iso: IsolationVM, rule: "privileged",
		},
		{
			name:    "container request honoured",
			w:       Workload{Image: busybox, Isolation: IsolationContainer},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "container request refused where a rule requires vm",
			w:       Workload{Image: busybox, Labels: map[string]string{"trust": "untrusted"}, Isolation: IsolationContainer},
			verdict: VerdictRefused, iso: IsolationVM, rule: "untrusted",
			matched: []string{"untrusted"},
			explain: []string{`refused: container was requested, but rule "untrusted" (label trust=untrusted) requires vm; a request may raise isolation, never lower it`},
		},
		{
			name:    "invalid request refused",
			w:       Workload{Image: busybox, Isolation: "gvisor"},
			verdict: VerdictRefused, iso: IsolationContainer, rule: "request",
			explain: []string{`refused: isolation request "gvisor" is not one of auto, container or vm`},
		},
		{
			name:    "node without hypervisor: unschedulable, no downgrade",
			w:       Workload{Image: busybox, Labels: map[string]string{"trust": "untrusted"}},
			n:       &noVM,
			verdict: VerdictUnschedulable, iso: IsolationVM, rule: "untrusted",
			explain: []string{`unschedulable: rule "untrusted" (label trust=untrusted) requires vm, but this node cannot run vm workloads: /dev/kvm missing and qemu not installed`},
		},
		{
			name:    "vm request on node without hypervisor",
			w:       Workload{Image: busybox, Isolation: IsolationVM},
			n:       &noVM,
			verdict: VerdictUnschedulable, iso: IsolationVM, rule: "request",
			explain: []string{"unschedulable: the submitter requested vm", "cannot run vm workloads: /dev/kvm missing"},
		},
		{
			name:    "node without hypervisor still runs containers",
			w:       Workload{Image: busybox},
			n:       &noVM,
			verdict: VerdictAllow, iso: IsolationContainer, rule: "default",
		},
		{
			name:    "node without container runtime",
			w:       Workload{Image: busybox},
			n:       &noCtr,
			verdict: VerdictUnschedulable, iso: IsolationContainer, rule: "default",
			explain: []string{"cannot run container workloads: runc not found"},
		},
		{
			name:    "unavailable driver without a reason still explains",
			w:       Workload{Image: busybox, Privileged: true},
			n:       &NodeFacts{ContainerAvailable: true},
			verdict: VerdictUnschedulable, iso: IsolationVM, rule: "privileged",
			explain: []string{"cannot run vm workloads: no working VM driver"},
		},
		{
			name:    "default vm",
			policy:  "defaultvm",
			w:       Workload{Image: busybox},
			verdict: VerdictAllow, iso: IsolationVM, rule: "default",
			explain: []string{"vm: the policy default requires vm (no rule matched)"},
		},
		{
			name:    "container rule overrides a vm default",
			policy:  "defaultvm",
			w:       Workload{Image: busybox, Labels: map[string]string{"trust": "trusted"}},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "trusted-as-containers",
		},
		{
			name:    "container request refused by a vm default",
			policy:  "defaultvm",
			w:       Workload{Image: busybox, Isolation: IsolationContainer},
			verdict: VerdictRefused, iso: IsolationVM, rule: "default",
			explain: []string{"refused: container was requested, but the policy default requires vm"},
		},
		{
			name:    "deny default makes an allow-list: unlisted",
			policy:  "allowlist",
			w:       Workload{Image: busybox},
			verdict: VerdictDeny, iso: IsolationContainer, rule: "default",
			explain: []string{"denied: no rule matched and the default denies"},
		},
		{
			name:    "deny default makes an allow-list: listed",
			policy:  "allowlist",
			w:       Workload{Image: "registry.example.com/app:1"},
			verdict: VerdictAllow, iso: IsolationContainer, rule: "ours",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := policies[tc.policy]
			if tc.policy == "" {
				p = policies["test"]
			}
			n := fullNode()
			if tc.n != nil {
				n = *tc.n
			}
			d := Decide(tc.w, p, n)
			if d.Verdict != tc.verdict || d.Isolation != tc.iso || d.DecidingRule != tc.rule {
				t.Errorf("got verdict %s, isolation %s, rule %q; want %s, %s, %q\nexplanation: %s",
					d.Verdict, d.Isolation, d.DecidingRule, tc.verdict, tc.iso, tc.rule, d.Explanation)
			}
			if d.Allowed() != (tc.verdict == VerdictAllow) {
				t.Errorf("Allowed() = %v with verdict %s", d.Allowed(), d.Verdict)
			}
			if d.PolicyVersion != p.Version() || !strings.HasPrefix(d.PolicyVersion, "sha256:") {
				t.Errorf("PolicyVersion = %q, policy version %q", d.PolicyVersion, p.Version())
			}
			if !strings.HasSuffix(d.Explanation, "policy "+p.Version()) {
				t.Errorf("explanation %q does not end with the policy version", d.Explanation)
			}
			if strings.Contains(d.Explanation, "\n") {
				t.Errorf("explanation is not one line: %q", d.Explanation)
			}
			var names []string
			for _, m := range d.Matched {
				names = append(names, m.Rule)
				if m.Reason == "" || m.Outcome == "" {
					t.Errorf("match %+v lacks a reason or outcome", m)
				}
			}
			if tc.matched != nil && !slices.Equal(names, tc.matched) {
				t.Errorf("matched %q, want %q", names, tc.matched)
			}
			if tc.matched == nil && tc.rule == DecidedByDefault && len(names) > 0 {
				t.Errorf("default decided but rules matched: %q", names)
			}
			for _, want := range tc.reasons {
				if !slices.ContainsFunc(d.Matched, func(m Match) bool { return strings.Contains(m.Reason, want) }) {
					t.Errorf("no match reason contains %q; matches: %+v", want, d.Matched)
				}
			}
			for _, want := range tc.explain {
				if !strings.Contains(d.Explanation, want) {
					t.Errorf("explanation %q\ndoes not contain %q", d.Explanation, want)
				}
			}
		})
	}
}

func TestDecideWithoutPolicyDenies(t *testing.T) {
	for _, p := range []*Policy{nil, {}} {
		d := Decide(Workload{Image: "docker.io/library/busybox:latest"}, p, fullNode())
		if d.Verdict != VerdictDeny || d.Explanation == "" {
			t.Errorf("Decide with policy %v = %+v, want a deny with an explanation", p, d)
		}
	}
}

// TestDecideIsDeterministic guards the trace: map iteration order must not
// leak into reasons or explanations.
func TestDecideIsDeterministic(t *testing.T) {
	p := mustParse(t, testPolicy)
	w := Workload{Image: "registry.example.com/shop/web:3", Privileged: true,
		Labels:    map[string]string{"env": "prod", "tier": "web", "trust": "untrusted", "gpu": "a100", "fpga": "x"},
		Resources: Resources{MemoryMB: 9000, CPU: 16, Pids: 5000}}
	first := Decide(w, p, fullNode())
	for range 50 {
		d := Decide(w, p, fullNode())
		if d.Explanation != first.Explanation || !slices.Equal(d.Matched, first.Matched) {
			t.Fatalf("decisions differ:\n%+v\n%+v", first, d)
		}
	}
}

// TestDecideConcurrent runs decisions on one Policy from many goroutines;
// run with -race it proves a Policy is safe to share.
func TestDecideConcurrent(t *testing.T) {
	p := mustParse(t, testPolicy)
	w := Workload{Image: "docker.io/library/busybox:latest", Labels: map[string]string{"team": "ml", "probe": "1"}}
	want := Decide(w, p, fullNode())
	done := make(chan Decision)
	for range 8 {
		go func() {
			var d Decision
			for range 100 {
				d = Decide(w, p, fullNode())
			}
			done <- d
		}()
	}
	for range 8 {
		if d := <-done; d.Explanation != want.Explanation {
			t.Errorf("concurrent decision %q, want %q", d.Explanation, want.Explanation)
		}
	}
}

func TestDecideCELCostLimitFailsClosed(t *testing.T) {
	p := mustParse(t, `apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: expensive
    when: 'workload.labels.all(k, workload.labels.all(j, (k + j + k + j).size() > 0 && k.matches("^[a-z]+$")))'
    action: deny
`)
	labels := make(map[string]string)
	for i := range 200 {
		labels[strings.Repeat("a", i+1)] = "x"
	}
	d := Decide(Workload{Image: "docker.io/library/busybox:latest", Labels: labels}, p, fullNode())
	if d.Verdict != VerdictDeny || len(d.Matched) != 1 || !strings.Contains(d.Matched[0].Reason, "evaluation error") ||
		!strings.Contains(d.Matched[0].Reason, "cost limit") {
		t.Fatalf("want a deny from the cost limit, got %+v", d)
	}
	// Within the limit the same rule evaluates normally.
	d = Decide(Workload{Image: "docker.io/library/busybox:latest", Labels: map[string]string{"a": "x"}}, p, fullNode())
	if d.Verdict != VerdictDeny || strings.Contains(d.Matched[0].Reason, "error") {
		t.Fatalf("want a plain deny, got %+v", d)
	}
}
