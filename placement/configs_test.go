package placement_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/placement"
)

// The policies berth ships must parse, and must decide what their comments
// promise. They live in configs/, next to the agent's own configuration.

func TestShippedPoliciesParse(t *testing.T) {
	files, err := filepath.Glob("../configs/examples/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 3 {
		t.Fatalf("want at least 3 example policies, found %v", files)
	}
	files = append(files, "../configs/policy.yaml")
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		p, err := placement.Parse(f, data)
		if err != nil {
			t.Errorf("%s does not parse:\n%v", f, err)
			continue
		}
		if len(p.Rules()) == 0 {
			t.Errorf("%s has no rules", f)
		}
		for _, r := range p.Rules() {
			if r.Description == "" {
				t.Errorf("%s: rule %s has no description", f, r.Name)
			}
		}
	}
}

func TestDefaultPolicyIsEmbedded(t *testing.T) {
	onDisk, err := os.ReadFile("../configs/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(configs.DefaultPolicy, onDisk) {
		t.Fatal("configs.DefaultPolicy differs from configs/policy.yaml")
	}
}

var node = placement.NodeFacts{ContainerAvailable: true, VMAvailable: true, Accel: "kvm"}

type example struct {
	name    string
	w       placement.Workload
	n       placement.NodeFacts
	verdict placement.Verdict
	iso     placement.Isolation
	rule    string
}

func checkExamples(t *testing.T, file string, cases []example) {
	t.Helper()
	var p *placement.Policy
	if file == "" {
		var err error
		if p, err = placement.Parse("policy.yaml", configs.DefaultPolicy); err != nil {
			t.Fatal(err)
		}
	} else {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if p, err = placement.Parse(file, data); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := placement.Decide(c.w, p, c.n)
			if d.Verdict != c.verdict || d.Isolation != c.iso || d.DecidingRule != c.rule {
				t.Errorf("got %s %s by %q, want %s %s by %q\n%s", d.Verdict, d.Isolation, d.DecidingRule, c.verdict, c.iso, c.rule, d.Explanation)
			}
		})
	}
}

func TestDefaultPolicyDecisions(t *testing.T) {
	img := "docker.io/library/busybox:latest"
	checkExamples(t, "", []example{
		{"plain workload", placement.Workload{Image: img}, node, placement.VerdictAllow, placement.IsolationContainer, "default"},
		{"privileged", placement.Workload{Image: img, Privileged: true}, node, placement.VerdictAllow, placement.IsolationVM, "privileged-to-vm"},
		{"untrusted", placement.Workload{Image: img, Labels: map[string]string{"trust": "untrusted"}}, node, placement.VerdictAllow, placement.IsolationVM, "untrusted-to-vm"},
		{"untrusted asks for container", placement.Workload{Image: img, Labels: map[string]string{"trust": "untrusted"}, Isolation: placement.IsolationContainer}, node, placement.VerdictRefused, placement.IsolationVM, "untrusted-to-vm"},
		{"privileged without hypervisor", placement.Workload{Image: img, Privileged: true}, placement.NodeFacts{ContainerAvailable: true, VMReason: "no /dev/kvm"}, placement.VerdictUnschedulable, placement.IsolationVM, "privileged-to-vm"},
	})
}

func TestMultiTenantExample(t *testing.T) {
	img := "registry.internal.example/ci/runner:2"
	tenant := func(t string, extra ...string) map[string]string {
		l := map[string]string{"tenant": t}
		for i := 0; i+1 < len(extra); i += 2 {
			l[extra[i]] = extra[i+1]
		}
		return l
	}
	checkExamples(t, "../configs/examples/multi-tenant.yaml", []example{
		{"no tenant", placement.Workload{Image: img}, node, placement.VerdictDeny, placement.IsolationVM, "require-tenant"},
		{"customer tenant", placement.Workload{Image: img, Labels: tenant("acme")}, node, placement.VerdictAllow, placement.IsolationVM, "default"},
		{"internal tenant", placement.Workload{Image: img, Labels: tenant("ci")}, node, placement.VerdictAllow, placement.IsolationContainer, "internal-tenants-as-containers"},
		{"internal but big", placement.Workload{Image: img, Labels: tenant("ci"), Resources: placement.Resources{CPU: 16}}, node, placement.VerdictAllow, placement.IsolationVM, "big-to-vm"},
		{"internal sandbox", placement.Workload{Image: img, Labels: tenant("platform", "sandbox", "true")}, node, placement.VerdictAllow, placement.IsolationVM, "tenant-requested-vm"},
	})
}

func TestUntrustedRegistriesExample(t *testing.T) {
	checkExamples(t, "../configs/examples/untrusted-registries.yaml", []example{
		{"blocked", placement.Workload{Image: "cdn.evil.example/x/y:1"}, node, placement.VerdictDeny, placement.IsolationVM, "blocked-registries"},
		{"ours", placement.Workload{Image: "registry.internal.example/team/app:1"}, node, placement.VerdictAllow, placement.IsolationContainer, "our-registry"},
		{"official", placement.Workload{Image: "docker.io/library/nginx:1.27"}, node, placement.VerdictAllow, placement.IsolationContainer, "docker-official"},
		{"anyone's", placement.Workload{Image: "docker.io/someone/tool:latest"}, node, placement.VerdictAllow, placement.IsolationVM, "default"},
		{"ours privileged unpinned", placement.Workload{Image: "registry.internal.example/team/app:1", Privileged: true}, node, placement.VerdictAllow, placement.IsolationVM, "unpinned-privileged-to-vm"},
		{"ours privileged pinned", placement.Workload{Image: "registry.internal.example/team/app@sha256:abc", Privileged: true}, node, placement.VerdictAllow, placement.IsolationContainer, "our-registry"},
		{"official privileged pinned", placement.Workload{Image: "docker.io/library/nginx@sha256:abc", Privileged: true}, node, placement.VerdictAllow, placement.IsolationVM, "foreign-privileged-to-vm"},
	})
}

func TestRegulatedExample(t *testing.T) {
	audited := "registry.audited.example/payments/api:7"
	pci := map[string]string{"compliance": "pci"}
	certified := placement.NodeFacts{ContainerAvailable: true, VMAvailable: true, Accel: "kvm", Labels: map[string]string{"certified": "pci,hipaa"}}
	tcg := certified
	tcg.Accel = "tcg"
	checkExamples(t, "../configs/examples/regulated.yaml", []example{
		{"unlisted image", placement.Workload{Image: "docker.io/library/busybox:latest"}, certified, placement.VerdictDeny, placement.IsolationContainer, "default"},
		{"audited image", placement.Workload{Image: audited}, certified, placement.VerdictAllow, placement.IsolationContainer, "audited-images"},
		{"regulated on certified node", placement.Workload{Image: audited, Labels: pci}, certified, placement.VerdictAllow, placement.IsolationVM, "regulated-to-vm"},
		{"regulated on uncertified node", placement.Workload{Image: audited, Labels: pci}, node, placement.VerdictDeny, placement.IsolationVM, "regulated-on-certified-nodes"},
		{"regulated from elsewhere", placement.Workload{Image: "docker.io/library/busybox:latest", Labels: pci}, certified, placement.VerdictDeny, placement.IsolationVM, "regulated-image-source"},
		{"regulated under tcg", placement.Workload{Image: audited, Labels: pci}, tcg, placement.VerdictDeny, placement.IsolationVM, "regulated-needs-kvm"},
		{"privileged", placement.Workload{Image: audited, Privileged: true}, certified, placement.VerdictDeny, placement.IsolationContainer, "no-privileged"},
	})
}
