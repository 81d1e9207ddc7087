package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	nomad "github.com/hashicorp/nomad/api"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/ociimage"
)

const testImage = "berth.test/busybox:latest"

type testEnv struct {
	nomadBin, berthBin, initBin, repo string
}

// requireEnv finds the binaries: `make test` builds bin/berth,
// bin/berth-init and Nomad (make nomad) and names Nomad in BERTH_NOMAD_BIN.
func requireEnv(t *testing.T) testEnv {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a Nomad cluster and boots VMs: not in -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("Nomad clients and berth agents need root")
	}
	repo, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	env := testEnv{
		nomadBin: os.Getenv("BERTH_NOMAD_BIN"),
		berthBin: filepath.Join(repo, "bin/berth"),
		initBin:  filepath.Join(repo, "bin/berth-init"),
		repo:     repo,
	}
	if env.nomadBin == "" {
		t.Skip("BERTH_NOMAD_BIN is not set; `make test` (or `make nomad`) builds Nomad and sets it")
	}
	for _, f := range []string{env.nomadBin, env.berthBin, env.initBin} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("%v; run `make build nomad`", err)
		}
	}
	for _, bin := range []string{"runc", "libvirtd"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is not installed; `make deps` installs it", bin)
		}
	}
	return env
}

// cleanEnv is the environment for Nomad: AWS_CA_BUNDLE makes the AWS
// fingerprinter hang on these machines.
func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "AWS_CA_BUNDLE=") && !strings.HasPrefix(kv, "NOMAD_") {
			out = append(out, kv)
		}
	}
	return out
}

type cluster struct {
	env        testEnv
	root       string
	serverHTTP string
	api        *nomad.Client
	server     *proc
	nodes      []*node
}

type node struct {
	name   string
	nomad  *proc
	berth  *berthAgent
	nodeID string
	// cgroupParent is this Nomad client's cgroup parent, removed at the end.
	cgroupParent string
}

func (cl *cluster) node(name string) *node {
	for _, n := range cl.nodes {
		if n.name == name {
			return n
		}
	}
	panic("no node " + name)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func writeFile(t *testing.T, path, content string) string {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func mkdir(t *testing.T, path string, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(path, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// nosuidBind makes dir a nosuid,nodev mount of itself, as an operator
// does for a host path workloads may write (berth refuses one on a
// suid or dev mount): Nomad's alloc dirs are shared writable.
func nosuidBind(t *testing.T, dir string) {
	t.Helper()
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_NOSUID|syscall.MS_NODEV, ""); err != nil {
		t.Fatal(err)
	}
}

func startCluster(t *testing.T, env testEnv) *cluster {
	root, err := os.MkdirTemp("", "berth-nomad-e2e-")
	if err != nil {
		t.Fatal(err)
	}
	// QEMU (as libvirt's user) must reach the VM node's data dir.
	mkdir(t, root, 0o711)
	cl := &cluster{env: env, root: root}
	// Cleanups run last-registered first: Nomad goes before the berth
	// agents, so that its tasks are gone before the agents are checked.
	t.Cleanup(func() {
		if t.Failed() {
			reportLogs(t, root)
		}
		os.RemoveAll(root)
	})
	// After the agents' own cleanup (cleanups run last-registered first).
	t.Cleanup(func() { requireNoDomains(t, root) })

	// Nomad and the plugin binaries: links in the test's directory, so
	// that every process of the test can be told by its executable.
	bin := mkdir(t, filepath.Join(root, "bin"), 0o755)
	pluginDir := mkdir(t, filepath.Join(root, "plugins"), 0o755)
	nomadBin := filepath.Join(bin, "nomad")
	linkOrCopy(t, env.nomadBin, nomadBin)
	cl.env.nomadBin = nomadBin
	build := exec.Command("go", "build", "-o", filepath.Join(pluginDir, "nomad-driver-berth"), ".")
	build.Dir = filepath.Join(env.repo, "integrations/nomad")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the plugin: %v\n%s", err, out)
	}

	img := busyboxArchive(t)
	for _, spec := range []struct{ name, policy string }{{vmNode, "vm"}, {ctrNode, "container"}} {
		n := &node{name: spec.name, cgroupParent: fmt.Sprintf("nomad-berth-e2e-%d-%s", os.Getpid(), spec.name)}
		dir := mkdir(t, filepath.Join(root, spec.name), 0o711)
		nosuidBind(t, mkdir(t, filepath.Join(dir, "nomad"), 0o711))
		n.berth = startBerth(t, env, mkdir(t, filepath.Join(dir, "berth"), 0o711), spec.policy)
		if _, err := n.berth.agent.ImportImage(context.Background(), bytes.NewReader(img), ""); err != nil {
			t.Fatalf("import the test image into %s's agent: %v", spec.name, err)
		}
		cl.nodes = append(cl.nodes, n)
	}

	serverDir := mkdir(t, filepath.Join(root, "server"), 0o700)
	httpPort, rpcPort, serfPort := freePort(t), freePort(t), freePort(t)
	cl.serverHTTP = fmt.Sprintf("127.0.0.1:%d", httpPort)
	serverCfg := writeFile(t, filepath.Join(serverDir, "server.hcl"), fmt.Sprintf(`
name                 = "server"
data_dir             = %q
bind_addr            = "127.0.0.1"
disable_update_check = true
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
ports {
  http = %d
  rpc  = %d
  serf = %d
}
server {
  enabled          = true
  bootstrap_expect = 1
}
`, filepath.Join(serverDir, "data"), httpPort, rpcPort, serfPort))
	cl.server = &proc{t: t, name: "nomad server", bin: nomadBin, args: []string{"agent", "-config", serverCfg}, log: filepath.Join(serverDir, "nomad.log")}
	t.Cleanup(cl.teardown)
	cl.server.start(t)

	cl.api, err = nomad.NewClient(&nomad.Config{Address: "http://" + cl.serverHTTP})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "a Nomad leader", func() bool {
		l, err := cl.api.Status().Leader()
		return err == nil && l != ""
	})

	for _, n := range cl.nodes {
		dir := filepath.Join(root, n.name)
		cfg := writeFile(t, filepath.Join(dir, "client.hcl"), fmt.Sprintf(`
name                 = %q
data_dir             = %q
bind_addr            = "127.0.0.1"
disable_update_check = true
plugin_dir           = %q
advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}
ports {
  http = %d
  rpc  = %d
  serf = %d
}
client {
  enabled           = true
  servers           = ["127.0.0.1:%d"]
  network_interface = "lo"
  cgroup_parent     = %q
  options = {
    "driver.allowlist"     = "berth"
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean"
  }
}
plugin "nomad-driver-berth" {
  config {
    address = "http://%s"
  }
}
`, n.name, filepath.Join(dir, "nomad"), pluginDir, freePort(t), freePort(t), freePort(t), rpcPort, n.cgroupParent, n.berth.addr))
		n.nomad = &proc{t: t, name: "nomad client " + n.name, bin: nomadBin, args: []string{"agent", "-config", cfg}, log: filepath.Join(dir, "nomad.log")}
		n.nomad.start(t)
	}
	for _, n := range cl.nodes {
		cl.waitNodeReady(t, n)
	}
	return cl
}

// waitNodeReady waits for the node to be ready in Nomad with a healthy
// berth driver.
func (cl *cluster) waitNodeReady(t *testing.T, n *node) {
	t.Helper()
	waitFor(t, 2*time.Minute, "Nomad node "+n.name+" ready with a healthy berth driver", func() bool {
		nodes, _, err := cl.api.Nodes().List(nil)
		if err != nil {
			return false
		}
		for _, s := range nodes {
			if s.Name == n.name && s.Status == "ready" {
				n.nodeID = s.ID
				d := s.Drivers["berth"]
				return d != nil && d.Healthy
			}
		}
		return false
	})
}

func (cl *cluster) nodeInfo(t *testing.T, n *node) *nomad.Node {
	t.Helper()
	info, _, err := cl.api.Nodes().Info(n.nodeID, nil)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// teardown stops Nomad and removes what its clients leave behind when
// they do not drain: tmpfs mounts of alloc secrets and private dirs, and
// cgroups. It fails the test if any of it stays.
func (cl *cluster) teardown() {
	t := cl.server.t
	for _, n := range cl.nodes {
		if n.nomad != nil {
			n.nomad.stop(t)
		}
	}
	cl.server.stop(t)
	// Processes the clients started (logmon, the plugin) run our binaries.
	killByExe(t, cl.root)
	for _, m := range mountsUnder(cl.root) {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", m, err)
		}
	}
	for _, n := range cl.nodes {
		removeCgroups(t, n.cgroupParent)
	}
	if m := mountsUnder(cl.root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if p := procsByExe(cl.root); len(p) > 0 {
		t.Errorf("processes left: %v", p)
	}
	for _, n := range cl.nodes {
		if dirs := cgroupDirs(n.cgroupParent); len(dirs) > 0 {
			t.Errorf("cgroups left: %v", dirs)
		}
	}
}

func linkOrCopy(t *testing.T, from, to string) {
	t.Helper()
	if err := os.Link(from, to); err == nil {
		return
	}
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}

func busyboxArchive(t *testing.T) []byte {
	t.Helper()
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, testImage); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// proc is a long-running child process whose output goes to a file.
type proc struct {
	t    *testing.T
	name string
	bin  string
	args []string
	log  string
	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *proc) start(t *testing.T) {
	t.Helper()
	if err := p.startE(); err != nil {
		t.Fatal(err)
	}
}

func (p *proc) startE() error {
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = cleanEnv()
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); f.Close(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done = cmd, done
	p.mu.Unlock()
	return nil
}

func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// stop sends SIGTERM and, after 20 s, SIGKILL.
func (p *proc) stop(t *testing.T) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Logf("%s did not stop on SIGTERM; killing it", p.name)
		cmd.Process.Kill()
		<-done
	}
}

func (p *proc) tail() string {
	data, _ := os.ReadFile(p.log)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// berthAgent is one node's berth agent.
type berthAgent struct {
	proc
	addr  string
	agent *client.Client

	mu sync.Mutex
	// created holds the ids of every workload the agent made during the
	// test: their cgroups must be gone at the end.
	created map[string]bool
}

// record notes the workloads the agent creates, until ctx ends.
func (b *berthAgent) record(ctx context.Context) {
	b.agent.Events(ctx, client.EventOptions{Since: 1, Types: []string{api.EventWorkloadCreated}}, nil, func(e api.Event) error {
		b.mu.Lock()
		b.created[e.WorkloadID] = true
		b.mu.Unlock()
		return nil
	})
}

// requireNoCgroups fails the test if a cgroup of one of the agent's
// workloads is left (berth's container driver makes /berth/WORKLOAD_ID in
// each hierarchy), and removes it. Only those exact paths are looked at.
func (b *berthAgent) requireNoCgroups(t *testing.T) {
	b.mu.Lock()
	var ids []string
	for id := range b.created {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	var dirs []string
	for _, id := range ids {
		if id == "" || strings.ContainsAny(id, "/.") {
			continue
		}
		dirs = append(dirs, workloadCgroups(id)...)
	}
	t.Logf("%s: checking the cgroups of %d workloads", b.name, len(ids))
	if len(dirs) == 0 {
		return
	}
	// berth removes a cgroup when it deletes the workload; give a busy
	// machine a moment.
	waitForE(30*time.Second, func() bool {
		for _, d := range dirs {
			if _, err := os.Stat(d); err == nil {
				return false
			}
		}
		return true
	})
	for _, d := range dirs {
		if _, err := os.Stat(d); err == nil {
			t.Errorf("%s: cgroup %s of a workload left behind", b.name, d)
			if err := os.Remove(d); err != nil {
				t.Logf("remove %s: %v", d, err)
			}
		}
	}
}

// workloadCgroups are the paths berth's container driver gives workload
// id's cgroup: /berth/ID in the unified tree or in each v1 hierarchy.
func workloadCgroups(id string) []string {
	out := []string{filepath.Join("/sys/fs/cgroup/berth", id)}
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, filepath.Join("/sys/fs/cgroup", e.Name(), "berth", id))
		}
	}
	return out
}

func startBerth(t *testing.T, env testEnv, dataDir, isolation string) *berthAgent {
	t.Helper()
	policy := writeFile(t, filepath.Join(dataDir, "..", "policy.yaml"),
		"apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: "+isolation+"\n")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cfg := writeFile(t, filepath.Join(dataDir, "..", "berth.yaml"), fmt.Sprintf(`listen: %s
listen_unix: ""
data_dir: %s
policy:
  file: %s
network:
  enabled: false
node:
  cpu_overcommit: 4
vm:
  accel: tcg
  init_path: %s
workload_defaults:
  stop_timeout: 3s
volumes:
  host_paths: [%s]
`, addr, dataDir, policy, env.initBin, filepath.Join(filepath.Dir(dataDir), "nomad")))
	b := &berthAgent{addr: addr, created: map[string]bool{}}
	b.proc = proc{t: t, name: "berth agent " + isolation, bin: env.berthBin, args: []string{"agent", "--config", cfg}, log: filepath.Join(dataDir, "..", "berth.log")}
	var err error
	if b.agent, err = client.New(addr); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// An agent a failed test left stopped (testUnhealthy) is started
		// again: only a running agent deletes its workloads.
		if !b.running() {
			if err := b.startE(); err != nil {
				t.Errorf("%s: start it again to clean up: %v", b.name, err)
			}
		}
		b.deleteAll(t)
		b.requireNoCgroups(t)
		b.proc.stop(t)
	})
	b.start(t)
	ctx, cancel := context.WithCancel(context.Background())
	// Runs before the cleanup above, whose deleteAll records what it finds.
	t.Cleanup(cancel)
	go b.record(ctx)
	return b
}

func (b *berthAgent) start(t *testing.T) {
	t.Helper()
	if err := b.startE(); err != nil {
		t.Fatal(err)
	}
}

// startE starts the agent and waits up to a minute for it to be ready.
func (b *berthAgent) startE() error {
	if err := b.proc.startE(); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err := b.agent.Ready(ctx)
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after a minute: %v\n%s", b.name, err, b.tail())
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (b *berthAgent) stop(t *testing.T) { b.proc.stop(t) }

// deleteAll removes every workload and fails the test if one stays.
func (b *berthAgent) deleteAll(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	list, _, err := b.agent.List(ctx, api.ListFilter{}, nil)
	if err != nil {
		t.Errorf("%s: list workloads at cleanup: %v", b.name, err)
		return
	}
	for _, w := range list {
		b.mu.Lock()
		b.created[w.ID] = true
		b.mu.Unlock()
		t.Errorf("%s: workload %s (%s, %s) left behind by the driver", b.name, w.ID, w.Name, w.State)
		if err := b.agent.Delete(ctx, w.ID, true); err != nil {
			t.Errorf("%s: delete %s: %v", b.name, w.ID, err)
		}
	}
}

func (n *node) requireNoWorkloads(t *testing.T, job string) {
	t.Helper()
	waitFor(t, 2*time.Minute, "no "+job+" workloads left on "+n.name, func() bool {
		list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.job": job}}, nil)
		return err == nil && len(list) == 0
	})
}

func (n *node) waitRunningWorkload(t *testing.T, allocID string) api.Workload {
	t.Helper()
	var w api.Workload
	waitFor(t, 3*time.Minute, "a running berth workload for allocation "+allocID+" on "+n.name, func() bool {
		list, _, err := n.berth.agent.List(context.Background(), api.ListFilter{Labels: map[string]string{"nomad.alloc_id": allocID}}, nil)
		if err != nil || len(list) != 1 || list[0].State != api.StateRunning {
			return false
		}
		w = list[0]
		return true
	})
	want := api.IsolationContainer
	if n.name == vmNode {
		want = api.IsolationVM
	}
	if w.Isolation != want {
		t.Errorf("workload %s on %s runs as %s, want %s", w.ID, n.name, w.Isolation, want)
	}
	return w
}

// mountsUnder lists mount points below dir, deepest first.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && strings.HasPrefix(fields[4], dir+"/") {
			out = append(out, fields[4])
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// procsByExe lists processes running an executable below dir.
func procsByExe(dir string) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		exe, err := os.Readlink(filepath.Join("/proc", e.Name(), "exe"))
		if err == nil && strings.HasPrefix(exe, dir+"/") {
			out = append(out, pid)
		}
	}
	return out
}

func killByExe(t *testing.T, dir string) {
	for i := 0; i < 50; i++ {
		pids := procsByExe(dir)
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cgroupDirs lists the directories of a cgroup parent in every hierarchy
// (v1 controllers or the v2 unified tree), deepest first.
func cgroupDirs(parent string) []string {
	if parent == "" || strings.Contains(parent, "..") || filepath.IsAbs(parent) {
		// Never walk a whole hierarchy: only the test's own parent.
		return nil
	}
	var roots []string
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		roots = []string{"/sys/fs/cgroup"}
	} else {
		entries, _ := os.ReadDir("/sys/fs/cgroup")
		for _, e := range entries {
			roots = append(roots, filepath.Join("/sys/fs/cgroup", e.Name()))
		}
	}
	var out []string
	for _, r := range roots {
		top := filepath.Join(r, parent)
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				out = append(out, p)
			}
			return nil
		})
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

func removeCgroups(t *testing.T, parent string) {
	for _, d := range cgroupDirs(parent) {
		var err error
		for i := 0; i < 20; i++ {
			if err = os.Remove(d); err == nil || os.IsNotExist(err) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil && !os.IsNotExist(err) {
			t.Errorf("remove cgroup %s: %v", d, err)
		}
	}
}
