package daemon_test

import (
	"context"
	"fmt"
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
	"github.com/berthd/berth/internal/testdisk"
)

const libvirtSocket = "/run/libvirt/libvirt-sock"

// requireLibvirt skips only where VMs cannot run at all, and fails where
// they can but libvirtd is not running (`make test` starts it).
func requireLibvirt(t *testing.T) {
	t.Helper()
	requireRunc(t)
	if testing.Short() {
		t.Skip("boots VMs: not in -short")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		t.Skip("libvirtd is not installed; `make test` installs libvirt-daemon-system")
	}
	if _, err := os.Stat(libvirtSocket); err != nil {
		t.Fatalf("libvirtd is not running: %s is missing; start it with `libvirtd -d` (and `virtlogd -d`)", libvirtSocket)
	}
}

var (
	initOnce sync.Once
	initDir  string
	initPath string
	initErr  error
)

// berthInit builds the static guest init once per test binary.
func berthInit(t *testing.T) string {
	t.Helper()
	initOnce.Do(func() {
		initDir, initErr = os.MkdirTemp("", "berth-init-")
		if initErr != nil {
			return
		}
		initPath = filepath.Join(initDir, "berth-init")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", initPath, "github.com/berthd/berth/cmd/berth-init")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			initErr = fmt.Errorf("build berth-init: %v\n%s", err, out)
		}
	})
	if initErr != nil {
		t.Fatal(initErr)
	}
	return initPath
}

// withVMs turns on the VM driver under emulation with a freshly built
// berth-init.
func withVMs(t *testing.T, cfg *config.Config) *config.Config {
	cfg.VM.Enabled, cfg.VM.Accel, cfg.VM.InitPath = true, "tcg", berthInit(t)
	return cfg
}

// vmDataDir is a data dir QEMU (running as libvirt's unprivileged user)
// can traverse to the task disks.
func vmDataDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "berth-vmtest-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestSameSpecContainerAndVM(t *testing.T) {
	requireLibvirt(t)
	c, _ := serve(t, withVMs(t, testConfig(t, vmDataDir(t), "127.0.0.1:0")))
	importBusybox(t, c)

	spec := api.WorkloadSpec{
		Image:   testImage,
		Command: []string{"sh", "-c", `echo "out $GREETING"; echo "err line" >&2; pwd; id -u; exit 7`},
		Env:     map[string]string{"GREETING": "from berth"},
		Workdir: "/srv/app",
	}
	type result struct {
		w        *api.Workload
		out, err string
	}
	results := map[api.Isolation]result{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, iso := range []api.Isolation{api.IsolationContainer, api.IsolationVM} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := spec
			s.Isolation = iso
			w, out, errs := run(t, c, s)
			mu.Lock()
			results[iso] = result{w, out, errs}
			mu.Unlock()
		}()
	}
	wg.Wait()
	ctr, vm := results[api.IsolationContainer], results[api.IsolationVM]
	if ctr.w == nil || vm.w == nil {
		t.Fatal("a run did not finish")
	}
	if ctr.w.Isolation != api.IsolationContainer || vm.w.Isolation != api.IsolationVM {
		t.Fatalf("placed on %s and %s", ctr.w.Isolation, vm.w.Isolation)
	}
	want := "out from berth\n/srv/app\n0\n"
	for iso, r := range results {
		if r.w.State != api.StateExited || exitCode(r.w) != 7 || r.out != want || r.err != "err line\n" {
			t.Errorf("%s: %s exit %d (%q), stdout %q, stderr %q; want exited 7, %q, %q", iso, r.w.State, exitCode(r.w), r.w.Error, r.out, r.err, want, "err line\n")
		}
	}
	if vm.w.Placement == nil || vm.w.Placement.Isolation != api.IsolationVM {
		t.Errorf("vm placement %+v", vm.w.Placement)
	}
	// Both monitors time every line (a VM's output comes through its
	// virtio-serial ports into the same writer), within the workload's
	// life: a line's time is when the monitor wrote it, and output still in
	// the pipe when the process exited is written in the monitor's drain
	// after the end (at most drainAfterEnd); since after that leaves
	// nothing.
	const drainAfterEnd = 2 * time.Second
	for iso, r := range results {
		n := 0
		err := c.Logs(context.Background(), r.w.ID, api.LogOptions{Tail: -1, Timestamps: true}, func(l api.LogLine) error {
			n++
			if l.Time == nil || l.Time.Before(r.w.CreatedAt) || (r.w.FinishedAt != nil && l.Time.After(r.w.FinishedAt.Add(drainAfterEnd))) {
				t.Errorf("%s: %q at %v, outside [%v, %v]", iso, l.Line, l.Time, r.w.CreatedAt, r.w.FinishedAt)
			}
			return nil
		})
		if err != nil || n != 4 {
			t.Errorf("%s: logs with timestamps: %d lines, %v", iso, n, err)
		}
		if r.w.FinishedAt != nil {
			err = c.Logs(context.Background(), r.w.ID, api.LogOptions{Tail: -1, Since: r.w.FinishedAt.Add(drainAfterEnd)}, func(l api.LogLine) error {
				t.Errorf("%s: %q is since the workload's end", iso, l.Line)
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		}
	}
}

// TestVMWorkloadSurvivesAgentSIGKILL: the agent dies while a VM workload
// runs; after a restart the workload is still running, its output still
// grows, and its exit code is reported right.
func TestVMWorkloadSurvivesAgentSIGKILL(t *testing.T) {
	requireLibvirt(t)
	dataDir := vmDataDir(t)
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nnetwork:\n  enabled: false\nvm:\n  accel: tcg\n  init_path: %s\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir, berthInit(t))
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	t.Cleanup(func() {
		deleteAll(t, c)
		p.kill()
	})
	importBusybox(t, c)
	ctx := context.Background()
	// Long enough to outlast an agent restart on a loaded machine.
	spec := sh("i=0; while [ $i -lt 120 ]; do echo tick $i; i=$((i+1)); sleep 0.25; done; exit 5")
	spec.Isolation = api.IsolationVM
	sub, err := c.Submit(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	countTicks := func() int {
		out, _ := logs(t, c, sub.ID)
		return strings.Count(out, "tick")
	}
	// Wait for output: the guest has booted and the workload runs.
	deadline := time.Now().Add(4 * time.Minute)
	for countTicks() == 0 {
		if time.Now().After(deadline) {
			w, _, _ := c.Get(ctx, sub.ID, nil)
			t.Fatalf("no output from the VM workload after 4 minutes: %+v\n%s", w, p.stderr)
		}
		time.Sleep(200 * time.Millisecond)
	}

	p.kill()
	time.Sleep(time.Second)
	c = p.start(addr)
	w, _, err := c.Get(ctx, sub.ID, nil)
	if err != nil {
		t.Fatal(err)
	}
	if w.State != api.StateRunning {
		t.Fatalf("after the agent restart the VM workload is %s (%q), want running", w.State, w.Error)
	}
	first := countTicks()
	deadline = time.Now().Add(10 * time.Second)
	for countTicks() <= first {
		if time.Now().After(deadline) {
			t.Fatalf("VM output stopped growing at %d ticks after the agent restart", first)
		}
		time.Sleep(200 * time.Millisecond)
	}
	end, err := c.WaitExit(ctx, sub.ID)
	if err != nil {
		t.Fatal(err)
	}
	if end.State != api.StateExited || exitCode(end) != 5 || countTicks() != 120 {
		out, _ := logs(t, c, sub.ID)
		t.Errorf("VM workload ended %s exit %d (%q) with %d ticks, want exited 5 with 120:\n%s", end.State, exitCode(end), end.Error, countTicks(), out)
	}
}

// TestWholeDiskWorkload imports a bootable qcow2 through the API and runs
// it as a workload: it boots by its own bootloader, its console is its log,
// it exits 0 when it powers itself off, a stop forces off one that ignores
// the power button (137), and delete leaves the image unchanged.
func TestWholeDiskWorkload(t *testing.T) {
	requireLibvirt(t)
	c, _ := serve(t, withVMs(t, testConfig(t, vmDataDir(t), "127.0.0.1:0")))
	dir := t.TempDir()
	for name, hold := range map[string]bool{"appliance:once": false, "appliance:hold": true} {
		f, err := os.Open(testdisk.Build(t, filepath.Join(dir, name), hold))
		if err != nil {
			t.Fatal(err)
		}
		imgs, err := c.ImportImage(context.Background(), f, "berth.test/"+name)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if len(imgs) != 1 || imgs[0].Kind != "disk" {
			t.Fatalf("imported %+v, want one disk image", imgs)
		}
	}

	// A disk takes no command and never runs as a container.
	_, err := c.Submit(context.Background(), api.WorkloadSpec{Image: "berth.test/appliance:once", Command: []string{"true"}})
	if !client.IsReason(err, api.ReasonInvalidArgument) {
		t.Errorf("disk with a command: %v", err)
	}
	_, err = c.Submit(context.Background(), api.WorkloadSpec{Image: "berth.test/appliance:once", Isolation: api.IsolationContainer})
	if !client.IsReason(err, api.ReasonInvalidArgument) {
		t.Errorf("disk as a container: %v", err)
	}

	w, out, _ := run(t, c, api.WorkloadSpec{Image: "berth.test/appliance:once", Resources: api.Resources{MemoryMB: 128}})
	if w.Isolation != api.IsolationVM || w.State != api.StateExited || exitCode(w) != 0 || !strings.Contains(out, testdisk.Hello) {
		t.Errorf("disk workload: %s on %s, exit %d (%q), console:\n%s", w.State, w.Isolation, exitCode(w), w.Error, out)
	}

	sub, err := c.Submit(context.Background(), api.WorkloadSpec{Image: "berth.test/appliance:hold", Resources: api.Resources{MemoryMB: 128}})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(4 * time.Minute)
	for {
		out, _ := logs(t, c, sub.ID)
		if strings.Contains(out, testdisk.Hello) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the held disk never printed its line:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	stopped, err := c.Stop(context.Background(), sub.ID, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if stopped.State != api.StateExited || exitCode(stopped) != 137 {
		t.Errorf("stopped disk workload: %s exit %d, want exited 137", stopped.State, exitCode(stopped))
	}
}
