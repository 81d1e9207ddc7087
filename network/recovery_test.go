package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/berthd/berth/api"
)

// crashed is what a test's crash point panics with.
type crashed struct{ point string }

// crashExec runs the CNI plugins and calls crash around each ADD, so an
// attach can be stopped between plugins ("cni:<plugin>" before one,
// "cni:<plugin>:done" after it).
type crashExec struct {
	invoke.Exec
	crash func(point string)
}

func (e crashExec) ExecPlugin(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	add := slices.Contains(environ, "CNI_COMMAND=ADD")
	if add {
		e.crash("cni:" + filepath.Base(path))
	}
	out, err := e.Exec.ExecPlugin(ctx, path, stdin, environ)
	if add && err == nil {
		e.crash("cni:" + filepath.Base(path) + ":done")
	}
	return out, err
}

// crashAttach runs Attach on m and stops it at point as a SIGKILL would:
// the panic unwinds Attach without any of its undo. It reports whether
// point was reached.
func crashAttach(m *Manager, point, id string, kind Kind, ports []api.PortMapping) (reached bool, err error) {
	m.crashAt = func(p string) {
		if p == point {
			panic(crashed{p})
		}
	}
	m.cni = libcni.NewCNIConfigWithCacheDir(m.cfg.PluginDirs, m.cacheDir(), crashExec{
		Exec:  &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}},
		crash: m.crash,
	})
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(crashed)
			if !ok {
				panic(r)
			}
			reached = c.point == point
		}
	}()
	_, err = m.Attach(context.Background(), id, kind, ports)
	return false, err
}

// leftovers lists what is left on the host and on disk of attachment id:
// its record, namespace file and mount, leases, CNI cache entry, iptables
// rules (its chains, comments, addresses, published ports) and any
// interface on bridge.
func leftovers(t *testing.T, m *Manager, id, bridge string, addrs []netip.Addr, hostPorts ...int) []string {
	t.Helper()
	var out []string
	if _, err := os.Lstat(m.recordPath(id)); err == nil {
		out = append(out, "record "+m.recordPath(id))
	}
	ns := filepath.Join(m.cfg.DataDir, "netns", id)
	if _, err := os.Lstat(ns); err == nil {
		out = append(out, "netns file "+ns)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mi), ns+" ") {
		out = append(out, "netns mount "+ns)
	}
	leaseDir := filepath.Join(m.cfg.DataDir, "ipam", m.cfg.Name)
	entries, _ := os.ReadDir(leaseDir)
	for _, e := range entries {
		data, _ := os.ReadFile(filepath.Join(leaseDir, e.Name()))
		if strings.HasPrefix(string(data), id+"\r\n") {
			out = append(out, "lease "+e.Name())
		}
	}
	cached, _ := filepath.Glob(filepath.Join(m.cfg.DataDir, "cache", "results", "*-"+id+"-*"))
	for _, c := range cached {
		out = append(out, "CNI cache "+c)
	}
	marks := []string{`id: \"` + id + `\"`, chainName(m.cfg.Name, id, ""), chainName(m.cfg.Name, id, "DN-")}
	for _, a := range addrs {
		marks = append(marks, a.String()+"/32", a.String()+":")
	}
	for _, p := range hostPorts {
		marks = append(marks, fmt.Sprintf("--dports %d ", p), fmt.Sprintf("--dport %d ", p))
	}
	for _, line := range strings.Split(iptablesSave(t), "\n") {
		for _, mark := range marks {
			if strings.Contains(line+" ", mark) {
				out = append(out, "iptables "+line)
				break
			}
		}
	}
	links, _ := exec.Command("ip", "-o", "link", "show", "master", bridge).Output()
	if s := strings.TrimSpace(string(links)); s != "" {
		out = append(out, "links on "+bridge+": "+s)
	}
	return out
}

// checkWorking verifies an attachment is usable: the namespace has eth0
// with the address, the published port has its DNAT rule, and id holds
// exactly one lease.
func checkWorking(t *testing.T, m *Manager, a *Attachment, hostPort int) {
	t.Helper()
	if a.State != StateAttached || !a.Address.IsValid() {
		t.Fatalf("attachment %+v is not complete", a)
	}
	if a.Kind == KindNetns {
		out, err := exec.Command("nsenter", "--net="+a.Netns, "ip", "-o", "addr").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "eth0    inet "+a.Address.String()) {
			t.Errorf("namespace of %s: %v\n%s", a.ID, err, out)
		}
	}
	rules := iptablesSave(t)
	if !strings.Contains(rules, fmt.Sprintf("--dports %d ", hostPort)) || !strings.Contains(rules, a.Address.Addr().String()+"/32") {
		t.Errorf("%s: no DNAT rule for port %d or no rule for %v", a.ID, hostPort, a.Address)
	}
	leases, err := m.leasesOf(m.cfg.Name, a.ID)
	if err != nil || len(leases) != 1 || leases[0] != a.Address.Addr() {
		t.Errorf("%s: leases %v (%v), want exactly %v", a.ID, leases, err, a.Address.Addr())
	}
}

// TestAttachAfterCrash stops Attach at every step, as a SIGKILL of the
// agent would, and then attaches the same id with a new manager over the
// same data dir (the restarted agent): it must work, reuse a complete
// attachment, and leave nothing once detached.
func TestAttachAfterCrash(t *testing.T) {
	requireRootCNI(t)
	const bridge = "bt-crash0"
	m0 := testManager(t, bridge, "10.232.0.0/24")
	cfg := m0.cfg
	ctx := context.Background()
	points := map[Kind][]string{
		KindNetns: {"recorded", "netns-file", "netns-pinned", "cni:bridge", "cni:bridge:done", "cni:portmap:done", "cni:firewall:done", "cni-added", "attached"},
		KindTap:   {"recorded", "cni:host-local:done", "cni:portmap:done", "cni:firewall:done", "cni-added", "attached"},
	}
	port := 18300
	for _, kind := range []Kind{KindNetns, KindTap} {
		for _, point := range points[kind] {
			port++
			id := fmt.Sprintf("crash-%s-%s", kind, strings.ReplaceAll(point, ":", "-"))
			ports := []api.PortMapping{{HostPort: port, ContainerPort: 80, Protocol: "tcp"}}
			t.Run(id, func(t *testing.T) {
				m1, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { m0.Detach(context.Background(), id) })
				reached, err := crashAttach(m1, point, id, kind, ports)
				if !reached {
					t.Fatalf("attach did not reach %s (err %v)", point, err)
				}
				var before netip.Addr
				if a, err := m1.Lookup(id); err != nil {
					t.Fatalf("no record after a crash at %s: %v", point, err)
				} else {
					before = a.Address.Addr()
				}

				m2, err := New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				a, err := m2.Attach(ctx, id, kind, ports)
				if err != nil {
					t.Fatalf("attach after a crash at %s: %v", point, err)
				}
				checkWorking(t, m2, a, port)
				if point == "attached" && a.Address.Addr() != before {
					t.Errorf("a complete, healthy attachment was made afresh: %v, was %v", a.Address, before)
				}
				addrs := []netip.Addr{a.Address.Addr()}
				if before.IsValid() {
					addrs = append(addrs, before)
				}
				if err := m2.Detach(ctx, id); err != nil {
					t.Fatalf("detach: %v", err)
				}
				if left := leftovers(t, m2, id, bridge, addrs, port); len(left) > 0 {
					t.Errorf("left after detach:\n%s", strings.Join(left, "\n"))
				}
			})
		}
	}
}

// TestDetachAfterCrash: a crash at any step, then a detach (the workload
// was deleted while the agent was down) leaves nothing, including what a
// partial CNI ADD made before libcni cached its result.
func TestDetachAfterCrash(t *testing.T) {
	requireRootCNI(t)
	const bridge = "bt-crash1"
	m0 := testManager(t, bridge, "10.233.0.0/24")
	ctx := context.Background()
	port := 18400
	for _, point := range []string{"recorded", "netns-file", "netns-pinned", "cni:bridge:done", "cni:portmap:done", "cni:firewall:done", "cni-added"} {
		port++
		id := "detach-" + strings.ReplaceAll(point, ":", "-")
		t.Run(id, func(t *testing.T) {
			m1, err := New(m0.cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { m0.Detach(context.Background(), id) })
			ports := []api.PortMapping{{HostPort: port, ContainerPort: 80, Protocol: "tcp"}}
			if reached, err := crashAttach(m1, point, id, KindNetns, ports); !reached {
				t.Fatalf("attach did not reach %s (err %v)", point, err)
			}
			leases, _ := m1.leasesOf(m1.cfg.Name, id)
			m2, err := New(m0.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := m2.Detach(ctx, id); err != nil {
				t.Fatalf("detach after a crash at %s: %v", point, err)
			}
			if left := leftovers(t, m2, id, bridge, leases, port); len(left) > 0 {
				t.Errorf("left after detach:\n%s", strings.Join(left, "\n"))
			}
		})
	}
}

// TestDetachCrashes stops Detach at each step of its teardown, as a
// SIGKILL would; a new manager's Detach finishes the job.
func TestDetachCrashes(t *testing.T) {
	requireRootCNI(t)
	const bridge = "bt-crash2"
	m0 := testManager(t, bridge, "10.238.0.0/24")
	ctx := context.Background()
	port := 18900
	for _, kind := range []Kind{KindNetns, KindTap} {
		for _, point := range []string{"teardown:cni-del", "teardown:rules", "teardown:done"} {
			port++
			id := fmt.Sprintf("crash-%s-%s", kind, strings.ReplaceAll(point, ":", "-"))
			t.Run(id, func(t *testing.T) {
				t.Cleanup(func() { m0.Detach(context.Background(), id) })
				ports := []api.PortMapping{{HostPort: port, ContainerPort: 80, Protocol: "tcp"}}
				a, err := m0.Attach(ctx, id, kind, ports)
				if err != nil {
					t.Fatal(err)
				}
				m1, err := New(m0.cfg)
				if err != nil {
					t.Fatal(err)
				}
				if !crashDetach(m1, point, id) {
					t.Fatalf("detach did not reach %s", point)
				}
				m2, err := New(m0.cfg)
				if err != nil {
					t.Fatal(err)
				}
				if err := m2.Detach(ctx, id); err != nil {
					t.Fatalf("detach after a crash at %s: %v", point, err)
				}
				if left := leftovers(t, m2, id, bridge, []netip.Addr{a.Address.Addr()}, port); len(left) > 0 {
					t.Errorf("left after detach:\n%s", strings.Join(left, "\n"))
				}
			})
		}
	}
}

// crashDetach runs Detach on m and stops it at point; it reports whether
// point was reached.
func crashDetach(m *Manager, point, id string) (reached bool) {
	m.crashAt = func(p string) {
		if p == point {
			panic(crashed{p})
		}
	}
	defer func() {
		if r := recover(); r != nil {
			c, ok := r.(crashed)
			if !ok {
				panic(r)
			}
			reached = c.point == point
		}
	}()
	m.Detach(context.Background(), id)
	return false
}

// TestDetachAfterReboot: after a host reboot the namespace file is a plain
// file, the veth and the rules are gone, the lease and the cache stay.
// Detach must succeed and leave nothing; attach must work again, straight
// over the rebooted attachment too.
func TestDetachAfterReboot(t *testing.T) {
	requireRootCNI(t)
	const bridge = "bt-reboot0"
	m := testManager(t, bridge, "10.234.0.0/24")
	ctx := context.Background()
	ids := map[string]Kind{"reboot-ctr": KindNetns, "reboot-vm": KindTap}
	ports := map[string]int{"reboot-ctr": 18501, "reboot-vm": 18502}
	t.Cleanup(func() {
		for id := range ids {
			m.Detach(context.Background(), id)
		}
	})
	attachAll := func() map[string]*Attachment {
		t.Helper()
		out := map[string]*Attachment{}
		for id, kind := range ids {
			a, err := m.Attach(ctx, id, kind, []api.PortMapping{{HostPort: ports[id], ContainerPort: 80, Protocol: "tcp"}})
			if err != nil {
				t.Fatalf("attach %s: %v", id, err)
			}
			checkWorking(t, m, a, ports[id])
			out[id] = a
		}
		return out
	}
	reboot := func(atts map[string]*Attachment) {
		t.Helper()
		for id, a := range atts {
			if err := m.SimulateReboot(id); err != nil {
				t.Fatal(err)
			}
			if a.Kind == KindNetns {
				if _, err := os.Stat(a.Netns); err != nil || isNetns(a.Netns) {
					t.Fatalf("after the reboot %s should be a plain file: %v", a.Netns, err)
				}
			}
			if l, _ := m.leasesOf(m.cfg.Name, id); len(l) != 1 {
				t.Fatalf("after the reboot the lease of %s should stay: %v", id, l)
			}
			if strings.Contains(iptablesSave(t), a.Address.Addr().String()+"/32") {
				t.Fatalf("after the reboot no rule should name %v", a.Address)
			}
		}
	}
	assertClean := func(atts map[string]*Attachment) {
		t.Helper()
		for id, a := range atts {
			if left := leftovers(t, m, id, bridge, []netip.Addr{a.Address.Addr()}, ports[id]); len(left) > 0 {
				t.Errorf("left of %s after detach:\n%s", id, strings.Join(left, "\n"))
			}
		}
	}

	atts := attachAll()
	reboot(atts)
	for id := range ids {
		if err := m.Detach(ctx, id); err != nil {
			t.Fatalf("detach %s after a reboot: %v", id, err)
		}
	}
	assertClean(atts)

	// After a reboot the agent restarts its workloads: attach straight
	// over what the reboot left.
	atts = attachAll()
	reboot(atts)
	again := attachAll()
	for id := range ids {
		if err := m.Detach(ctx, id); err != nil {
			t.Fatalf("detach %s: %v", id, err)
		}
	}
	assertClean(atts)
	assertClean(again)
}

// TestDetachIsIdempotent: detaching twice, an unknown id or an invalid one
// is nil; a detach survives its namespace file and veth being gone.
func TestDetachIsIdempotent(t *testing.T) {
	requireRootCNI(t)
	const bridge = "bt-idem0"
	m := testManager(t, bridge, "10.235.0.0/24")
	ctx := context.Background()
	for _, id := range []string{"never-attached", "../etc", ""} {
		if err := m.Detach(ctx, id); err != nil {
			t.Errorf("detach %q: %v", id, err)
		}
	}
	a, err := m.Attach(ctx, "idem", KindNetns, []api.PortMapping{{HostPort: 18601, ContainerPort: 80}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Detach(context.Background(), "idem") })
	// Attaching again while attached returns the same attachment.
	b, err := m.Attach(ctx, "idem", KindNetns, []api.PortMapping{{HostPort: 18601, ContainerPort: 80}})
	if err != nil || b.Address != a.Address {
		t.Fatalf("second attach: %v, %v (first %v)", b, err, a.Address)
	}
	// The namespace file goes behind berth's back (and with it the veth).
	if err := removeNetns(a.Netns); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		if err := m.Detach(ctx, "idem"); err != nil {
			t.Fatalf("detach %d: %v", i+1, err)
		}
	}
	if left := leftovers(t, m, "idem", bridge, []netip.Addr{a.Address.Addr()}, 18601); len(left) > 0 {
		t.Errorf("left after detach:\n%s", strings.Join(left, "\n"))
	}
	if _, err := m.Lookup("idem"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("record after detach: %v", err)
	}
}

// TestDetachFailureReportedOnce: a detach that keeps failing for the same
// reason says so (ErrRepeatedFailure), so the agent's reconciliation
// reports it once; once the cause is gone, the detach succeeds.
func TestDetachFailureReportedOnce(t *testing.T) {
	requireRootCNI(t)
	m := testManager(t, "bt-fail0", "10.236.0.0/24")
	ctx := context.Background()
	// A namespace path that cannot be removed: a non-empty directory.
	ns := filepath.Join(m.cfg.DataDir, "netns", "stuck")
	if err := os.MkdirAll(ns, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ns, "x"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	rec := `{"id":"stuck","kind":"netns","state":"attached","netns":"` + ns + `","bridge":"bt-fail0"}`
	if err := os.WriteFile(m.recordPath("stuck"), []byte(rec), 0o600); err != nil {
		t.Fatal(err)
	}
	err := m.Detach(ctx, "stuck")
	if err == nil || errors.Is(err, ErrRepeatedFailure) || !strings.Contains(err.Error(), "directory not empty") {
		t.Fatalf("first detach: %v, want a new failure naming its reason", err)
	}
	if err := m.Detach(ctx, "stuck"); !errors.Is(err, ErrRepeatedFailure) || !strings.Contains(err.Error(), "directory not empty") {
		t.Fatalf("second detach: %v, want the same failure, marked repeated", err)
	}
	if a, err := m.Lookup("stuck"); err != nil || !strings.Contains(a.DetachError, "directory not empty") {
		t.Fatalf("record after failing detaches: %+v, %v", a, err)
	}
	os.Remove(filepath.Join(ns, "x"))
	if err := m.Detach(ctx, "stuck"); err != nil {
		t.Fatalf("detach once the cause is gone: %v", err)
	}
	if ids, _ := m.List(); len(ids) > 0 {
		t.Errorf("records left: %v", ids)
	}
}

// TestDetachUnused: the check runs under the attachment's lock and a
// positive answer leaves the attachment alone.
func TestDetachUnused(t *testing.T) {
	requireRootCNI(t)
	m := testManager(t, "bt-unused0", "10.239.0.0/24")
	ctx := context.Background()
	a, err := m.Attach(ctx, "unused", KindTap, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Detach(context.Background(), "unused") })
	if done, err := m.DetachUnused(ctx, "unused", func() bool { return true }); done || err != nil {
		t.Fatalf("in use: detached %v, %v", done, err)
	}
	if b, err := m.Lookup("unused"); err != nil || b.Address != a.Address {
		t.Fatalf("an attachment in use was touched: %+v, %v", b, err)
	}
	if done, err := m.DetachUnused(ctx, "unused", func() bool { return false }); !done || err != nil {
		t.Fatalf("unused: detached %v, %v", done, err)
	}
	if done, err := m.DetachUnused(ctx, "unused", func() bool { return false }); done || err != nil {
		t.Fatalf("already gone: detached %v, %v", done, err)
	}
	if left := leftovers(t, m, "unused", "bt-unused0", []netip.Addr{a.Address.Addr()}); len(left) > 0 {
		t.Errorf("left after detach:\n%s", strings.Join(left, "\n"))
	}
}
