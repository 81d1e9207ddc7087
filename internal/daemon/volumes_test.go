package daemon_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
)

// volumeAgent runs an agent (containers only, user namespaces as
// configured by default) that allows host paths below the returned
// directory.
func volumeAgent(t *testing.T, vms bool, change ...func(*config.Config)) (*client.Client, string, string) {
	t.Helper()
	requireRunc(t)
	if vms {
		requireLibvirt(t)
	}
	allowed := t.TempDir()
	// A data dir other users may pass through, as /var/lib/berth is, so
	// containers get user namespaces.
	dataDir := filepath.Join(vmDataDir(t), "data")
	cfg := testConfig(t, dataDir, "127.0.0.1:0")
	cfg.Volumes.HostPaths = []string{allowed}
	if vms {
		cfg = withVMs(t, cfg)
	}
	for _, ch := range change {
		ch(cfg)
	}
	c, _ := serve(t, cfg)
	importBusybox(t, c)
	requireUserNS(t, c)
	t.Cleanup(func() {
		ctx := context.Background()
		deleteAll(t, c)
		vols, _ := c.Volumes(ctx)
		for _, v := range vols {
			if err := c.DeleteVolume(ctx, api.Ref(v.Tenant, v.Name)); err != nil {
				t.Errorf("cleanup: delete volume %s: %v", v.Name, err)
			}
		}
	})
	return c, dataDir, allowed
}

func withVolumes(spec api.WorkloadSpec, vols ...api.VolumeMount) api.WorkloadSpec {
	return in(api.IsolationContainer, spec, vols...)
}

func in(iso api.Isolation, spec api.WorkloadSpec, vols ...api.VolumeMount) api.WorkloadSpec {
	spec.Volumes = vols
	spec.Isolation = iso
	return spec
}

// The same volume, a container's and a VM's: what the container writes
// the VM reads (and exits with a code derived from it), and the other way
// round; read-only is read-only in the VM too; node status says which
// transport VMs use.
func TestVMVolumes(t *testing.T) { vmVolumes(t, "auto", "virtiofs") }

// TestVMVolumes9p is TestVMVolumes over 9p, the transport where virtio-fs
// cannot work: QEMU serves it as its unprivileged user, through staged
// mounts that show it each volume as its own.
func TestVMVolumes9p(t *testing.T) { vmVolumes(t, "9p", "9p") }

func vmVolumes(t *testing.T, transportConfig, want string) {
	c, dataDir, allowed := volumeAgent(t, true, func(cfg *config.Config) { cfg.VM.VolumeTransport = transportConfig })
	ctx := context.Background()
	n, _, err := c.Node(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	transport := n.Drivers[string(api.IsolationVM)].Details["volumes"]
	if transport != want {
		t.Fatalf("vm driver details: volumes %q (%s)", transport, n.Drivers[string(api.IsolationVM)].Details["volumes_reason"])
	}
	t.Logf("volumes reach VMs over %s", transport)
	if _, err := c.CreateVolume(ctx, api.VolumeSpec{Name: "both"}); err != nil {
		t.Fatal(err)
	}
	data := api.VolumeMount{Name: "both", Path: "/data"}
	w, out, errOut := run(t, c, in(api.IsolationContainer, sh("echo 17 > /data/from-container"), data))
	if exitCode(w) != 0 {
		t.Fatalf("container writer: exit %d %q %q", exitCode(w), out, errOut)
	}
	w, out, errOut = run(t, c, in(api.IsolationVM, sh("n=$(cat /data/from-container) && echo $((n * 2)) > /data/from-vm && exit $((n + 3))"), data))
	if w.Isolation != api.IsolationVM || exitCode(w) != 20 {
		t.Errorf("vm reader: %s exit %d (%q) %q %q, want vm exit 20", w.Isolation, exitCode(w), w.Error, out, errOut)
	}
	w, out, errOut = run(t, c, in(api.IsolationContainer, sh("exit $(cat /data/from-vm)"), data))
	if exitCode(w) != 34 {
		t.Errorf("container reading what the vm wrote: exit %d %q %q, want 34", exitCode(w), out, errOut)
	}
	// What the VM's root wrote is root's on disk, whichever transport.
	if m, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "*", "data", "from-vm")); len(m) != 1 {
		t.Errorf("the VM's file on the host: %v", m)
	} else if st, err := os.Stat(m[0]); err != nil {
		t.Error(err)
	} else if uid := ownerOf(st); uid != 0 {
		t.Errorf("the VM's file is host uid %d on disk, want 0", uid)
	}
	// Read-only in the VM: reads work, writes fail; nothing reaches the
	// volume.
	ro := api.VolumeMount{Name: "both", Path: "/data", ReadOnly: true}
	w, out, errOut = run(t, c, in(api.IsolationVM, sh("cat /data/from-vm; echo x > /data/ro-write && exit 0; exit 9"), ro))
	if exitCode(w) != 9 || out != "34\n" {
		t.Errorf("vm read-only: exit %d %q %q, want 9 after reading 34", exitCode(w), out, errOut)
	}
	w, _, _ = run(t, c, in(api.IsolationContainer, sh("test -e /data/ro-write"), data))
	if exitCode(w) == 0 {
		t.Error("a read-only VM mount wrote into the volume")
	}
	// An allowed host path, read-only, reaches the VM as well.
	must(t, os.WriteFile(filepath.Join(allowed, "n"), []byte("5\n"), 0o644))
	w, _, errOut = run(t, c, in(api.IsolationVM, sh("exit $(cat /host/n)"), api.VolumeMount{HostPath: allowed, Path: "/host", ReadOnly: true}))
	if exitCode(w) != 5 {
		t.Errorf("vm host path: exit %d %q, want 5", exitCode(w), errOut)
	}
	// Deleting the workloads releases their file servers and mounts.
	deleteAll(t, c)
	if procs := processesWith(t, dataDir); len(procs) != 0 {
		t.Errorf("processes left holding the data dir after the deletes: %v", procs)
	}
	if staged, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "mounts", "*")); len(staged) != 0 {
		t.Errorf("staged mounts left: %v", staged)
	}
}

// processesWith lists the processes (pid: command line) whose command
// line mentions s: a virtiofsd or QEMU serving a task under the data dir.
func processesWith(t *testing.T, s string) []string {
	t.Helper()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), s) {
			out = append(out, e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

// Containers share a named volume: what one writes (as its root, in its
// own user namespace range) the next reads and can overwrite, though its
// range differs; read-only is read-only; a sized volume is ENOSPC when
// full; the volume outlives its workloads and cannot be deleted while one
// holds it.
func TestContainerVolumes(t *testing.T) {
	c, dataDir, allowed := volumeAgent(t, false)
	ctx := context.Background()
	if _, err := c.CreateVolume(ctx, api.VolumeSpec{Name: "shared"}); err != nil {
		t.Fatal(err)
	}
	w, out, errOut := run(t, c, withVolumes(sh("echo 42 > /data/answer && id -u && stat -c %u /data/answer"), api.VolumeMount{Name: "shared", Path: "/data"}))
	if exitCode(w) != 0 || out != "0\n0\n" {
		t.Fatalf("writer: exit %d, %q %q, want root writing as root", exitCode(w), out, errOut)
	}
	// On disk the file belongs to uid 0: the id-mapped mount stores the
	// container's root as the host's, whatever its range.
	var volDir string
	matches, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "*", "data", "answer"))
	if len(matches) != 1 {
		t.Fatalf("the file on the host: %v", matches)
	}
	volDir = filepath.Dir(matches[0])
	st, err := os.Stat(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	if uid := ownerOf(st); uid != 0 {
		t.Errorf("the file a container's root wrote is host uid %d on disk, want 0", uid)
	}
	w, out, errOut = run(t, c, withVolumes(sh("cat /data/answer; echo more >> /data/answer && exit $(head -1 /data/answer)"), api.VolumeMount{Name: "shared", Path: "/data"}))
	if exitCode(w) != 42 || out != "42\n" {
		t.Errorf("reader: exit %d, %q %q, want 42", exitCode(w), out, errOut)
	}
	w, _, errOut = run(t, c, withVolumes(sh("cat /data/answer >/dev/null && echo x > /data/other"), api.VolumeMount{Name: "shared", Path: "/data", ReadOnly: true}))
	if exitCode(w) == 0 || !strings.Contains(errOut, "Read-only file system") {
		t.Errorf("read-only: exit %d %q, want a read-only file system", exitCode(w), errOut)
	}
	if _, err := os.Stat(filepath.Join(volDir, "other")); !os.IsNotExist(err) {
		t.Errorf("a read-only mount wrote: %v", err)
	}

	// Host paths: one the operator allows is mounted (read-only here);
	// a symlink out of it and a path outside are refused at submit.
	must(t, os.WriteFile(filepath.Join(allowed, "motd"), []byte("hello\n"), 0o644))
	must(t, os.Symlink("/etc", filepath.Join(allowed, "etc")))
	w, out, _ = run(t, c, withVolumes(sh("cat /host/motd; touch /host/x"), api.VolumeMount{HostPath: allowed, Path: "/host", ReadOnly: true}))
	if out != "hello\n" || exitCode(w) == 0 {
		t.Errorf("host path: exit %d %q, want hello and a failed touch", exitCode(w), out)
	}
	// A host path that is a noexec mount of its own (as Nomad's secrets
	// tmpfs is): in a user namespace its flags are locked, and the bind
	// keeps them.
	tmpfs := filepath.Join(allowed, "tmpfs")
	must(t, os.Mkdir(tmpfs, 0o755))
	must(t, syscall.Mount("tmpfs", tmpfs, "tmpfs", syscall.MS_NOEXEC|syscall.MS_NOSUID|syscall.MS_NODEV, "size=1m"))
	t.Cleanup(func() { _ = syscall.Unmount(tmpfs, syscall.MNT_DETACH) })
	must(t, os.WriteFile(filepath.Join(tmpfs, "token"), []byte("s3cret\n"), 0o600))
	w, out, errOut = run(t, c, withVolumes(sh("cat /secrets/token"), api.VolumeMount{HostPath: tmpfs, Path: "/secrets"}))
	if exitCode(w) != 0 || out != "s3cret\n" {
		t.Errorf("a noexec tmpfs host path: exit %d %q %q (%s)", exitCode(w), out, errOut, w.Error)
	}
	// Below the allowed directory, a suid,dev mount (writable: a setuid
	// root file the container made there would work on the host) and a
	// bind mount of /proc and of the data directory.
	suid, proc, data := filepath.Join(allowed, "suid"), filepath.Join(allowed, "proc"), filepath.Join(allowed, "data")
	for _, d := range []string{suid, proc, data} {
		must(t, os.Mkdir(d, 0o755))
		t.Cleanup(func() { _ = syscall.Unmount(d, syscall.MNT_DETACH) })
	}
	must(t, syscall.Mount("tmpfs", suid, "tmpfs", 0, "size=1m"))
	must(t, syscall.Mount("/proc", proc, "", syscall.MS_BIND|syscall.MS_REC, ""))
	must(t, syscall.Mount(dataDir, data, "", syscall.MS_BIND, ""))
	for _, hp := range []string{filepath.Join(allowed, "etc"), "/etc", "/", dataDir, suid, proc, data} {
		_, err := c.Submit(ctx, withVolumes(sh("true"), api.VolumeMount{HostPath: hp, Path: "/host"}))
		if !client.IsReason(err, api.ReasonInvalidArgument) || !strings.Contains(err.Error(), "volumes[0].host_path") {
			t.Errorf("host path %s: %v, want refused naming volumes[0].host_path", hp, err)
		}
	}

	// A sized volume: full is ENOSPC inside the container.
	if _, err := c.CreateVolume(ctx, api.VolumeSpec{Name: "small", SizeBytes: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	w, _, errOut = run(t, c, withVolumes(sh("dd if=/dev/zero of=/small/fill bs=1M count=64"), api.VolumeMount{Name: "small", Path: "/small"}))
	if exitCode(w) == 0 || !strings.Contains(errOut, "No space left on device") {
		t.Errorf("filling a 16 MiB volume: exit %d %q, want ENOSPC", exitCode(w), errOut)
	}

	// In use: refused with its users; after the workloads go, removed.
	sub, err := c.Submit(ctx, withVolumes(sh("sleep 60"), api.VolumeMount{Name: "shared", Path: "/data"}))
	if err != nil {
		t.Fatal(err)
	}
	waitRunning(t, c, sub.ID)
	err = c.DeleteVolume(ctx, "shared")
	if !client.IsReason(err, api.ReasonConflict) || !strings.Contains(err.Error(), sub.ID) {
		t.Errorf("delete of a volume in use: %v, want 409 naming %s", err, sub.ID)
	}
	deleteAll(t, c)
	if b, err := os.ReadFile(filepath.Join(volDir, "answer")); err != nil || string(b) != "42\nmore\n" {
		t.Errorf("the volume after its workloads were deleted: %q %v", b, err)
	}
	if staged, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "mounts", "*")); len(staged) != 0 {
		t.Errorf("staged mounts left after the workloads were deleted: %v", staged)
	}
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), filepath.Join(dataDir, "volumes", "mounts")) || strings.Contains(string(mi), "/volumes/") && strings.Contains(string(mi), dataDir+"/userns") {
		t.Errorf("volume mounts left after the workloads were deleted")
	}
	if err := c.DeleteVolume(ctx, "shared"); err != nil {
		t.Errorf("delete an unused volume: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func ownerOf(st os.FileInfo) uint32 { return st.Sys().(*syscall.Stat_t).Uid }

// TestVMVolumeSurvivesAgentSIGKILL: the agent dies while a VM workload
// uses a volume over virtio-fs; after the restart the workload still
// runs and its volume still works both ways: a container writes a file
// into it, and the VM reads it and exits with the code it holds. Deleting
// it afterwards leaves no file server and no mount.
func TestVMVolumeSurvivesAgentSIGKILL(t *testing.T) {
	requireLibvirt(t)
	dataDir := filepath.Join(vmDataDir(t), "data")
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nnetwork:\n  enabled: false\nvm:\n  accel: tcg\n  init_path: %s\nworkload_defaults:\n  stop_timeout: 2s\n  cpu: 0.05\n", addr, dataDir, berthInit(t))
	must(t, os.WriteFile(cfgFile, []byte(cfg), 0o600))
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	t.Cleanup(func() {
		deleteAll(t, c)
		_ = c.DeleteVolume(context.Background(), "live")
		p.kill()
	})
	importBusybox(t, c)
	ctx := context.Background()
	if _, err := c.CreateVolume(ctx, api.VolumeSpec{Name: "live", SizeBytes: 16 << 20}); err != nil {
		t.Fatal(err)
	}
	vol := api.VolumeMount{Name: "live", Path: "/data"}
	// Counts into the volume until a file "go" appears, then exits with
	// the number in it (after at most 3 minutes: 99).
	sub, err := c.Submit(ctx, in(api.IsolationVM, sh(`i=0; while [ ! -s /data/go ] && [ $i -lt 720 ]; do echo $i > /data/vm-ticks; i=$((i+1)); sleep 0.25; done; [ -s /data/go ] && exit $(cat /data/go); exit 99`), vol))
	if err != nil {
		t.Fatal(err)
	}
	matches, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "*", "data"))
	if len(matches) != 1 {
		t.Fatalf("volume data dirs: %v", matches)
	}
	ticks := func() string {
		b, _ := os.ReadFile(filepath.Join(matches[0], "vm-ticks"))
		return strings.TrimSpace(string(b))
	}
	deadline := time.Now().Add(4 * time.Minute)
	for ticks() == "" {
		if time.Now().After(deadline) {
			w, _, _ := c.Get(ctx, sub.ID, nil)
			t.Fatalf("the VM wrote nothing into its volume in 4 minutes: %+v\n%s", w, p.stderr)
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
	before := ticks()
	deadline = time.Now().Add(20 * time.Second)
	for ticks() == before {
		if time.Now().After(deadline) {
			t.Fatalf("the VM stopped writing into its volume at %s after the agent restart", before)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if v, err := c.Volume(ctx, "live"); err != nil || len(v.UsedBy) != 1 || v.UsedBy[0] != sub.ID {
		t.Errorf("volume after the restart: %+v %v, want used by %s", v, err, sub.ID)
	}
	wr, out, errOut := run(t, c, in(api.IsolationContainer, sh("echo 23 > /data/go"), vol))
	if exitCode(wr) != 0 {
		t.Fatalf("container writing into the VM's volume: exit %d %q %q", exitCode(wr), out, errOut)
	}
	end, err := c.WaitExit(ctx, sub.ID)
	if err != nil {
		t.Fatal(err)
	}
	if end.State != api.StateExited || exitCode(end) != 23 {
		t.Errorf("VM workload ended %s exit %d (%q), want exited 23: it read what the container wrote", end.State, exitCode(end), end.Error)
	}
	deleteAll(t, c)
	if procs := processesWith(t, dataDir); len(procs) != 0 {
		t.Errorf("processes left holding the data dir after the deletes: %v", procs)
	}
	if staged, _ := filepath.Glob(filepath.Join(dataDir, "volumes", "mounts", "*")); len(staged) != 0 {
		t.Errorf("staged mounts left: %v", staged)
	}
}
