package placement

import "testing"

// A rule matching host_paths sends a workload mounting a host directory
// to a VM (or denies it), and leaves one without alone.
func TestHostPathsMatch(t *testing.T) {
	pol, err := Parse("test.yaml", []byte(`
apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: host-paths-to-vm
    match: {host_paths: true}
    isolation: vm
`))
	if err != nil {
		t.Fatal(err)
	}
	node := NodeFacts{ContainerAvailable: true, VMAvailable: true}
	d := Decide(Workload{Image: "x", HostPaths: []string{"/srv/shared"}}, pol, node)
	if d.Isolation != IsolationVM || d.DecidingRule != "host-paths-to-vm" {
		t.Errorf("with a host path: %s by %q, want vm by host-paths-to-vm", d.Isolation, d.DecidingRule)
	}
	d = Decide(Workload{Image: "x"}, pol, node)
	if d.Isolation != IsolationContainer {
		t.Errorf("without: %s, want container", d.Isolation)
	}
	if _, err := Parse("bad.yaml", []byte("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\nrules:\n  - name: r\n    match: {host_paths: yes please}\n    isolation: vm\n")); err == nil {
		t.Error("host_paths: a string parsed")
	}
}

// CEL sees the host paths: a rule can deny one directory and let others
// through.
func TestHostPathsCEL(t *testing.T) {
	pol, err := Parse("test.yaml", []byte(`apiVersion: berth.dev/v1
kind: IsolationPolicy
default: container
rules:
  - name: no-srv-secret
    when: workload.host_paths.exists(p, p.startsWith("/srv/secret"))
    action: deny
  - name: any-host-path-to-vm
    when: size(workload.host_paths) > 0
    isolation: vm
`))
	if err != nil {
		t.Fatal(err)
	}
	node := NodeFacts{ContainerAvailable: true, VMAvailable: true}
	for _, c := range []struct {
		paths []string
		want  Verdict
		iso   Isolation
	}{
		{nil, VerdictAllow, IsolationContainer},
		{[]string{"/srv/shared"}, VerdictAllow, IsolationVM},
		{[]string{"/srv/shared", "/srv/secret/keys"}, VerdictDeny, ""},
	} {
		d := Decide(Workload{Image: "x", HostPaths: c.paths}, pol, node)
		if d.Verdict != c.want || (c.iso != "" && d.Isolation != c.iso) {
			t.Errorf("%v: %s %s, want %s %s", c.paths, d.Verdict, d.Isolation, c.want, c.iso)
		}
	}
}
