package daemon_test

// Isolation defaults, verified on real runc: workloads that try to escape
// or to hurt the node, each failing with the precise error the hardened
// spec (ctrdriver/spec.go, ctrdriver/seccomp.go) must produce.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/ociimage"
)

const probeImage = "berth.test/probe:latest"

// startAgentWith is startAgent with a configuration change.
func startAgentWith(t *testing.T, modify func(*config.Config)) *client.Client {
	t.Helper()
	c, _ := startAgentAddr(t, modify)
	return c
}

// startAgentAddr is startAgentWith that also returns the TCP address.
func startAgentAddr(t *testing.T, modify func(*config.Config)) (*client.Client, string) {
	t.Helper()
	requireRunc(t)
	cfg := testConfig(t, t.TempDir(), "127.0.0.1:0")
	cfg.ListenUnix = filepath.Join(t.TempDir(), "berth.sock")
	if modify != nil {
		modify(cfg)
	}
	c, addr := serve(t, cfg)
	importBusybox(t, c)
	return c, addr
}

// importProbe builds testdata/probe statically and imports busybox plus
// the probe at /probe as probeImage.
func importProbe(t *testing.T, c *client.Client) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "probe")
	build := exec.Command("go", "build", "-o", bin, "./testdata/probe")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build the probe: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	layer, err := ociimage.Layer(ociimage.File{Name: "probe", Mode: 0o755, Body: string(data)})
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, probeImage); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ImportImage(context.Background(), &buf, ""); err != nil {
		t.Fatalf("import the probe image: %v", err)
	}
}

func TestContainerEscapesFail(t *testing.T) {
	c := startAgentWith(t, func(cfg *config.Config) { cfg.Container.UserNS.Mode = "off" })
	importProbe(t, c)
	escapeTests(t, c)
}

// escapeTests are the escapes every container must fail, whether or not
// it runs in a user namespace (userns_test.go runs them there). c's agent
// has the probe image.
func escapeTests(t *testing.T, c *client.Client) {
	// expect runs script and checks its exit code and that stdout and
	// stderr contain the given lines.
	expect := func(t *testing.T, spec api.WorkloadSpec, code int, stdout, stderr []string) {
		t.Helper()
		w, out, errs := run(t, c, spec)
		if exitCode(w) != code {
			t.Errorf("exit %d, want %d (state %s, %q)\nstdout %q\nstderr %q", exitCode(w), code, w.State, w.Error, out, errs)
		}
		for _, want := range stdout {
			if !strings.Contains(out, want) {
				t.Errorf("stdout %q lacks %q (stderr %q)", out, want, errs)
			}
		}
		for _, want := range stderr {
			if !strings.Contains(errs, want) {
				t.Errorf("stderr %q lacks %q (stdout %q)", errs, want, out)
			}
		}
	}

	t.Run("ProcSysIsReadOnly", func(t *testing.T) {
		// core_pattern is the classic escape: a pipe there runs as root
		// on the host when any process dumps core.
		expect(t, sh("echo '|/tmp/x' > /proc/sys/kernel/core_pattern; echo rc=$?; echo 3 > /proc/sys/vm/drop_caches; echo rc=$?"), 0,
			[]string{"rc=1\nrc=1"},
			[]string{"can't create /proc/sys/kernel/core_pattern: Read-only file system", "can't create /proc/sys/vm/drop_caches: Read-only file system"})
	})
	t.Run("KernelModuleLoad", func(t *testing.T) {
		expect(t, sh("echo junk > /tmp/evil.ko; insmod /tmp/evil.ko; echo rc=$?"), 0,
			[]string{"rc=1"}, []string{"can't insert '/tmp/evil.ko': Operation not permitted"})
	})
	t.Run("Mount", func(t *testing.T) {
		expect(t, sh("mkdir -p /tmp/m; mount -t tmpfs none /tmp/m; echo rc=$?; mount -o remount,rw /; echo rc=$?"), 0,
			// busybox's wording for EPERM from mount(2).
			[]string{"rc=1\nrc=1"}, []string{"mount: permission denied (are you root?)\nmount: permission denied (are you root?)"})
	})
	t.Run("RawSockets", func(t *testing.T) {
		expect(t, api.WorkloadSpec{Image: probeImage, Command: []string{"/probe", "raw", "packet"}}, 0,
			[]string{"raw socket: operation not permitted", "packet socket: operation not permitted"}, nil)
		expect(t, sh("ping -c 1 -W 1 127.0.0.1; echo rc=$?"), 0, []string{"rc=1"}, []string{"ping: permission denied (are you root?)"})
	})
	t.Run("PtraceAndHostProcesses", func(t *testing.T) {
		host := os.Getpid()
		spec := api.WorkloadSpec{Image: probeImage, Command: []string{"sh", "-c",
			fmt.Sprintf("sleep 100 & /probe ptrace=$! ptrace=1 ptrace=%d; kill -0 %d; echo rc=$?; ls /proc/%d; echo rc=$?", host, host, host)}}
		expect(t, spec, 0,
			[]string{"ptrace 1: operation not permitted", fmt.Sprintf("ptrace %d: operation not permitted", host), "rc=1\n", "rc=1"},
			[]string{fmt.Sprintf("can't kill pid %d: No such process", host), fmt.Sprintf("/proc/%d: No such file or directory", host)})
		w, out, _ := run(t, c, spec)
		if strings.Contains(out, ": ok") {
			t.Errorf("a ptrace attach worked (exit %d): %q", exitCode(w), out)
		}
	})
	t.Run("NamespacesAndDevices", func(t *testing.T) {
		expect(t, api.WorkloadSpec{Image: probeImage, Command: []string{"/probe", "unshare", "chroot-escape"}}, 0,
			[]string{"unshare user+mount: operation not permitted", "mknod: operation not permitted"}, nil)
	})
	t.Run("HostFilesInvisible", func(t *testing.T) {
		dir := t.TempDir()
		secret := fmt.Sprintf("berth-host-secret-%d", time.Now().UnixNano())
		marker := filepath.Join(dir, "marker")
		if err := os.WriteFile(marker, []byte(secret), 0o644); err != nil {
			t.Fatal(err)
		}
		script := fmt.Sprintf("cat %s; echo rc=$?; cat /proc/1/root%s; echo rc=$?; find / -xdev -name marker; echo find=$?", marker, marker)
		w, out, errs := run(t, c, sh(script))
		if strings.Contains(out+errs, secret) || strings.Contains(out, "/marker") {
			t.Errorf("the container reached the host's marker file:\nstdout %q\nstderr %q", out, errs)
		}
		if !strings.Contains(errs, "cat: can't open '"+marker+"': No such file or directory") || !strings.Contains(out, "rc=1\nrc=1\nfind=0") {
			t.Errorf("exit %d\nstdout %q\nstderr %q", exitCode(w), out, errs)
		}
	})
	t.Run("ForkBombContained", func(t *testing.T) {
		ctx := context.Background()
		// exec, not a fork: once the bomb holds every pid the container
		// may have, a forked sleep would fail and end the workload.
		spec := sh("bomb() { bomb | bomb & }; bomb; exec sleep 1000")
		spec.Resources.Pids = 64
		sub, err := c.Submit(ctx, spec)
		if err != nil {
			t.Fatal(err)
		}
		// Wait until the bomb has hit its limit, and never see more.
		deadline := time.Now().Add(30 * time.Second)
		var max uint64
		for {
			st, err := c.Stats(ctx, sub.ID)
			if err == nil {
				max = maxU(max, st.Pids)
				if st.PidsLimit != 64 {
					t.Fatalf("pids limit %d, want 64", st.PidsLimit)
				}
				if st.Pids >= 60 {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("the fork bomb never reached its limit (max %d pids, last error %v)", max, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		// The host still forks, and the agent still answers.
		for range 20 {
			if out, err := exec.Command("sh", "-c", "echo host-fine").Output(); err != nil || string(out) != "host-fine\n" {
				t.Fatalf("the host cannot fork while the bomb runs: %v %q", err, out)
			}
			st, err := c.Stats(ctx, sub.ID)
			if err != nil {
				t.Fatalf("stats while the bomb runs: %v", err)
			}
			if st.Pids > 64 {
				t.Fatalf("the bomb has %d processes with a limit of 64", st.Pids)
			}
		}
		w, err := c.Stop(ctx, sub.ID, time.Second)
		if err != nil {
			t.Fatalf("stop the bomb: %v", err)
		}
		if w.State != api.StateExited || exitCode(w) != 137 {
			t.Errorf("bomb after stop: %s exit %d", w.State, exitCode(w))
		}
		if err := c.Delete(ctx, sub.ID, false); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat("/sys/fs/cgroup/pids/berth/" + sub.ID); err == nil {
			t.Error("the bomb's pids cgroup is left")
		}
	})
	t.Run("MemoryBombContained", func(t *testing.T) {
		ctx := context.Background()
		neighbour, err := c.Submit(ctx, sh("sleep 1000"))
		if err != nil {
			t.Fatal(err)
		}
		waitRunning(t, c, neighbour.ID)
		spec := sh("x=$(head -c 500000000 /dev/zero | tr '\\0' x); echo survived ${#x}")
		spec.Resources.MemoryMB = 32
		w, out, _ := run(t, c, spec)
		if exitCode(w) != 137 || !w.OOMKilled || strings.Contains(out, "survived") {
			t.Errorf("memory bomb: exit %d oom_killed %v stdout %q; want 137, true and no survivor", exitCode(w), w.OOMKilled, out)
		}
		n, _, err := c.Get(ctx, neighbour.ID, nil)
		if err != nil || n.State != api.StateRunning {
			t.Errorf("the neighbour of the memory bomb: %v %v, want running", n.State, err)
		}
		if err := c.Ready(ctx); err != nil {
			t.Errorf("agent after the memory bomb: %v", err)
		}
	})
}

func maxU(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// TestPrivilegedNeverAPrivilegedContainer: the built-in policy sends
// privileged: true to a VM; a node without the VM driver refuses it; and
// even a policy that sends it to a container gets the same hardened
// container as everyone else.
func TestPrivilegedNeverAPrivilegedContainer(t *testing.T) {
	c := startAgentWith(t, nil) // the VM driver is off in tests
	ctx := context.Background()
	spec := sh("grep CapEff /proc/self/status")
	spec.Privileged = true
	d, err := c.Place(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if d.Placement.Isolation != api.IsolationVM || d.Placement.DecidingRule != "privileged-to-vm" {
		t.Errorf("built-in policy decides %s by %q for a privileged spec, want vm by privileged-to-vm", d.Placement.Isolation, d.Placement.DecidingRule)
	}
	if _, err := c.Submit(ctx, spec); err == nil {
		t.Fatal("a privileged workload was accepted on a node without VMs")
	} else if !client.IsReason(err, api.ReasonFailedPrecondition) && !client.IsReason(err, api.ReasonUnavailable) && !client.IsReason(err, api.ReasonDenied) {
		t.Errorf("privileged submit without VMs: %v", err)
	}
	if list, _, _ := c.List(ctx, api.ListFilter{}, nil); len(list) != 0 {
		t.Errorf("the refused workload exists: %v", list)
	}

	policy := filepath.Join(t.TempDir(), "policy.yaml")
	os.WriteFile(policy, []byte("apiVersion: berth.dev/v1\nkind: IsolationPolicy\ndefault: container\nrules:\n  - name: privileged-anywhere\n    match:\n      privileged: true\n    isolation: container\n"), 0o600)
	c2 := startAgentWith(t, func(cfg *config.Config) { cfg.Policy.File = policy })
	plain, outPlain, _ := run(t, c2, sh("grep CapEff /proc/self/status"))
	priv, outPriv, _ := run(t, c2, spec)
	if priv.Isolation != api.IsolationContainer || exitCode(priv) != 0 || exitCode(plain) != 0 {
		t.Fatalf("privileged under a permissive policy: %s exit %d (%q)", priv.Isolation, exitCode(priv), priv.Error)
	}
	if outPriv != outPlain {
		t.Errorf("privileged container capabilities %q differ from an ordinary one's %q", outPriv, outPlain)
	}
	var caps uint64
	fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(outPriv, "CapEff:")), "%x", &caps)
	const capSysAdmin, capNetRaw, capSysModule, capSysPtrace = 21, 13, 16, 19
	for _, bit := range []uint{capSysAdmin, capNetRaw, capSysModule, capSysPtrace} {
		if caps&(1<<bit) != 0 {
			t.Errorf("privileged container has capability %d (CapEff %s)", bit, strings.TrimSpace(outPriv))
		}
	}
}
