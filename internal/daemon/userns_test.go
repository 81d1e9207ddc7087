package daemon_test

// Containers in user namespaces (issue 15, item 7), through the agent:
// the escapes fail there too, the container's root is an unprivileged
// host uid, root still serves port 80 on the node network, and node
// status says whether user namespaces are on and why not.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/supervisor"
)

// containerDetails is the container driver's details in node status.
func containerDetails(t *testing.T, c *client.Client) map[string]string {
	t.Helper()
	n, _, err := c.Node(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	d, ok := n.Drivers[string(api.IsolationContainer)]
	if !ok {
		t.Fatalf("node status has no container driver: %+v", n.Drivers)
	}
	return d.Details
}

// requireUserNS fails unless the agent's containers run in user
// namespaces; it skips only where the kernel lacks what they need.
func requireUserNS(t *testing.T, c *client.Client) {
	t.Helper()
	d := containerDetails(t, c)
	if d["userns"] == "on" {
		return
	}
	if strings.Contains(d["userns_reason"], "the kernel cannot") {
		t.Skipf("user namespaces are off on this machine: %s", d["userns_reason"])
	}
	t.Fatalf("user namespaces are off: %s", d["userns_reason"])
}

// startUserNSAgent runs an agent with the default container.userns (auto)
// on a data dir other users may pass through, as /var/lib/berth is.
func startUserNSAgent(t *testing.T) (*client.Client, string) {
	t.Helper()
	requireRunc(t)
	dataDir := filepath.Join(vmDataDir(t), "data")
	c, _ := serve(t, testConfig(t, dataDir, "127.0.0.1:0"))
	importBusybox(t, c)
	requireUserNS(t, c)
	return c, dataDir
}

func TestContainerEscapesFailUserNS(t *testing.T) {
	c, _ := startUserNSAgent(t)
	importProbe(t, c)
	escapeTests(t, c)
}

// hostIDs reads the Uid: or Gid: line of /proc/PID/status.
func hostIDs(t *testing.T, pid int, key string) []uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 5 && f[0] == key {
			var ids []uint64
			for _, s := range f[1:] {
				n, _ := strconv.ParseUint(s, 10, 32)
				ids = append(ids, n)
			}
			return ids
		}
	}
	t.Fatalf("/proc/%d/status has no %s line", pid, key)
	return nil
}

// The container's uid 0 is an unprivileged host uid (/proc/PID/status on
// the host), the files its root writes are that uid's on the host, two
// containers have distinct ids, and deleting them frees their ranges.
func TestUserNSContainerRootIsUnprivileged(t *testing.T) {
	c, dataDir := startUserNSAgent(t)
	ctx := context.Background()
	const base = 1 << 30 // container.userns.base's default
	var uids []uint64
	for i := range 2 {
		w, err := c.Submit(ctx, sh("id -u > /written-by-root; echo ready; sleep 1000"))
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, w.ID)
		task := filepath.Join(dataDir, "containers", "tasks", w.ID)
		st, err := supervisor.Status(task)
		if err != nil || st.Pid == 0 {
			t.Fatalf("container %d: status %+v, %v", i, st, err)
		}
		uid, gid := hostIDs(t, st.Pid, "Uid:"), hostIDs(t, st.Pid, "Gid:")
		for _, id := range append(uid, gid...) {
			if id < base {
				t.Errorf("container %d's root runs as host uids %v gids %v: not from the unprivileged ranges (>= %d)", i, uid, gid, base)
				break
			}
		}
		uids = append(uids, uid[0])
		deadline := time.Now().Add(10 * time.Second)
		for out, _ := logs(t, c, w.ID); !strings.Contains(out, "ready") && time.Now().Before(deadline); out, _ = logs(t, c, w.ID) {
			time.Sleep(50 * time.Millisecond)
		}
		var fst syscall.Stat_t
		// The writable layer is on the workload's own filesystem (its
		// disk budget, workload_defaults.disk_mb), mounted at scratch/ in
		// the layer's directory on the data disk.
		layer := filepath.Join(dataDir, "containers", "layers", w.ID)
		if err := syscall.Stat(filepath.Join(layer, "scratch", "upper", "written-by-root"), &fst); err != nil {
			t.Fatal(err)
		}
		if uint64(fst.Uid) != uid[0] || fst.Uid == 0 {
			t.Errorf("a file the container's root wrote is owned by host uid %d, want %d", fst.Uid, uid[0])
		}
	}
	if uids[0] == uids[1] {
		t.Errorf("two containers run as the same host uid %d", uids[0])
	}
	deleteAll(t, c)
	entries, _ := os.ReadDir(filepath.Join(dataDir, "userns"))
	for _, e := range entries {
		if e.Name() != ".lock" {
			t.Errorf("left after deleting every workload: userns/%s", e.Name())
		}
	}
}

// Root in a container on the node network serves port 80 in its own
// network namespace, reached on its address and a published port.
func TestUserNSBindsPort80(t *testing.T) {
	requireCNI(t)
	n := startNetAgent(t, false)
	requireUserNS(t, n.c)
	spec := sh("mkdir -p /srv && echo hello-from-root > /srv/index.html && exec httpd -f -p 80 -h /srv")
	spec.Ports = []api.PortMapping{{HostPort: n.portBase, ContainerPort: 80}}
	w := n.running(spec)
	if got := get(t, "http://"+w.Network.Address+":80/", 20*time.Second); got != "hello-from-root" {
		t.Errorf("on its address: %q", got)
	}
	if got := get(t, fmt.Sprintf("http://127.0.0.1:%d/", n.portBase), 10*time.Second); got != "hello-from-root" {
		t.Errorf("on the published port: %q", got)
	}
	deleteAll(t, n.c)
	if tr := n.traces(); len(tr) > 0 {
		t.Errorf("left after deleting everything:\n%s", strings.Join(tr, "\n"))
	}
}

// Node status says whether user namespaces are on, and why not.
func TestUserNSNodeStatus(t *testing.T) {
	requireRunc(t)
	on, _ := startUserNSAgent(t)
	if d := containerDetails(t, on); !strings.Contains(d["userns_ids"], "16384 ranges of 65536") || d["userns_reason"] != "" {
		t.Errorf("on: %v", d)
	}
	for name, tc := range map[string]struct {
		dataDir string
		modify  func(*config.Config)
		reason  string
	}{
		"turned off":  {filepath.Join(vmDataDir(t), "data"), func(c *config.Config) { c.Container.UserNS.Mode = "off" }, "turned off by container.userns.mode: off"},
		"closed path": {t.TempDir(), nil, "does not let other users through"},
	} {
		cfg := testConfig(t, tc.dataDir, "127.0.0.1:0")
		cfg.ListenUnix = filepath.Join(t.TempDir(), "berth.sock")
		if tc.modify != nil {
			tc.modify(cfg)
		}
		c, _ := serve(t, cfg)
		d := containerDetails(t, c)
		if d["userns"] != "off" || !strings.Contains(d["userns_reason"], tc.reason) {
			t.Errorf("%s: details %v, want userns off with a reason containing %q", name, d, tc.reason)
		}
	}
}

// A bad container.userns key is refused, naming the key.
func TestUserNSConfigValidation(t *testing.T) {
	for _, tc := range []struct{ yaml, key string }{
		{"mode: on", "container.userns.mode"},
		{"range_size: 1000", "container.userns.range_size"},
		{"base: 0", "container.userns.base"},
		{"base: 4294000000", "container.userns.size"},
		{"size: 100", "container.userns.size"},
		{"subid_user: 'a:b'", "container.userns.subid_user"},
	} {
		file := filepath.Join(t.TempDir(), "berth.yaml")
		if err := os.WriteFile(file, []byte("container:\n  userns:\n    "+tc.yaml+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := config.Load(file, nil)
		if err == nil || !strings.Contains(err.Error(), tc.key+":") {
			t.Errorf("%s: %v, want an error naming %s", tc.yaml, err, tc.key)
		}
	}
	file := filepath.Join(t.TempDir(), "berth.yaml")
	os.WriteFile(file, []byte("container:\n  userns:\n    mode: off\n    subid_user: berth\n"), 0o600)
	if cfg, err := config.Load(file, nil); err != nil || cfg.Container.UserNS.Mode != "off" || cfg.Container.UserNS.RangeSize != 65536 {
		t.Errorf("a good userns config: %+v %v", cfg, err)
	}
}
