package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/containernetworking/cni/libcni"
	"golang.org/x/sys/unix"
)

// rawCNI runs the plugin chain berth's node network runs for a container
// (bridge with host-local IPAM, portmap, firewall), by hand, on a bridge
// and subnet of its own: the network half of the bridge baselines.
type rawCNI struct {
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
	dir     string // namespace files, leases, the CNI cache
	bridge  string
	counter atomic.Int64
}

// newRawCNI prepares the chain. The subnet is one berth's default does not
// use; runID keeps bridges of concurrent runs apart.
func newRawCNI(dir, runID string) (*rawCNI, error) {
	if err := os.MkdirAll(filepath.Join(dir, "ns"), 0o700); err != nil {
		return nil, err
	}
	bridge := "bbn" + runID
	if len(bridge) > 15 {
		bridge = bridge[:15]
	}
	ipam := map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": "10.231.0.0/16", "gateway": "10.231.0.1"}}},
		"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
		"dataDir": filepath.Join(dir, "ipam"),
	}
	conf := map[string]any{"cniVersion": "1.0.0", "name": "berthbench-" + runID, "plugins": []map[string]any{
		{"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": true, "hairpinMode": true, "ipam": ipam},
		{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
		{"type": "firewall", "backend": "iptables"},
	}}
	data, err := json.Marshal(conf)
	if err != nil {
		return nil, err
	}
	list, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return nil, err
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{"/usr/lib/cni", "/opt/cni/bin"}, filepath.Join(dir, "cache"), nil)
	return &rawCNI{cni: cni, list: list, dir: dir, bridge: bridge}, nil
}

// attachment is one namespace on the baseline network.
type attachment struct {
	id, netns string
}

// add makes a network namespace and runs CNI ADD into it, as a
// container runtime does by hand before it starts a container.
func (r *rawCNI) add(ctx context.Context) (*attachment, time.Duration, error) {
	a := &attachment{id: fmt.Sprintf("bbn%d", r.counter.Add(1))}
	a.netns = filepath.Join(r.dir, "ns", a.id)
	t0 := time.Now()
	if err := newNetns(a.netns); err != nil {
		return nil, 0, err
	}
	if _, err := r.cni.AddNetworkList(ctx, r.list, r.rt(a)); err != nil {
		_ = removeNetns(a.netns)
		return nil, 0, fmt.Errorf("CNI ADD: %w", err)
	}
	return a, time.Since(t0), nil
}

// del runs CNI DEL and removes the namespace.
func (r *rawCNI) del(ctx context.Context, a *attachment) (time.Duration, error) {
	t0 := time.Now()
	if err := r.cni.DelNetworkList(ctx, r.list, r.rt(a)); err != nil {
		return 0, fmt.Errorf("CNI DEL: %w", err)
	}
	if err := removeNetns(a.netns); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func (r *rawCNI) rt(a *attachment) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: a.id, NetNS: a.netns, IfName: "eth0",
		CapabilityArgs: map[string]any{"portMappings": []map[string]any{}}}
}

// cleanup removes the bridge and whatever namespaces are left (their
// leases and rules go with the run's scratch directory and the bridge).
func (r *rawCNI) cleanup() {
	entries, _ := os.ReadDir(filepath.Join(r.dir, "ns"))
	for _, e := range entries {
		a := &attachment{id: e.Name(), netns: filepath.Join(r.dir, "ns", e.Name())}
		_ = r.cni.DelNetworkList(context.Background(), r.list, r.rt(a))
		_ = removeNetns(a.netns)
	}
	_ = exec.Command("ip", "link", "delete", r.bridge).Run()
}

// newNetns makes a network namespace pinned at path: a thread unshares
// it and bind-mounts it, then dies with it (its goroutine never unlocks).
func newNetns(path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o600)
	if err != nil {
		return err
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		if err := unix.Mount(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), path, "", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("pin network namespace: %w", err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

func removeNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unpin %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}
