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
// the guest init configures it.
//
// Each attachment is recorded on disk before anything is made for it, so
// it can be torn down after an agent crash at any step, an agent restart
// or a host reboot (which keeps the files and drops the kernel objects):
// attach and detach are safe to repeat at any point.
package network

import (
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

// State is how far an attachment got.
type State string

const (
	// StateAttaching is recorded before anything is made: a crash from
	// then on leaves a record that Detach (or the next Attach) tears down
	// from.
	StateAttaching State = "attaching"
	// StateAttached is recorded once every step is done.
	StateAttached State = "attached"
)

// Attachment is a workload's place on the network, as recorded on disk.
type Attachment struct {
	ID   string `json:"id"`
	Kind Kind   `json:"kind"`
	// Network is the CNI network it was made on: teardown uses it, not the
	// configuration of the day.
	Network string `json:"network,omitempty"`
	State   State  `json:"state,omitempty"`
	// Netns is the namespace file of a container (KindNetns).
	Netns string `json:"netns,omitempty"`
	// Address is the workload's address with the prefix length.
	Address netip.Prefix `json:"address"`
	Gateway netip.Addr   `json:"gateway"`
	Bridge  string       `json:"bridge"`
	// HostVeth is the host's end of a container's veth pair.
	HostVeth string `json:"host_veth,omitempty"`
	// MAC is the VM NIC's address (KindTap).
	MAC   string            `json:"mac,omitempty"`
	DNS   []string          `json:"dns,omitempty"`
	Ports []api.PortMapping `json:"ports,omitempty"`
	// DetachError is why the last detach failed (see ErrRepeatedFailure).
	DetachError string `json:"detach_error,omitempty"`
}

// complete reports whether every step of the attachment was done. Records
// written before states existed were written only when complete.
func (a *Attachment) complete() bool {
	return a.State == StateAttached || (a.State == "" && a.Address.IsValid())
}

// Manager attaches and detaches workloads.
type Manager struct {
	cfg     Config
	cni     *libcni.CNIConfig
	ctrList *libcni.NetworkConfigList
	vmList  *libcni.NetworkConfigList
	// ctrCheck and vmCheck are the lists CHECK runs (see confList).
	ctrCheck *libcni.NetworkConfigList
	vmCheck  *libcni.NetworkConfigList
	gateway  netip.Addr
	subnet   netip.Prefix
	nsDir    string
	recDir   string
	mu       sync.Mutex // serializes bridge creation
	ids      idLocks    // one attach or detach of an id at a time

	// crashAt, set by tests, is called at each step boundary of Attach
	// and of teardown; it panics to stop them where a SIGKILL would: no
	// undo runs.
	crashAt func(point string)
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
	for _, dir := range []string{m.nsDir, m.recDir, m.ipamDir(), m.cacheDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	// A crash inside an atomic write leaves its temporary file behind.
	tmps, _ := filepath.Glob(filepath.Join(m.recDir, ".*.json.tmp*"))
	for _, tmp := range tmps {
		os.Remove(tmp)
	}
	m.cni = libcni.NewCNIConfigWithCacheDir(cfg.PluginDirs, m.cacheDir(), nil)
	for _, l := range []struct {
		list        **libcni.NetworkConfigList
		vm, portmap bool
	}{{&m.ctrList, false, true}, {&m.vmList, true, true}, {&m.ctrCheck, false, false}, {&m.vmCheck, true, false}} {
		if *l.list, err = libcni.ConfListFromBytes(m.confList(cfg.Name, l.vm, l.portmap)); err != nil {
			return nil, fmt.Errorf("network: CNI list: %w", err)
		}
	}
	return m, nil
}

func (m *Manager) ipamDir() string  { return filepath.Join(m.cfg.DataDir, "ipam") }
func (m *Manager) cacheDir() string { return filepath.Join(m.cfg.DataDir, "cache") }

func (m *Manager) ipam() map[string]any {
	return map[string]any{
		"type":    "host-local",
		"ranges":  [][]map[string]string{{{"subnet": m.subnet.String(), "gateway": m.gateway.String()}}},
		"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
		"dataDir": m.ipamDir(),
	}
}

// confList is the CNI list for containers, or for VMs (no interface: the
// address and the ports only). Without portmap it is the list CNI CHECK
// runs: Debian's portmap (1.1.1) fails CHECK on an IPv4-only attachment
// (it looks for an IPv6 chain it never made), so the ports are checked
// apart (portsPresent).
func (m *Manager) confList(name string, vm, portmap bool) []byte {
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
	if portmap {
		plugins = append(plugins, map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true})
	}
	plugins = append(plugins, map[string]any{"type": "firewall", "backend": "iptables"})
	list := map[string]any{"cniVersion": "1.0.0", "name": name, "plugins": plugins}
	data, _ := json.Marshal(list)
	return data
}

// list is the CNI list an attachment was made with. A record from an
// earlier configuration keeps its network name: the name keys the leases,
// the CNI cache and the plugins' iptables chains.
func (m *Manager) list(a *Attachment) (*libcni.NetworkConfigList, error) {
	if a.Network == "" || a.Network == m.cfg.Name {
		if a.Kind == KindTap {
			return m.vmList, nil
		}
		return m.ctrList, nil
	}
	l, err := libcni.ConfListFromBytes(m.confList(a.Network, a.Kind == KindTap, true))
	if err != nil {
		return nil, fmt.Errorf("CNI list of network %q: %w", a.Network, err)
	}
	return l, nil
}

func (m *Manager) runtimeConf(a *Attachment) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: a.ID, NetNS: a.Netns, IfName: ifName}
	if a.Kind == KindTap {
		// The VM list makes no interface; plugins still want a namespace.
		rt.NetNS = "/proc/1/ns/net"
	}
	pm := make([]map[string]any, 0, len(a.Ports))
	for _, p := range a.Ports {
		proto := p.Protocol
		if proto == "" {
			proto = "tcp"
		}
		pm = append(pm, map[string]any{"hostPort": p.HostPort, "containerPort": p.ContainerPort, "protocol": proto})
	}
	rt.CapabilityArgs = map[string]any{"portMappings": pm}
	return rt
}

// ifName is the workload's interface; CNI keys leases and cache entries
// by container id and interface.
const ifName = "eth0"

func (m *Manager) recordPath(id string) string { return filepath.Join(m.recDir, id+".json") }

// List returns the ids of every recorded attachment.
func (m *Manager) List() ([]string, error) {
	entries, err := os.ReadDir(m.recDir)
	if err != nil {
		return nil, err
	}
	var ids []string
	for _, e := range entries {
		if id, ok := strings.CutSuffix(e.Name(), ".json"); ok && !strings.HasPrefix(id, ".") {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// Lookup returns the recorded attachment of id; the error wraps
// os.ErrNotExist when there is none.
func (m *Manager) Lookup(id string) (*Attachment, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	var a Attachment
	if err := fileutil.ReadJSON(m.recordPath(id), &a); err != nil {
		return nil, err
	}
	return &a, nil
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
