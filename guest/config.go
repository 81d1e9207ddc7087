package guest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/berthd/berth/errdefs"
)

// Device and channel names shared by the host's domain definition and
// berth-init.
const (
	RootDiskSerial   = "berth-root"
	ConfigDiskSerial = "berth-config"

	StdoutPort = "org.berth.stdout"
	StderrPort = "org.berth.stderr"
	StatusPort = "org.berth.status"
	// ExecPort carries exec sessions and signals (see exec.go).
	ExecPort = "org.berth.exec"
)

// ConfigVersion is the Config layout this package writes and reads.
// berth-init refuses other versions rather than guessing: the host and the
// initramfs are built from the same berth, so a mismatch is a bug to report,
// not to paper over.
const ConfigVersion = 1

// SectorSize is the unit the config disk is padded to.
const SectorSize = 512

// MaxConfigSize bounds the config disk berth-init reads, so a wrong disk
// (the root filesystem attached with the config serial, say) fails quickly
// instead of being read into memory whole.
const MaxConfigSize = 1 << 20

// ModuleListPath is where the initramfs lists the kernel modules berth-init
// loads, one absolute path per line in load order (dependencies first).
// A path may be followed, after spaces, by the CPU modalias patterns the
// module is for (depmod's "cpu:type:x86,...:feature:*0094*" aliases): a
// driver for a CPU feature, such as crc32c-intel for SSE4.2, is loaded
// only on a CPU whose /sys/devices/system/cpu/modalias matches one of
// them, as udev would, so a guest on a CPU without it does not pay for
// loading a module that then refuses the CPU.
const ModuleListPath = "/berth/modules"

// DefaultPath is the PATH a workload gets when its environment has none,
// the same default Docker and containerd give containers.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Config is what berth-init is told to run. It is written by the host to the
// config disk with EncodeConfig and read in the guest with DecodeConfig.
type Config struct {
	// Version is ConfigVersion; EncodeConfig fills it in when zero.
	Version int `json:"version"`
	// Args is the command and its arguments, already resolved from the
	// image's entrypoint and cmd. Args[0] is looked up in the workload's
	// PATH unless it contains a slash.
	Args []string `json:"args"`
	// Env is the workload's environment, KEY=VALUE.
	Env []string `json:"env,omitempty"`
	// Workdir is an absolute path inside the root filesystem; empty means /.
	Workdir string `json:"workdir,omitempty"`
	// User is "uid" or "uid:gid", numeric (the host resolves names against
	// the image's /etc/passwd before it boots the guest); empty means root.
	// Without a gid, the uid's primary group from the image's /etc/passwd is
	// used, or 0 when it is not listed, as runc does.
	User string `json:"user,omitempty"`
	// Hostname is the guest's hostname; empty means "localhost".
	Hostname string `json:"hostname,omitempty"`
	// Network is the guest's place on the node's bridge; nil means
	// loopback only.
	Network *Network `json:"network,omitempty"`
	// ExecChannel says the domain has the exec channel's port (ExecPort):
	// berth-init waits for it and serves exec sessions and signals on it.
	ExecChannel bool `json:"exec_channel,omitempty"`
	// Volumes are host directories mounted in the workload (volumes.go).
	Volumes []Volume `json:"volumes,omitempty"`
	// Stdin keeps the main process's standard input open for attach
	// sessions (see Console): a pipe berth-init holds, or the terminal
	// with TTY. Without it the process reads /dev/null (or, with TTY, a
	// terminal nobody types on).
	Stdin bool `json:"stdin,omitempty"`
	// TTY runs the main process on a terminal berth-init allocates (80x24
	// until an attach resizes it), as its controlling terminal; the
	// terminal's output goes to StdoutPort.
	//
	// Both fields are left out of the JSON when false, so a berth-init
	// older than them reads every config that does not ask for them, and
	// refuses (as an unknown field) one that does rather than run the
	// workload without its terminal.
	TTY bool `json:"tty,omitempty"`
}

// Network is a guest's network configuration: one virtio-net interface on
// the node's bridge with a static address from the node's IPAM. berth-init
// brings the interface up with the address, adds the default route through
// the gateway and writes the name servers to the workload's
// /etc/resolv.conf.
type Network struct {
	// Interface is the guest's interface name, e.g. "eth0".
	Interface string `json:"interface"`
	// Address is the interface's address in CIDR form, e.g. "10.88.0.5/16".
	Address string `json:"address"`
	// Gateway is the default route's next hop.
	Gateway string `json:"gateway,omitempty"`
	// DNS are nameservers for the guest's /etc/resolv.conf.
	DNS []string `json:"dns,omitempty"`
}

// Validate reports the first problem that would stop berth-init from
// running the config, wrapped in errdefs.ErrInvalidArgument.
func (c *Config) Validate() error {
	var problems []string
	if c.Version != ConfigVersion {
		problems = append(problems, fmt.Sprintf("version %d is not supported (want %d)", c.Version, ConfigVersion))
	}
	if len(c.Args) == 0 || c.Args[0] == "" {
		problems = append(problems, "args: a command is required")
	}
	for i, a := range c.Args {
		if strings.IndexByte(a, 0) >= 0 {
			problems = append(problems, fmt.Sprintf("args[%d]: contains a NUL byte", i))
		}
	}
	for i, kv := range c.Env {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			problems = append(problems, fmt.Sprintf("env[%d]: %q is not KEY=VALUE", i, kv))
		} else if strings.IndexByte(kv, 0) >= 0 {
			problems = append(problems, fmt.Sprintf("env[%d]: contains a NUL byte", i))
		}
	}
	if c.Workdir != "" && !strings.HasPrefix(c.Workdir, "/") {
		problems = append(problems, fmt.Sprintf("workdir: %q is not an absolute path", c.Workdir))
	}
	if _, _, _, err := ParseUser(c.User); err != nil {
		problems = append(problems, "user: "+err.Error())
	}
	if len(c.Hostname) > 64 || strings.ContainsAny(c.Hostname, "\x00/ ") {
		problems = append(problems, fmt.Sprintf("hostname: %q is not a valid hostname", c.Hostname))
	}
	if n := c.Network; n != nil {
		if p, err := netip.ParsePrefix(n.Address); err != nil || !p.Addr().Is4() {
			problems = append(problems, fmt.Sprintf("network.address: %q is not an IPv4 CIDR", n.Address))
		}
		if a, err := netip.ParseAddr(n.Gateway); n.Gateway != "" && (err != nil || !a.Is4()) {
			problems = append(problems, fmt.Sprintf("network.gateway: %q is not an IPv4 address", n.Gateway))
		}
		if len(n.Interface) > 15 || strings.ContainsAny(n.Interface, "/ \x00") {
			problems = append(problems, fmt.Sprintf("network.interface: %q is not an interface name", n.Interface))
		}
		for i, d := range n.DNS {
			if _, err := netip.ParseAddr(d); err != nil {
				problems = append(problems, fmt.Sprintf("network.dns[%d]: %q is not an IP address", i, d))
			}
		}
	}
	problems = append(problems, validateVolumes(c.Volumes)...)
	if len(problems) > 0 {
		return fmt.Errorf("guest config: %s: %w", strings.Join(problems, "; "), errdefs.ErrInvalidArgument)
	}
	return nil
}

// ParseUser parses Config.User: "" (root), "uid" or "uid:gid", all numeric.
// hasGID reports whether a gid was given.
func ParseUser(s string) (uid, gid uint32, hasGID bool, err error) {
	if s == "" {
		return 0, 0, true, nil
	}
	u, g, hasGID := strings.Cut(s, ":")
	n, err := strconv.ParseUint(u, 10, 32)
	if err != nil {
		return 0, 0, false, fmt.Errorf("%q: uid must be numeric", s)
	}
	uid = uint32(n)
	if hasGID {
		n, err = strconv.ParseUint(g, 10, 32)
		if err != nil {
			return 0, 0, false, fmt.Errorf("%q: gid must be numeric", s)
		}
		gid = uint32(n)
	}
	return uid, gid, hasGID, nil
}

// EncodeConfig returns the config disk's content: c as JSON, NUL-padded to
// a multiple of SectorSize so it can be attached as a raw disk. A zero
// Version is set to ConfigVersion. Invalid configs are refused here, on the
// host, where the error can reach the submitter, rather than in the guest.
func EncodeConfig(c Config) ([]byte, error) {
	if c.Version == 0 {
		c.Version = ConfigVersion
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	data, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode guest config: %w", err)
	}
	// Pad to the next sector boundary only: DecodeConfig reads up to the
	// first NUL or the end, so JSON that fills its last sector needs none.
	size := (len(data) + SectorSize - 1) / SectorSize * SectorSize
	if size > MaxConfigSize {
		return nil, fmt.Errorf("guest config: %d bytes encoded, more than %d: %w", len(data), MaxConfigSize, errdefs.ErrInvalidArgument)
	}
	out := make([]byte, size)
	copy(out, data)
	return out, nil
}

// DecodeConfig parses a config disk's content as written by EncodeConfig:
// JSON up to the first NUL byte (or the end). Unknown fields are rejected:
// they mean the host asked for something this berth-init cannot do.
func DecodeConfig(data []byte) (*Config, error) {
	if i := bytes.IndexByte(data, 0); i >= 0 {
		data = data[:i]
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, fmt.Errorf("guest config: disk holds no config: %w", errdefs.ErrInvalidArgument)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var c Config
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("guest config: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	if dec.More() {
		return nil, fmt.Errorf("guest config: trailing data after the JSON object: %w", errdefs.ErrInvalidArgument)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}
