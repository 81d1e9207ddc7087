//go:build linux

package pid1

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
)

// TestConfigureNetwork configures one end of a veth pair in a scratch network
// namespace the way berth-init configures a VM's virtio-net NIC.
func TestConfigureNetwork(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a scratch network namespace")
	}
	root := t.TempDir()
	done := make(chan struct{})
	var addrOut, routeOut []byte
	var cfgErr error
	go func() {
		defer close(done)
		// This thread enters a new namespace and never leaves: it stays
		// locked and exits with the goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			cfgErr = err
			return
		}
		if out, err := exec.Command("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1").CombinedOutput(); err != nil {
			cfgErr = &exec.Error{Name: string(out), Err: err}
			return
		}
		cfgErr = configureNetwork(&guest.Network{Interface: "eth0", Address: "10.123.0.7/24", Gateway: "10.123.0.1", DNS: []string{"10.123.0.53", "10.0.0.2"}}, root, time.Second)
		addrOut, _ = exec.Command("ip", "-o", "-4", "addr", "show", "eth0").CombinedOutput()
		routeOut, _ = exec.Command("ip", "route", "show", "default").CombinedOutput()
	}()
	<-done
	if cfgErr != nil {
		t.Fatal(cfgErr)
	}
	if !strings.Contains(string(addrOut), "inet 10.123.0.7/24 brd 10.123.0.255") {
		t.Errorf("address: %s", addrOut)
	}
	if !strings.Contains(string(routeOut), "default via 10.123.0.1 dev eth0") {
		t.Errorf("route: %s", routeOut)
	}
	resolv, err := os.ReadFile(filepath.Join(root, "etc", "resolv.conf"))
	if err != nil || !strings.Contains(string(resolv), "nameserver 10.123.0.53\nnameserver 10.0.0.2\n") {
		t.Errorf("resolv.conf: %q %v", resolv, err)
	}
}

func TestConfigureNetworkMissingInterface(t *testing.T) {
	err := configureNetwork(&guest.Network{Interface: "berthnope0", Address: "10.1.0.2/24"}, "", 50*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "did not appear") {
		t.Errorf("missing interface: %v", err)
	}
}
