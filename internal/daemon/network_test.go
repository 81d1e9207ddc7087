package daemon_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
)

// netTest is an agent on a bridge and subnet of its own.
type netTest struct {
	t        *testing.T
	c        *client.Client
	cfg      *config.Config
	bridge   string
	portBase int
}

func requireCNI(t *testing.T) {
	t.Helper()
	requireRunc(t)
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		t.Skip("CNI plugins are not installed; `make test` installs containernetworking-plugins")
	}
}

func startNetAgent(t *testing.T, vm bool) *netTest {
	t.Helper()
	// Host ports below the kernel's ephemeral range (32768-60999), where a
	// client socket of another test cannot hold them.
	n := &netTest{t: t, bridge: fmt.Sprintf("bt%04x", rand.IntN(1<<16)), portBase: 20000 + rand.IntN(12000)}
	dataDir := vmDataDir(t)
	cfg := testConfig(t, dataDir, "127.0.0.1:0")
	cfg.Network.Enabled = true
	cfg.Network.Name = "berth-" + n.bridge
	cfg.Network.Bridge = n.bridge
	cfg.Network.Subnet = fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(256))
	cfg.Network.DNS = []string{"10.0.0.53"}
	if vm {
		withVMs(t, cfg)
	}
	n.cfg = cfg
	// Registered first, so it runs after the agent has stopped.
	t.Cleanup(func() { exec.Command("ip", "link", "del", n.bridge).Run() })
	n.c, _ = serve(t, cfg)
	importBusybox(t, n.c)
	return n
}

// httpd serves its name on port 8080 of the workload.
func httpd(name string, iso api.Isolation, hostPort int) api.WorkloadSpec {
	spec := sh(fmt.Sprintf("mkdir -p /srv && echo hello-from-%s > /srv/index.html && exec httpd -f -p 8080 -h /srv", name))
	spec.Isolation = iso
	if hostPort > 0 {
		spec.Ports = []api.PortMapping{{HostPort: hostPort, ContainerPort: 8080}}
	}
	return spec
}

// get fetches url a bounded number of times until it answers 200.
func get(t *testing.T, url string, within time.Duration) string {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(within)
	var last error
	for tries := 0; time.Now().Before(deadline); tries++ {
		resp, err := hc.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return strings.TrimSpace(string(body))
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		last = err
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("GET %s: no answer within %v: %v", url, within, last)
	return ""
}

func (n *netTest) running(spec api.WorkloadSpec) *api.Workload {
	n.t.Helper()
	w, err := n.c.Submit(context.Background(), spec)
	if err != nil {
		n.t.Fatal(err)
	}
	waitRunning(n.t, n.c, w.ID)
	w, _, err = n.c.Get(context.Background(), w.ID, nil)
	if err != nil {
		n.t.Fatal(err)
	}
	if w.Network == nil || w.Network.Address == "" {
		n.t.Fatalf("running workload %s has no address: %+v", w.ID, w.Network)
	}
	return w
}

// traces lists what the network leaves on the host: interfaces on the
// bridge, iptables rules naming the subnet or the test's ports, and IPAM
// leases.
func (n *netTest) traces() []string {
	var out []string
	links, _ := exec.Command("ip", "-o", "link", "show", "master", n.bridge).Output()
	for _, l := range strings.Split(strings.TrimSpace(string(links)), "\n") {
		if l != "" {
			out = append(out, "link: "+l)
		}
	}
	prefix := strings.TrimSuffix(n.cfg.Network.Subnet, "0/24")
	rules, _ := exec.Command("iptables-save").Output()
	for _, l := range strings.Split(string(rules), "\n") {
		if strings.Contains(l, prefix) || strings.Contains(l, fmt.Sprintf("--dport %d", n.portBase)) || strings.Contains(l, fmt.Sprintf("--dport %d", n.portBase+1)) {
			out = append(out, "rule: "+l)
		}
	}
	leases, _ := os.ReadDir(filepath.Join(n.cfg.DataDir, "network", "ipam", n.cfg.Network.Name))
	for _, l := range leases {
		if strings.HasPrefix(l.Name(), prefix) {
			out = append(out, "lease: "+l.Name())
		}
	}
	return out
}

func TestContainerNetwork(t *testing.T) {
	requireCNI(t)
	n := startNetAgent(t, false)
	ctx := context.Background()
	if tr := n.traces(); len(tr) > 0 {
		t.Fatalf("traces before the test:\n%s", strings.Join(tr, "\n"))
	}

	web := n.running(httpd("ctr", api.IsolationContainer, n.portBase))
	if got := get(t, "http://"+web.Network.Address+":8080/", 20*time.Second); got != "hello-from-ctr" {
		t.Errorf("on its address: %q", got)
	}
	if got := get(t, fmt.Sprintf("http://127.0.0.1:%d/", n.portBase), 10*time.Second); got != "hello-from-ctr" {
		t.Errorf("on the published port on loopback: %q", got)
	}
	gw := web.Network.Gateway
	if got := get(t, fmt.Sprintf("http://%s:%d/", gw, n.portBase), 10*time.Second); got != "hello-from-ctr" {
		t.Errorf("on the published port on the host's bridge address: %q", got)
	}

	// A second workload may not take the same host port.
	_, err := n.c.Submit(ctx, httpd("again", api.IsolationContainer, n.portBase))
	if !client.IsReason(err, api.ReasonConflict) || !strings.Contains(err.Error(), fmt.Sprint(n.portBase)) {
		t.Errorf("second submit on port %d: %v, want a conflict naming the port", n.portBase, err)
	}

	// Another container reaches the first by address; its resolv.conf is
	// the network's.
	w, out, _ := run(t, n.c, sh("wget -q -O - http://"+web.Network.Address+":8080/ && cat /etc/resolv.conf"))
	if exitCode(w) != 0 || !strings.Contains(out, "hello-from-ctr") || !strings.Contains(out, "nameserver 10.0.0.53") {
		t.Errorf("container to container: exit %d, %q", exitCode(w), out)
	}

	// none: loopback only.
	none := sh("cat /proc/net/dev")
	none.Network = api.NetworkNone
	w, out, _ = run(t, n.c, none)
	if exitCode(w) != 0 || !strings.Contains(out, "lo:") || strings.Contains(out, "eth0") || w.Network == nil || w.Network.Mode != api.NetworkNone {
		t.Errorf("network none: exit %d, %+v\n%s", exitCode(w), w.Network, out)
	}

	// After deleting everything nothing is left.
	if len(n.traces()) == 0 {
		t.Fatal("a running published workload should leave traces to look for; the check is blind")
	}
	deleteAll(t, n.c)
	if tr := n.traces(); len(tr) > 0 {
		t.Errorf("left after deleting everything:\n%s", strings.Join(tr, "\n"))
	}
}

// TestVMNetwork: a web server placed in a VM is reached exactly like one
// in a container: on its address on the bridge and on a published port;
// the container and the VM reach each other; nothing is left afterwards.
func TestVMNetwork(t *testing.T) {
	requireCNI(t)
	requireLibvirt(t)
	n := startNetAgent(t, true)
	if tr := n.traces(); len(tr) > 0 {
		t.Fatalf("traces before the test:\n%s", strings.Join(tr, "\n"))
	}
	vm := n.running(httpd("vm", api.IsolationVM, n.portBase+1))
	if vm.Isolation != api.IsolationVM {
		t.Fatalf("placed on %s", vm.Isolation)
	}
	ctr := n.running(httpd("ctr", api.IsolationContainer, 0))

	// The guest boots under emulation: give it time to bring httpd up.
	if got := get(t, "http://"+vm.Network.Address+":8080/", 4*time.Minute); got != "hello-from-vm" {
		t.Errorf("VM on its address: %q", got)
	}
	if got := get(t, fmt.Sprintf("http://127.0.0.1:%d/", n.portBase+1), 30*time.Second); got != "hello-from-vm" {
		t.Errorf("VM on the published port on loopback: %q", got)
	}
	if got := get(t, "http://"+ctr.Network.Address+":8080/", 30*time.Second); got != "hello-from-ctr" {
		t.Errorf("container on its address: %q", got)
	}

	// Container to VM, and VM to container, by address.
	w, out, _ := run(t, n.c, sh("wget -q -O - http://"+vm.Network.Address+":8080/"))
	if exitCode(w) != 0 || strings.TrimSpace(out) != "hello-from-vm" {
		t.Errorf("container to VM: exit %d, %q", exitCode(w), out)
	}
	toCtr := sh("wget -q -O - http://" + ctr.Network.Address + ":8080/ && cat /etc/resolv.conf")
	toCtr.Isolation = api.IsolationVM
	w, out, errs := run(t, n.c, toCtr)
	if exitCode(w) != 0 || !strings.Contains(out, "hello-from-ctr") || !strings.Contains(out, "nameserver 10.0.0.53") {
		t.Errorf("VM to container: exit %d (%s), stdout %q, stderr %q", exitCode(w), w.Error, out, errs)
	}

	deleteAll(t, n.c)
	// libvirt removes a domain's tap when the domain ends.
	deadline := time.Now().Add(30 * time.Second)
	for {
		tr := n.traces()
		if len(tr) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("left after deleting everything:\n%s", strings.Join(tr, "\n"))
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
}
