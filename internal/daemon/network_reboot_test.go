package daemon_test

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/network"
)

// TestNetworkAfterReboot: a workload whose network a host reboot took (the
// namespace's bind mount, the veth and the iptables rules gone; the
// attachment record, the namespace file and the lease left on disk) is
// deleted without error and leaves nothing; its host port and address
// serve the next workload.
func TestNetworkAfterReboot(t *testing.T) {
	requireCNI(t)
	n := startNetAgent(t, false)
	ctx := context.Background()
	web := n.running(httpd("before", api.IsolationContainer, n.portBase))
	if got := get(t, fmt.Sprintf("http://127.0.0.1:%d/", n.portBase), 20*time.Second); got != "hello-from-before" {
		t.Fatalf("on the published port: %q", got)
	}

	// A manager over the agent's network data dir, as the agent's own is.
	m, err := network.New(network.Config{
		Name: n.cfg.Network.Name, Bridge: n.cfg.Network.Bridge, Subnet: n.cfg.Network.Subnet,
		DNS: n.cfg.Network.DNS, PluginDirs: n.cfg.Network.PluginDirs, DataDir: filepath.Join(n.cfg.DataDir, "network"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.SimulateReboot(web.ID); err != nil {
		t.Fatal(err)
	}
	if tr := n.traces(); len(tr) != 1 || !strings.HasPrefix(tr[0], "lease: "+web.Network.Address) {
		t.Fatalf("after the simulated reboot only the lease should be left, got:\n%s", strings.Join(tr, "\n"))
	}

	if err := n.c.Delete(ctx, web.ID, true); err != nil {
		t.Fatalf("delete after the reboot: %v", err)
	}
	if tr := n.traces(); len(tr) > 0 {
		t.Errorf("left after the delete:\n%s", strings.Join(tr, "\n"))
	}
	if ids, err := m.List(); err != nil || len(ids) > 0 {
		t.Errorf("attachment records left: %v %v", ids, err)
	}

	// The port (and the pool) are free for the next workload.
	n.running(httpd("after", api.IsolationContainer, n.portBase))
	if got := get(t, fmt.Sprintf("http://127.0.0.1:%d/", n.portBase), 20*time.Second); got != "hello-from-after" {
		t.Errorf("on the published port after the reboot: %q", got)
	}
	deleteAll(t, n.c)
	if tr := n.traces(); len(tr) > 0 {
		t.Errorf("left after deleting everything:\n%s", strings.Join(tr, "\n"))
	}
}
