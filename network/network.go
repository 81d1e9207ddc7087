// Package network gives workloads their place on the node's network: one
// Linux bridge shared by containers and VMs, addresses from one host-local
// IPAM pool, published ports through the portmap plugin, all driven through
// CNI (libcni and Debian's containernetworking-plugins).
//
//	          host (loopback and its addresses)
//	              |  published ports: portmap DNAT
//	       +------+------ berth0 (bridge, 10.88.0.1/16) ------+
//	       |                                                    |
//	veth <-> eth0 (netns)                             vnetN <-> eth0
//	container 10.88.0.2                               VM 10.88.0.3 (virtio-net)
//
// A container gets a network namespace of its own (a bind-mounted nsfs file
// under the data dir) set up with the CNI list loopback → bridge → portmap →
// firewall. A VM's NIC is a tap libvirt attaches to the same bridge; its
// address comes from the same pool through the list host-local → portmap →
// firewall run in the host's namespace (no interface is made there), and
// the guest init configures it. Each attachment is recorded on disk so it
// can be torn down exactly after an agent restart.
package network

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/fileutil"
)

// Config is the node network.
type Config struct {
	// Name is the CNI network name; default "berth".
	Name string
	// Bridge is the Linux bridge; default "berth0".
	Bridge string
	// Subnet is the pool workloads' addresses come from; default
	// 10.88.0.0/16. The bridge (the gateway) takes its first address.
	Subnet string
	// DNS servers written into workloads' resolv.conf; default: the
	// host's own from /etc/resolv.conf, except loopback ones.
	DNS []string
	// PluginDirs hold the CNI plugins; default /usr/lib/cni, /opt/cni/bin.
	PluginDirs []string
	// DataDir holds namespaces, IPAM leases, CNI's cache and attachment
	// records.
	DataDir string
}

// Kind says how an attachment is made.
type Kind string

const (
	// KindNetns is a container's network namespace on the bridge.
	KindNetns Kind = "netns"
	// KindTap is a VM's address and ports; libvirt makes the tap.
	KindTap Kind = "tap"
)

// Attachment is a workload's place on the network.
type Attachment struct {
	ID   string `json:"id"`
	Kind Kind   `json:"kind"`
	// Netns is the namespace file of a container (KindNetns).
	Netns string `json:"netns,omitempty"`
	// Address is the workload's address with the prefix length.
	Address netip.Prefix `json:"address"`
	Gateway netip.Addr   `json:"gateway"`
	Bridge  string       `json:"bridge"`
	// MAC is the VM NIC's address (KindTap).
	MAC   string            `json:"mac,omitempty"`
	DNS   []string          `json:"dns,omitempty"`
	Ports []api.PortMapping `json:"ports,omitempty"`
}

// Manager attaches and detaches workloads.
type Manager struct {
	cfg     Config
	cni     *libcni.CNIConfig
	ctrList *libcni.NetworkConfigList
	vmList  *libcni.NetworkConfigList
	gateway netip.Addr
	subnet  netip.Prefix
	nsDir   string
	recDir  string
	mu      sync.Mutex // serializes bridge creation
}

// New prepares the manager. Nothing on the host changes until the first
// attachment.
func New(cfg Config) (*Manager, error) {
	if cfg.Name == "" {
		cfg.Name = "berth"
	}
	if cfg.Bridge == "" {
		cfg.Bridge = "berth0"
	}
	if cfg.Subnet == "" {
		cfg.Subnet = "10.88.0.0/16"
	}
	if len(cfg.PluginDirs) == 0 {
		cfg.PluginDirs = []string{"/usr/lib/cni", "/opt/cni/bin"}
	}
	if cfg.DataDir == "" {
		return nil, errors.New("network: a data directory is required")
	}
	subnet, err := netip.ParsePrefix(cfg.Subnet)
	if err != nil || !subnet.Addr().Is4() || subnet.Bits() > 30 {
		return nil, fmt.Errorf("network: subnet %q: want an IPv4 CIDR of at most /30", cfg.Subnet)
	}
	subnet = subnet.Masked()
	if cfg.DNS == nil {
		cfg.DNS = hostDNS()
	}
	m := &Manager{
		cfg:     cfg,
		subnet:  subnet,
		gateway: subnet.Addr().Next(),
		nsDir:   filepath.Join(cfg.DataDir, "netns"),
		recDir:  filepath.Join(cfg.DataDir, "attachments"),
	}
	for _, dir := range []string{m.nsDir, m.recDir, filepath.Join(cfg.DataDir, "ipam"), filepath.Join(cfg.DataDir, "cache")} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	m.cni = libcni.NewCNIConfigWithCacheDir(cfg.PluginDirs, filepath.Join(cfg.DataDir, "cache"), nil)
	if m.ctrList, err = libcni.ConfListFromBytes(m.confList(false)); err != nil {
		return nil, fmt.Errorf("network: container CNI list: %w", err)
	}
	if m.vmList, err = libcni.ConfListFromBytes(m.confList(true)); err != nil {
		return nil, fmt.Errorf("network: VM CNI list: %w", err)
	}
	return m, nil
}

func (m *Manager) ipam() map[string]any {
	return map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": m.subnet.String(), "gateway": m.gateway.String()}}},
		"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
		"dataDir": filepath.Join(m.cfg.DataDir, "ipam"),
	}
}

// confList is the CNI list for containers, or for VMs (no interface: the
// address and the ports only).
func (m *Manager) confList(vm bool) []byte {
	var plugins []map[string]any
	if vm {
		plugins = append(plugins, map[string]any{"type": "host-local", "ipam": m.ipam()})
	} else {
		plugins = append(plugins, map[string]any{
			"type":        "bridge",
			"bridge":      m.cfg.Bridge,
			"isGateway":   true,
			"ipMasq":      true,
			"hairpinMode": true,
			"ipam":        m.ipam(),
		})
	}
	plugins = append(plugins,
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
		map[string]any{"type": "firewall", "backend": "iptables"},
	)
	name := m.cfg.Name
	list := map[string]any{"cniVersion": "1.0.0", "name": name, "plugins": plugins}
	data, _ := json.Marshal(list)
	return data
}

func (m *Manager) runtimeConf(a *Attachment) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: a.ID, NetNS: a.Netns, IfName: "eth0"}
	if a.Kind == KindTap {
		// The VM list makes no interface; plugins still want a namespace.
		rt.NetNS = "/proc/1/ns/net"
	}
	pm := make([]map[string]any, 0, len(a.Ports))
	for _, p := range a.Ports {
		pm = append(pm, map[string]any{"hostPort": p.HostPort, "containerPort": p.ContainerPort, "protocol": p.Protocol})
	}
	rt.CapabilityArgs = map[string]any{"portMappings": pm}
	return rt
}

func (m *Manager) recordPath(id string) string { return filepath.Join(m.recDir, id+".json") }

// Attach gives a workload its place on the network. It is recorded before
// anything is made, so Detach can undo a half-made attachment too.
func (m *Manager) Attach(ctx context.Context, id string, kind Kind, ports []api.PortMapping) (*Attachment, error) {
	a := &Attachment{ID: id, Kind: kind, Bridge: m.cfg.Bridge, Ports: ports, DNS: m.cfg.DNS}
	if kind == KindNetns {
		a.Netns = filepath.Join(m.nsDir, id)
	} else {
		a.MAC = macFor(id)
		if err := m.ensureBridge(); err != nil {
			return nil, err
		}
	}
	if err := fileutil.WriteJSON(m.recordPath(id), a); err != nil {
		return nil, err
	}
	undo := func(err error) (*Attachment, error) {
		if derr := m.Detach(context.WithoutCancel(ctx), id); derr != nil {
			err = errors.Join(err, fmt.Errorf("undo: %w", derr))
		}
		return nil, err
	}
	list := m.vmList
	if kind == KindNetns {
		list = m.ctrList
		if err := newNetns(a.Netns); err != nil {
			return undo(err)
		}
	}
	res, err := m.cni.AddNetworkList(ctx, list, m.runtimeConf(a))
	if err != nil {
		return undo(fmt.Errorf("attach %s to network %s: %w", id, m.cfg.Name, err))
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return undo(err)
	}
	for _, ip := range r.IPs {
		if addr, ok := netip.AddrFromSlice(ip.Address.IP.To4()); ok {
			ones, _ := ip.Address.Mask.Size()
			a.Address = netip.PrefixFrom(addr, ones)
			a.Gateway = m.gateway
			if gw, ok := netip.AddrFromSlice(ip.Gateway.To4()); ok {
				a.Gateway = gw
			}
			break
		}
	}
	if !a.Address.IsValid() {
		return undo(fmt.Errorf("attach %s: the IPAM plugin returned no IPv4 address", id))
	}
	if err := fileutil.WriteJSON(m.recordPath(id), a); err != nil {
		return undo(err)
	}
	return a, nil
}

// Detach undoes an attachment: CNI DEL (releases the address, removes the
// veth and the port and firewall rules) and the namespace. It is
// idempotent: detaching what is not attached does nothing.
func (m *Manager) Detach(ctx context.Context, id string) error {
	var a Attachment
	if err := fileutil.ReadJSON(m.recordPath(id), &a); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("read attachment of %s: %w", id, err)
	}
	list := m.vmList
	if a.Kind == KindNetns {
		list = m.ctrList
	}
	var errs []error
	rt := m.runtimeConf(&a)
	if a.Kind == KindNetns {
		if _, err := os.Stat(a.Netns); err != nil {
			// CNI DEL must still release the address and rules; plugins
			// accept a missing namespace on DEL.
			rt.NetNS = ""
		}
	}
	if err := m.cni.DelNetworkList(ctx, list, rt); err != nil {
		errs = append(errs, fmt.Errorf("detach %s from network %s: %w", id, m.cfg.Name, err))
	}
	if a.Kind == KindNetns {
		if err := removeNetns(a.Netns); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(m.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// List returns the ids of every recorded attachment.
func (m *Manager) List() ([]string, error) {
	entries, err := os.ReadDir(m.recDir)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if id, ok := strings.CutSuffix(e.Name(), ".json"); ok {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// macFor is a stable, locally administered unicast MAC for a workload.
func macFor(id string) string {
	h := sha256.Sum256([]byte("berth-mac:" + id))
	h[0] = (h[0] | 0x02) &^ 0x01
	return net.HardwareAddr(h[:6]).String()
}

// hostDNS returns the host's non-loopback name servers.
func hostDNS() []string {
	data, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return []string{}
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			if ip, err := netip.ParseAddr(f[1]); err == nil && !ip.IsLoopback() {
				out = append(out, ip.String())
			}
		}
	}
	if out == nil {
		out = []string{}
	}
	return out
}

// ResolvConf is the resolv.conf a workload on this network gets.
func (a *Attachment) ResolvConf() []byte {
	var b strings.Builder
	b.WriteString("# written by berth\n")
	for _, s := range a.DNS {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	return []byte(b.String())
}
