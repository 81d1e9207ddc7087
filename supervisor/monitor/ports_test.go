package monitor

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
)

// fakeVM stands in for QEMU: a process whose identity the monitor
// watches, and listening sockets for the guest's ports.
type fakeVM struct {
	cmd   *exec.Cmd
	ident proc.Ident
	lns   map[string]net.Listener
}

func startFakeVM(t *testing.T, dir string, ports ...string) *fakeVM {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	ident, err := proc.Identify(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	vm := &fakeVM{cmd: cmd, ident: ident, lns: map[string]net.Listener{}}
	for _, p := range ports {
		ln, err := net.Listen("unix", filepath.Join(dir, p+".sock"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		vm.lns[p] = ln
	}
	return vm
}

func runPortsMonitor(t *testing.T, dir string, cfg Config) <-chan error {
	t.Helper()
	if err := fileutil.WriteJSON(filepath.Join(dir, ConfigFile), cfg); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- run(dir, nil) }()
	return done
}

// A guest that floods its status channel past the cap is misbehaving: the
// monitor kills its QEMU and records a failure marked as the guest's fault,
// and the status file stays within the cap.
func TestStatusChannelOverflowKillsTheVM(t *testing.T) {
	dir := t.TempDir()
	vm := startFakeVM(t, dir, "status", "stdout")
	const limit = 64 << 10
	done := runPortsMonitor(t, dir, Config{Version: Version, Kind: KindPorts, ID: "t1", LogMaxBytes: 1 << 20, Ports: &PortsConfig{
		QEMU:            vm.ident,
		Sockets:         map[string]string{"status": filepath.Join(dir, "status.sock"), "stdout": filepath.Join(dir, "stdout.sock")},
		Outputs:         map[string]string{"status": filepath.Join(dir, "status.log"), "stdout": filepath.Join(dir, "stdout.log")},
		Durable:         []string{"status"},
		DurableMaxBytes: limit,
	}})
	status, err := vm.lns["status"].Accept()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := vm.lns["stdout"].Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()
	chunk := bytes.Repeat([]byte("x"), 4096)
	go func() {
		defer status.Close()
		for range 1024 { // 4 MiB, far past the cap
			if _, err := status.Write(chunk); err != nil {
				return
			}
		}
	}()
	exited := make(chan error, 1)
	go func() { exited <- vm.cmd.Wait() }()
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		t.Fatal("the monitor did not kill the VM that flooded its status channel")
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "status channel") {
			t.Errorf("monitor returned %v, want the overflow", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the monitor did not end after the VM did")
	}
	var st Status
	if err := fileutil.ReadJSON(filepath.Join(dir, StatusFile), &st); err != nil {
		t.Fatal(err)
	}
	if st.State != StateFailed || !st.GuestFault || !strings.Contains(st.Error, "status channel") {
		t.Errorf("status = %+v, want failed, guest fault, naming the status channel", st)
	}
	fi, err := os.Stat(filepath.Join(dir, "status.log"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > limit {
		t.Errorf("status.log is %d bytes, over the %d cap", fi.Size(), limit)
	}
}

// Within the cap, the channel's bytes land whole and the monitor ends
// cleanly with the VM.
func TestPortsDrainUntilTheVMEnds(t *testing.T) {
	dir := t.TempDir()
	vm := startFakeVM(t, dir, "status")
	done := runPortsMonitor(t, dir, Config{Version: Version, Kind: KindPorts, ID: "t2", Ports: &PortsConfig{
		QEMU:            vm.ident,
		Sockets:         map[string]string{"status": filepath.Join(dir, "status.sock")},
		Outputs:         map[string]string{"status": filepath.Join(dir, "status.log")},
		Durable:         []string{"status"},
		DurableMaxBytes: 1 << 20,
	}})
	c, err := vm.lns["status"].Accept()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("exit 3\n")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	_ = vm.cmd.Process.Kill()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("monitor: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("monitor did not end with the VM")
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "status.log")); string(data) != "exit 3\n" {
		t.Errorf("status.log = %q", data)
	}
	var st Status
	if err := fileutil.ReadJSON(filepath.Join(dir, StatusFile), &st); err != nil || st.State != StateExited {
		t.Errorf("status = %+v, %v; want exited", st, err)
	}
}
