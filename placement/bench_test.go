package placement_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/placement"
)

// policy50 builds a 50-rule policy: 40 rules of plain match conditions of
// every kind and 10 with CEL expressions, the shape of a large real policy.
func policy50(tb testing.TB) *placement.Policy {
	tb.Helper()
	var b strings.Builder
	b.WriteString("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\nrules:\n")
	for i := range 40 {
		fmt.Fprintf(&b, "  - name: static-%d\n    match:\n", i)
		switch i % 5 {
		case 0:
			fmt.Fprintf(&b, "      labels: {team: team-%d, env: prod}\n", i)
		case 1:
			fmt.Fprintf(&b, "      images: [\"registry-%d.example/**\", \"docker.io/vendor-%d/*\"]\n", i, i)
		case 2:
			fmt.Fprintf(&b, "      tenants: [tenant-%d, tenant-%d]\n", i, i+100)
		case 3:
			fmt.Fprintf(&b, "      labels_exist: [feature-%d]\n      memory_mb_gt: %d\n", i, 1024*i)
		case 4:
			fmt.Fprintf(&b, "      privileged: true\n      cpu_gt: %d\n", i)
		}
		b.WriteString("    isolation: vm\n")
	}
	for i := range 10 {
		fmt.Fprintf(&b, "  - name: cel-%d\n", i)
		switch i % 3 {
		case 0:
			fmt.Fprintf(&b, "    when: '\"team\" in workload.labels && workload.labels.team == \"cel-%d\" && node.accel == \"kvm\"'\n", i)
		case 1:
			fmt.Fprintf(&b, "    when: 'workload.resources.memory_mb > %d && workload.resources.cpu > 2.0'\n", 4096*i)
		case 2:
			fmt.Fprintf(&b, "    when: 'workload.image.startsWith(\"docker.io/cel-%d/\") || workload.tenant == \"cel-%d\"'\n", i, i)
		}
		b.WriteString("    isolation: vm\n")
	}
	p, err := placement.Parse("bench.yaml", []byte(b.String()))
	if err != nil {
		tb.Fatal(err)
	}
	if n := len(p.Rules()); n != 50 {
		tb.Fatalf("built %d rules", n)
	}
	return p
}

func BenchmarkDecide(b *testing.B) {
	node := placement.NodeFacts{ContainerAvailable: true, VMAvailable: true, Accel: "kvm"}
	w := placement.Workload{
		Name:      "web",
		Image:     "docker.io/library/nginx:1.27",
		Labels:    map[string]string{"tenant": "acme", "team": "web", "env": "prod"},
		Resources: placement.Resources{CPU: 4, MemoryMB: 8192, Pids: 512},
	}
	def, err := placement.Parse("policy.yaml", configs.DefaultPolicy)
	if err != nil {
		b.Fatal(err)
	}
	big := policy50(b)
	// In the 50-rule policy this workload matches one CEL rule (cel-1 and
	// cel-4: memory and cpu), so the trace and explanation are built too.
	if d := placement.Decide(w, big, node); len(d.Matched) == 0 {
		b.Fatalf("benchmark workload matches nothing: %s", d.Explanation)
	}
	for _, bc := range []struct {
		name string
		p    *placement.Policy
	}{{"default", def}, {"50rules", big}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				placement.Decide(w, bc.p, node)
			}
		})
	}
}

func BenchmarkParse(b *testing.B) {
	b.Run("default", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := placement.Parse("policy.yaml", configs.DefaultPolicy); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("50rules", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			policy50(b)
		}
	})
}
