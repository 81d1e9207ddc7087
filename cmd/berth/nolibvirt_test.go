package main

// These tests build the shipped binary as the Makefile does (with the
// libvirt bindings' libvirt_dlopen tag) and prove the promise of issue 14
// item 4: the CLI runs on a machine without libvirt's libraries, and the
// agent in the same binary still drives libvirt where it is installed.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/berthd/berth/api"
)

var (
	dlopenOnce sync.Once
	dlopenDir  string
	dlopenErr  error
)

// dlopenBuild builds berth with -tags libvirt_dlopen and a static
// berth-init next to it (where the VM driver looks for it), once per test
// binary. The directory is mode 0711 so QEMU could traverse it.
func dlopenBuild(t *testing.T) (berth string) {
	t.Helper()
	dlopenOnce.Do(func() {
		if dlopenDir, dlopenErr = traversableTemp(); dlopenErr != nil {
			return
		}
		build := exec.Command("go", "build", "-tags", "libvirt_dlopen", "-o", filepath.Join(dlopenDir, "berth"), ".")
		if out, err := build.CombinedOutput(); err != nil {
			dlopenErr = fmt.Errorf("go build -tags libvirt_dlopen ./cmd/berth: %v\n%s", err, out)
			return
		}
		build = exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dlopenDir, "berth-init"), "github.com/berthd/berth/cmd/berth-init")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			dlopenErr = fmt.Errorf("build berth-init: %v\n%s", err, out)
		}
	})
	if dlopenErr != nil {
		t.Fatal(dlopenErr)
	}
	return filepath.Join(dlopenDir, "berth")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if dlopenDir != "" {
		os.RemoveAll(dlopenDir)
	}
	os.Exit(code)
}

// TestBinaryLinksNoLibvirt: the dynamic linker does not need any of
// libvirt's libraries (libvirt, -qemu, -lxc, -admin) to start berth.
func TestBinaryLinksNoLibvirt(t *testing.T) {
	berth := dlopenBuild(t)
	if _, err := exec.LookPath("ldd"); err != nil {
		t.Skip("ldd is not installed (Debian: libc-bin)")
	}
	out, err := exec.Command("ldd", berth).CombinedOutput()
	if err != nil {
		t.Fatalf("ldd %s: %v\n%s", berth, err, out)
	}
	if strings.Contains(string(out), "libvirt") {
		t.Fatalf("berth built with libvirt_dlopen still links libvirt:\n%s", out)
	}
}

// TestCLIWithoutLibvirt runs berth where libvirt's libraries cannot be
// found: in a private mount namespace whose library directory is replaced
// by one holding every file but libvirt*. There the CLI's commands work
// (version, ps, node status against an agent), and the agent, also
// started there, runs and reports its VM driver unhealthy with the reason
// instead of crashing. The agent in that namespace is the proof that
// libvirt.so.0 is really out of reach: its reason is the failed dlopen.
func TestCLIWithoutLibvirt(t *testing.T) {
	requireNamespaces(t)
	berth := dlopenBuild(t)
	libDir := libvirtDir(t)

	dir := tempDir(t)
	orig, shadow := filepath.Join(dir, "orig"), filepath.Join(dir, "shadow")
	// Every name in the library directory but libvirt* links to the
	// original (bind-mounted aside first, so the links do not point into
	// the directory that now covers it).
	hide := `set -e
mkdir -p "$ORIG" "$SHADOW"
mount --bind "$LIBDIR" "$ORIG"
mount -t tmpfs tmpfs "$SHADOW"
for f in "$ORIG"/*; do
	case "${f##*/}" in libvirt*) ;; *) ln -s "$f" "$SHADOW/" ;; esac
done
mount --bind "$SHADOW" "$LIBDIR"
exec "$@"`
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	agent := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", hide, "hide",
		berth, "agent", "--data-dir", filepath.Join(dir, "data"), "--listen", addr, "--listen-unix", filepath.Join(dir, "berth.sock"))
	agent.Env = append(agentEnv(), "ORIG="+orig, "SHADOW="+shadow, "LIBDIR="+libDir)
	startAgent(t, agent, dir)

	// Client commands run in the agent's mount namespace.
	ns := fmt.Sprintf("--mount=/proc/%d/ns/mnt", agent.Process.Pid)
	inNS := func(args ...string) (string, error) {
		cmd := exec.Command("nsenter", append([]string{ns, "--", berth}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return string(out), fmt.Errorf("berth %s: %w: %s", strings.Join(args, " "), err, stderr.String())
		}
		return string(out), nil
	}
	n := waitNode(t, func() (string, error) { return inNS("--addr", addr, "-o", "json", "node", "status") },
		func(n *api.Node) bool { vm, ok := n.Drivers["vm"]; return ok && (vm.Healthy || vm.Reason != "") })

	if out, err := exec.Command("nsenter", ns, "--", "sh", "-c", `ls "$0"/libvirt* 2>/dev/null || true`, libDir).Output(); err != nil || len(out) > 0 {
		t.Fatalf("libvirt is still visible in the namespace (err %v):\n%s", err, out)
	}
	vm := n.Drivers["vm"]
	if vm.Healthy || !strings.Contains(vm.Reason, "libvirt.so.0") {
		t.Fatalf("vm driver without libvirt: healthy %v, reason %q; want unhealthy, naming libvirt.so.0", vm.Healthy, vm.Reason)
	}
	t.Logf("vm driver without libvirt: %s", vm.Reason)

	out, err := inNS("--version")
	if err != nil || !strings.HasPrefix(out, "berth version") {
		t.Fatalf("berth --version: %q, %v", out, err)
	}
	out, err = inNS("--addr", "http://"+addr, "ps")
	if err != nil || !strings.HasPrefix(out, "ID") {
		t.Fatalf("berth ps: %q, %v", out, err)
	}
}

// TestAgentDlopenVMDriverHealthy: the agent of the dlopen build finds
// libvirt at run time, connects, and reports its VM driver healthy.
func TestAgentDlopenVMDriverHealthy(t *testing.T) {
	if testing.Short() {
		t.Skip("runs an agent against libvirtd: not in -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("the agent's VM driver needs root")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		t.Skip("libvirtd is not installed; `make test` installs libvirt-daemon-system")
	}
	if _, err := os.Stat("/run/libvirt/libvirt-sock"); err != nil {
		t.Skip("libvirtd is not running (/run/libvirt/libvirt-sock is missing); start it with `libvirtd -d` and `virtlogd -d`")
	}
	berth := dlopenBuild(t)
	dir := tempDir(t)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	agent := exec.Command(berth, "agent", "--data-dir", filepath.Join(dir, "data"), "--listen", addr, "--listen-unix", filepath.Join(dir, "berth.sock"))
	agent.Env = agentEnv()
	startAgent(t, agent, dir)

	n := waitNode(t, func() (string, error) {
		out, err := exec.Command(berth, "--addr", addr, "-o", "json", "node", "status").Output()
		return string(out), err
	}, func(n *api.Node) bool { vm, ok := n.Drivers["vm"]; return ok && vm.Healthy })
	vm := n.Drivers["vm"]
	if vm.Details["libvirt_version"] == "" {
		t.Fatalf("vm driver healthy but no libvirt version: %+v", vm)
	}
	t.Logf("vm driver: libvirt %s, accel %s", vm.Details["libvirt_version"], vm.Details["accel"])
}

func requireNamespaces(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root and mount namespaces: not in -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("hiding libvirt's libraries needs root (a private mount namespace)")
	}
	for _, tool := range []string{"unshare", "nsenter", "ldconfig"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (Debian: util-linux, libc-bin)", tool)
		}
	}
}

// libvirtDir is the directory the dynamic linker finds libvirt.so.0 in.
func libvirtDir(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ldconfig", "-p").Output()
	if err != nil {
		t.Fatalf("ldconfig -p: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && f[0] == "libvirt.so.0" {
			p, err := filepath.EvalSymlinks(f[len(f)-1])
			if err != nil {
				t.Fatal(err)
			}
			return filepath.Dir(p)
		}
	}
	t.Skip("libvirt.so.0 is not installed, so there is nothing to hide (TestBinaryLinksNoLibvirt still checks the link)")
	return ""
}

// tempDir is a scratch directory others can traverse (QEMU runs as an
// unprivileged user and reaches the task disks under the data dir).
func tempDir(t *testing.T) string {
	t.Helper()
	dir, err := traversableTemp()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func traversableTemp() (string, error) {
	dir, err := os.MkdirTemp("", "berth-nolibvirt-")
	if err == nil {
		err = os.Chmod(dir, 0o711)
	}
	return dir, err
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// agentEnv runs only the VM driver, forced to TCG so no KVM probe guest
// boots, and no node network (its bridge is shared with other tests).
func agentEnv() []string {
	return append(os.Environ(),
		"BERTH_CONTAINER_ENABLED=false",
		"BERTH_NETWORK_ENABLED=false",
		"BERTH_VM_ACCEL=tcg",
		"BERTH_LOG_LEVEL=debug",
	)
}

// startAgent starts cmd with its output in a file of dir, and stops it
// (SIGTERM, then SIGKILL) at cleanup, showing the output if the test failed.
func startAgent(t *testing.T, cmd *exec.Cmd, dir string) {
	t.Helper()
	logPath := filepath.Join(dir, "agent.log")
	logs, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close() // the agent has its own copy
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the agent: %v", err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("agent log:\n%s", out)
		}
	})
}

// waitNode polls the node status until ready(node) holds.
func waitNode(t *testing.T, status func() (string, error), ready func(*api.Node) bool) *api.Node {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var last error
	for {
		out, err := status()
		if err == nil {
			var n api.Node
			if err = json.Unmarshal([]byte(out), &n); err == nil {
				if ready(&n) {
					return &n
				}
				err = errors.New("not yet: " + out)
			}
		}
		last = err
		select {
		case <-ctx.Done():
			t.Fatalf("node status did not get there in 90s: %v", last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
