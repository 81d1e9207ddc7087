package daemon_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
)

// faultAgent is an agent process (a test may SIGKILL it) on a bridge and
// subnet of its own, optionally with VMs, with a boot id file the test can
// change to simulate a host reboot. Its state directory is apart from its
// data directory, as on a node where it is a tmpfs.
type faultAgent struct {
	*agentProcess
	addr, dataDir, stateDir, bridge, subnet, bootFile string
}

func startFaultAgent(t *testing.T, vm bool) (*faultAgent, *client.Client) {
	t.Helper()
	a := &faultAgent{
		dataDir:  vmDataDir(t),
		stateDir: t.TempDir(),
		addr:     freeAddr(t),
		bridge:   fmt.Sprintf("bf%04x", rand.IntN(1<<16)),
		subnet:   fmt.Sprintf("10.%d.%d.0/24", 200+rand.IntN(50), rand.IntN(256)),
	}
	a.bootFile = filepath.Join(t.TempDir(), "boot_id")
	if err := os.WriteFile(a.bootFile, []byte("boot-1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	vmCfg := "vm:\n  enabled: false\n"
	if vm {
		vmCfg = fmt.Sprintf("vm:\n  accel: tcg\n  init_path: %s\n", berthInit(t))
	}
	cfg := fmt.Sprintf(`listen: %s
data_dir: %s
state_dir: %s
%snode:
  boot_id_file: %s
network:
  enabled: true
  name: berth-%s
  bridge: %s
  subnet: %s
  dns: [10.0.0.53]
workload_defaults:
  stop_timeout: 1s
  cpu: 0.01
  memory_mb: 64
`, a.addr, a.dataDir, a.stateDir, vmCfg, a.bootFile, a.bridge, a.bridge, a.subnet)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the agent has stopped.
	t.Cleanup(func() { exec.Command("ip", "link", "del", a.bridge).Run() })
	a.agentProcess = &agentProcess{t: t, config: cfgFile}
	c := a.start(a.addr)
	importBusybox(t, c)
	return a, c
}

// assertNothingLeft checks that nothing the agent made for a workload is
// left on the node: no monitor or container process, mount, cgroup,
// network namespace, veth, iptables rule, address lease, task directory or
// VM domain.
func (a *faultAgent) assertNothingLeft(t *testing.T, ids []string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		left := a.leftovers(ids)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("left on the node after deleting every workload:\n%s", strings.Join(left, "\n"))
			return
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// leftMounts lists the mounts under dataDir that an agent configured by
// cfgFile holds for no workload. Its prepared writable layers are its own,
// not a workload's: they count only past their bound.
func leftMounts(dataDir, cfgFile string) []string {
	var left, pool []string
	pooled := filepath.Join(dataDir, "containers", "layer-pool") + "/"
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mounts), "\n") {
		switch {
		case strings.Contains(line, " "+pooled):
			pool = append(pool, "prepared layer: "+line)
		case strings.Contains(line, dataDir):
			left = append(left, "mount: "+line)
		}
	}
	if cfg, err := config.Load(cfgFile, nil); err != nil || len(pool) > cfg.Container.PreparedLayers {
		left = append(left, pool...)
	}
	return left
}

func (a *faultAgent) leftovers(ids []string) []string {
	var left []string
	for _, dir := range []string{a.dataDir, a.stateDir} {
		if out, _ := exec.Command("pgrep", "-af", dir).Output(); len(out) > 0 {
			left = append(left, "processes: "+strings.TrimSpace(string(out)))
		}
	}
	left = append(left, leftMounts(a.dataDir, a.config)...)
	left = append(left, leftMounts(a.stateDir, a.config)...)
	for _, id := range ids {
		for _, ctl := range []string{"memory", "pids", "cpu"} {
			if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", ctl, "berth", id)); err == nil {
				left = append(left, "cgroup: "+ctl+"/berth/"+id)
			}
		}
		if out, err := exec.Command("virsh", "-c", "qemu:///system", "domstate", "berth-"+id).Output(); err == nil {
			left = append(left, "domain: berth-"+id+" "+strings.TrimSpace(string(out)))
		}
	}
	for _, dir := range []string{
		filepath.Join(a.stateDir, "containers", "tasks"), filepath.Join(a.stateDir, "containers", "runc"),
		filepath.Join(a.dataDir, "containers", "layers"), filepath.Join(a.dataDir, "vms", "tasks"),
	} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			left = append(left, "task's: "+filepath.Join(dir, e.Name()))
		}
	}
	// Network: namespace files, records and leases live under network/;
	// every file there named after an address or a workload is a leak.
	_ = filepath.WalkDir(filepath.Join(a.dataDir, "network"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		base := filepath.Base(p)
		for _, id := range ids {
			if strings.Contains(base, id) {
				left = append(left, "network file: "+p)
				return nil
			}
		}
		if prefix := strings.Join(strings.Split(a.subnet, ".")[:3], "."); strings.HasPrefix(base, prefix+".") && !strings.HasSuffix(base, ".1") {
			left = append(left, "address lease: "+p)
		}
		return nil
	})
	if out, _ := exec.Command("ip", "-o", "link", "show", "master", a.bridge).Output(); len(out) > 0 {
		left = append(left, "links on the bridge: "+strings.TrimSpace(string(out)))
	}
	prefix := strings.Join(strings.Split(a.subnet, ".")[:3], ".") + "."
	for _, table := range []string{"nat", "filter"} {
		out, _ := exec.Command("iptables-save", "-t", table).Output()
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A") && strings.Contains(line, prefix) && !strings.Contains(line, prefix+"0/24") {
				left = append(left, "iptables: "+line)
			}
		}
	}
	return left
}

// chaosRound is what one round of TestChaosExitCodes submitted.
type chaosRound struct {
	mu    sync.Mutex
	codes map[string]int    // name -> the exit code its command gives
	acked map[string]string // name -> id, acknowledged
}

// chaosExit submits named workloads, each with its own exit code, races
// them with a SIGKILL of the agent, restarts it and resubmits what got no
// answer, then checks that every acknowledged workload ends exited with
// its own code, none is duplicated, and nothing is left after deleting
// them all.
func chaosExit(t *testing.T, rounds int, vm bool, perRound func(*rand.Rand) int, killWithin time.Duration) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 2))
	a, c := startFaultAgent(t, vm)
	t.Cleanup(func() {
		deleteAll(t, c)
		a.kill()
	})
	spec := func(name string, code int) api.WorkloadSpec {
		s := sh(fmt.Sprintf("sleep 0.%d; exit %d", code%10, code))
		s.Name = name
		if vm {
			s.Isolation = api.IsolationVM
			s.Resources.MemoryMB = 128
		}
		return s
	}
	var all []string
	accepted, unanswered := 0, 0
	waitFor := 60 * time.Second
	if vm {
		waitFor = 5 * time.Minute
	}
	for round := range rounds {
		r := &chaosRound{codes: map[string]int{}, acked: map[string]string{}}
		n := perRound(rng)
		var wg sync.WaitGroup
		for i := range n {
			name := fmt.Sprintf("x-r%d-%d", round, i)
			code := 1 + rng.IntN(120)
			r.codes[name] = code
			wg.Go(func() {
				w, err := c.Submit(context.Background(), spec(name, code))
				if err == nil {
					r.mu.Lock()
					r.acked[name] = w.ID
					r.mu.Unlock()
				}
			})
		}
		time.Sleep(time.Duration(rng.Int64N(int64(killWithin))))
		a.kill()
		wg.Wait()
		c = a.start(a.addr)

		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		// Resubmit what got no answer: the same name and spec must find
		// the workload if it was accepted, and never make a second one.
		for name, code := range r.codes {
			if _, ok := r.acked[name]; ok {
				continue
			}
			unanswered++
			w, err := c.Submit(ctx, spec(name, code))
			if err != nil {
				t.Fatalf("round %d: resubmit %s: %v", round, name, err)
			}
			r.acked[name] = w.ID
		}
		list, _, err := c.List(ctx, api.ListFilter{}, nil)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]int{}
		for _, w := range list {
			seen[w.Name]++
		}
		for name, k := range seen {
			if k > 1 {
				t.Errorf("round %d: %d workloads named %s", round, k, name)
			}
		}
		for name, id := range r.acked {
			accepted++
			all = append(all, id)
			w, err := c.WaitExit(ctx, id)
			if err != nil {
				t.Errorf("round %d: %s (%s) did not end: %v", round, name, id, err)
				continue
			}
			if w.State != api.StateExited || exitCode(w) != r.codes[name] {
				t.Errorf("round %d: %s (%s) ended %s exit %d (%q), want exited %d", round, name, id, w.State, exitCode(w), w.Error, r.codes[name])
			}
		}
		for _, id := range r.acked {
			if err := c.Delete(ctx, id, true); err != nil {
				t.Errorf("round %d: delete %s: %v", round, id, err)
			}
		}
		cancel()
		if t.Failed() {
			t.Fatalf("agent stderr:\n%s", a.stderr)
		}
	}
	t.Logf("%d rounds: %d workloads accepted (%d resubmitted after a crash), all ended with their own exit codes", rounds, accepted, unanswered)
	a.assertNothingLeft(t, all)
}

// TestChaosExitCodes: 100 rounds of 3-7 named container workloads on the
// bridge network racing an agent SIGKILL 0-0.7 s after the submits.
func TestChaosExitCodes(t *testing.T) {
	requireCNI(t)
	if testing.Short() {
		t.Skip("a hundred agent crashes: not in -short")
	}
	chaosExit(t, 100, false, func(r *rand.Rand) int { return 3 + r.IntN(5) }, 700*time.Millisecond)
}

// TestChaosExitCodesVM: the same with VM workloads, the agent killed 0-8 s
// after the submits, while the VMs boot.
func TestChaosExitCodesVM(t *testing.T) {
	requireCNI(t)
	requireLibvirt(t)
	chaosExit(t, 10, true, func(r *rand.Rand) int { return 1 + r.IntN(2) }, 8*time.Second)
}

// reboot simulates a host reboot under a killed agent: every process,
// domain, mount and veth the node held is gone, and so is everything in
// the state directory (a tmpfs); cgroups, iptables rules and the files
// under the data dir are left for berth to release; the node has a new
// boot id.
func (a *faultAgent) reboot(t *testing.T, ids []string) {
	t.Helper()
	a.kill()
	for _, id := range ids {
		_ = exec.Command("virsh", "-c", "qemu:///system", "destroy", "berth-"+id).Run()
		procs, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/pids/berth", id, "cgroup.procs"))
		for _, pid := range strings.Fields(string(procs)) {
			_ = exec.Command("kill", "-9", pid).Run()
		}
	}
	_ = exec.Command("pkill", "-9", "-f", a.dataDir).Run()
	_ = exec.Command("pkill", "-9", "-f", a.stateDir).Run()
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	lines := strings.Split(string(mounts), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		f := strings.Fields(lines[i])
		if len(f) > 4 && (strings.HasPrefix(f[4], a.dataDir) || strings.HasPrefix(f[4], a.stateDir)) {
			if out, err := exec.Command("umount", "-l", f[4]).CombinedOutput(); err != nil {
				t.Logf("umount %s: %v: %s", f[4], err, out)
			}
		}
	}
	out, _ := exec.Command("ip", "-o", "link", "show", "master", a.bridge).Output()
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
			_ = exec.Command("ip", "link", "del", name).Run()
		}
	}
	entries, _ := os.ReadDir(a.stateDir)
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(a.stateDir, e.Name())); err != nil {
			t.Fatalf("empty the state directory as a reboot does: %v", err)
		}
	}
	if err := os.WriteFile(a.bootFile, []byte(fmt.Sprintf("boot-%d\n", time.Now().UnixNano())), 0o600); err != nil {
		t.Fatal(err)
	}
}

// hostReboot: after a simulated reboot, workloads with a restart policy
// run again and the others are failed with "node rebooted"; deleting them
// all works and leaves nothing.
func hostReboot(t *testing.T, iso api.Isolation) {
	a, c := startFaultAgent(t, iso == api.IsolationVM)
	t.Cleanup(func() {
		deleteAll(t, c)
		a.kill()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	submit := func(name string, policy api.RestartPolicy) *api.Workload {
		s := sh("echo up; sleep 1000")
		s.Name, s.Isolation, s.Restart = name, iso, api.RestartSpec{Policy: policy}
		w, err := c.Submit(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	always := submit("always", api.RestartAlways)
	onFailure := submit("on-failure", api.RestartOnFailure)
	never := submit("never", api.RestartNever)
	ids := []string{always.ID, onFailure.ID, never.ID}
	for _, id := range ids {
		waitRunning(t, c, id)
	}

	a.reboot(t, ids)
	c = a.start(a.addr)

	w, err := c.WaitExit(ctx, never.ID)
	if err != nil {
		t.Fatal(err)
	}
	if w.State != api.StateFailed || !strings.Contains(w.Error, "node rebooted") {
		t.Errorf("workload without a restart policy after a reboot: %s (%q), want failed with \"node rebooted\"", w.State, w.Error)
	}
	for _, id := range []string{always.ID, onFailure.ID} {
		deadline := time.Now().Add(4 * time.Minute)
		for {
			w, _, err := c.Get(ctx, id, nil)
			if err != nil {
				t.Fatal(err)
			}
			if w.State == api.StateRunning && w.RestartCount >= 1 {
				break
			}
			if w.State.Terminal() || time.Now().After(deadline) {
				t.Fatalf("workload %s with restart policy %s after a reboot: %s, restart count %d (%q); want running again", w.Name, w.Spec.Restart.Policy, w.State, w.RestartCount, w.Error)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, id := range ids {
		if err := c.Delete(ctx, id, true); err != nil {
			t.Errorf("delete %s after a reboot: %v", id, err)
		}
	}
	a.assertNothingLeft(t, ids)
}

func TestHostReboot(t *testing.T) {
	requireCNI(t)
	hostReboot(t, api.IsolationContainer)
}

func TestHostRebootVM(t *testing.T) {
	requireCNI(t)
	requireLibvirt(t)
	hostReboot(t, api.IsolationVM)
}

// TestHungRunc: with a runc that hangs in create, the agent keeps
// answering (node status, submits), a stop and a delete of the wedged
// workloads finish, nothing of the hung runc is left, and once runc works
// again so do new workloads.
func TestHungRunc(t *testing.T) {
	requireRunc(t)
	dir := t.TempDir()
	marker := filepath.Join(dir, "hang")
	wrapper := filepath.Join(dir, "runc")
	real, err := exec.LookPath("runc")
	if err != nil {
		real = "/usr/sbin/runc"
	}
	script := fmt.Sprintf("#!/bin/sh\nfor a in \"$@\"; do\n\tif { [ \"$a\" = create ] || [ \"$a\" = run ]; } && [ -e %q ]; then sleep 3599 & wait; fi\ndone\nexec %q \"$@\"\n", marker, real)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	dataDir := t.TempDir()
	cfg := testConfig(t, dataDir, "127.0.0.1:0")
	cfg.Container.Runc = wrapper
	c, _ := serve(t, cfg)
	importBusybox(t, c)

	// answers checks that the agent answers within 3 s.
	answers := func(what string, f func(ctx context.Context) error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		if err := f(ctx); err != nil {
			t.Errorf("%s while runc hangs: %v", what, err)
		}
	}
	var wedged []string
	for range 3 {
		answers("submit", func(ctx context.Context) error {
			w, err := c.Submit(ctx, sh("echo never"))
			if err == nil {
				wedged = append(wedged, w.ID)
			}
			return err
		})
	}
	time.Sleep(time.Second)
	answers("node status", func(ctx context.Context) error { _, _, err := c.Node(ctx, nil); return err })
	for _, id := range wedged {
		answers("get", func(ctx context.Context) error {
			w, _, err := c.Get(ctx, id, nil)
			if err == nil && w.State != api.StateStarting {
				return fmt.Errorf("workload %s is %s, want starting (runc hangs)", id, w.State)
			}
			return err
		})
	}
	// A stop of a workload whose runc hangs ends it; a forced delete of
	// another removes it.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := c.Stop(ctx, wedged[0], time.Second)
	if err != nil {
		t.Fatalf("stop of a workload whose runc hangs: %v", err)
	}
	if !w.State.Terminal() {
		t.Errorf("after the stop the workload is %s", w.State)
	}
	t.Logf("stopped while runc hung: %s (%q)", w.State, w.Error)
	for _, id := range wedged[1:] {
		if err := c.Delete(ctx, id, true); err != nil {
			t.Errorf("forced delete of a workload whose runc hangs: %v", err)
		}
	}
	if err := c.Delete(ctx, wedged[0], false); err != nil {
		t.Errorf("delete of the stopped workload: %v", err)
	}
	if out, _ := exec.Command("pgrep", "-af", dataDir).Output(); len(out) > 0 {
		t.Errorf("processes left after the wedged workloads were deleted: %s", out)
	}
	if out, _ := exec.Command("pgrep", "-f", "sleep 3599").Output(); len(out) > 0 {
		// The wrapper's sleep is in the monitor's session: killed with it.
		t.Errorf("the hung runc's children are left: %s", out)
	}

	// runc works again: so does a workload.
	os.Remove(marker)
	w, err = c.Submit(ctx, sh("exit 3"))
	if err != nil {
		t.Fatal(err)
	}
	if w, err = c.WaitExit(ctx, w.ID); err != nil || exitCode(w) != 3 {
		t.Errorf("workload after runc recovered: %+v, %v; want exit 3", w, err)
	}
}

// TestVMStopOutlivesItsClient: a stop of a VM workload that ignores
// SIGTERM, whose client leaves 100 ms after asking, ends it (137) at its
// grace period; the same with the agent SIGKILLed right after the ask, so
// the persisted deadline is resumed by the next agent.
func TestVMStopOutlivesItsClient(t *testing.T) {
	requireCNI(t)
	requireLibvirt(t)
	a, c := startFaultAgent(t, true)
	t.Cleanup(func() {
		deleteAll(t, c)
		a.kill()
	})
	const grace, margin = 3 * time.Second, 30 * time.Second
	for _, crash := range []bool{false, true} {
		spec := termless()
		spec.Isolation = api.IsolationVM
		spec.Network = api.NetworkNone
		w, err := c.Submit(context.Background(), spec)
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, w.ID)
		deadline := time.Now().Add(3 * time.Minute)
		for {
			if out, _ := logs(t, c, w.ID); strings.Contains(out, "ready") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("VM workload %s never said ready", w.ID)
			}
			time.Sleep(100 * time.Millisecond)
		}
		asked := time.Now()
		askAndLeave(t, "stop of a VM", func(ctx context.Context) error { _, err := c.Stop(ctx, w.ID, grace); return err })
		if crash {
			a.kill()
			c = a.start(a.addr)
		}
		ctx, cancel := context.WithTimeout(context.Background(), grace+margin)
		end, err := c.WaitExit(ctx, w.ID)
		cancel()
		if err != nil {
			t.Fatalf("crash %v: the VM workload did not end within its grace period (%v) and %v: %v", crash, grace, margin, err)
		}
		if end.State != api.StateExited || exitCode(end) != 137 {
			t.Errorf("crash %v: VM workload ended %s with exit %d (%q), want exited 137", crash, end.State, exitCode(end), end.Error)
		}
		t.Logf("crash %v: ended %v after the stop was asked", crash, end.FinishedAt.Sub(asked).Round(100*time.Millisecond))
	}
}
