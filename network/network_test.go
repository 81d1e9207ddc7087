package network

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/berthd/berth/api"
)

func requireRootCNI(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("network tests need root (namespaces, bridges, iptables); run `make test` as root")
	}
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		t.Skip("CNI plugins are not installed; `make test` installs containernetworking-plugins")
	}
}

// testManager uses its own bridge and subnet so it never meets the
// agent's network or other tests'.
func testManager(t *testing.T, bridge, subnet string) *Manager {
	t.Helper()
	m, err := New(Config{Name: "berth-test-" + bridge, Bridge: bridge, Subnet: subnet, DataDir: t.TempDir(), DNS: []string{"10.0.0.53"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", bridge).Run() })
	return m
}

func iptablesSave(t *testing.T) string {
	out, err := exec.Command("iptables-save").Output()
	if err != nil {
		t.Fatalf("iptables-save: %v", err)
	}
	return string(out)
}

func TestAttachDetachContainerAndVM(t *testing.T) {
	requireRootCNI(t)
	m := testManager(t, "bt-net0", "10.231.0.0/24")
	ctx := context.Background()
	ports := []api.PortMapping{{HostPort: 18081, ContainerPort: 80, Protocol: "tcp"}}

	ctr, err := m.Attach(ctx, "nt-ctr", KindNetns, ports)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Detach(context.Background(), "nt-ctr"); m.Detach(context.Background(), "nt-vm") })
	vm, err := m.Attach(ctx, "nt-vm", KindTap, []api.PortMapping{{HostPort: 18082, ContainerPort: 80, Protocol: "tcp"}})
	if err != nil {
		t.Fatal(err)
	}
	subnet := netip.MustParsePrefix("10.231.0.0/24")
	for _, a := range []*Attachment{ctr, vm} {
		if !subnet.Contains(a.Address.Addr()) || a.Address.Bits() != 24 || a.Gateway.String() != "10.231.0.1" {
			t.Errorf("%s: address %v gateway %v", a.ID, a.Address, a.Gateway)
		}
	}
	if ctr.Address.Addr() == vm.Address.Addr() {
		t.Errorf("container and VM share %v", ctr.Address)
	}
	// The container's namespace has lo up and eth0 with its address.
	out, err := exec.Command("nsenter", "--net="+ctr.Netns, "ip", "-o", "addr").CombinedOutput()
	if err != nil {
		t.Fatalf("nsenter: %v %s", err, out)
	}
	if !strings.Contains(string(out), "lo    inet 127.0.0.1") || !strings.Contains(string(out), "eth0    inet "+ctr.Address.String()) {
		t.Errorf("container namespace:\n%s", out)
	}
	rules := iptablesSave(t)
	for _, want := range []string{"--dport 18081", "--dport 18082", ctr.Address.Addr().String(), vm.Address.Addr().String()} {
		if !strings.Contains(rules, want) {
			t.Errorf("iptables has no rule with %q", want)
		}
	}
	leases, _ := os.ReadDir(m.cfg.DataDir + "/ipam/" + m.cfg.Name)
	if len(leases) < 2 {
		t.Errorf("%d IPAM files, want a lease for each", len(leases))
	}

	for _, id := range []string{"nt-ctr", "nt-vm"} {
		if err := m.Detach(ctx, id); err != nil {
			t.Fatalf("detach %s: %v", id, err)
		}
		if err := m.Detach(ctx, id); err != nil {
			t.Fatalf("second detach %s: %v", id, err)
		}
	}
	rules = iptablesSave(t)
	for _, gone := range []string{"--dport 18081", "--dport 18082", ctr.Address.Addr().String() + "/", vm.Address.Addr().String() + "/"} {
		if strings.Contains(rules, gone) {
			t.Errorf("iptables still mentions %q after detach", gone)
		}
	}
	if _, err := os.Stat(ctr.Netns); !os.IsNotExist(err) {
		t.Errorf("netns file left: %v", err)
	}
	leases, _ = os.ReadDir(m.cfg.DataDir + "/ipam/" + m.cfg.Name)
	for _, l := range leases {
		if strings.HasPrefix(l.Name(), "10.231.") {
			t.Errorf("lease %s left", l.Name())
		}
	}
	links, _ := exec.Command("ip", "-o", "link", "show", "master", "bt-net0").Output()
	if strings.TrimSpace(string(links)) != "" {
		t.Errorf("interfaces left on the bridge:\n%s", links)
	}
}
