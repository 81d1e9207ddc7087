// Package config loads the agent's configuration with viper, in layers:
// built-in defaults (configs/berth.yaml) < config file < BERTH_* environment
// < command-line flags. It is the only package that touches viper; the rest
// of berth receives the typed Config.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/image"
)

// Config is the agent's configuration.
type Config struct {
	Listen  string `mapstructure:"listen"`
	DataDir string `mapstructure:"data_dir"`
	// StateDir holds what running workloads need only until the node
	// reboots (container tasks' bundles, monitor records and sockets,
	// runc's state); empty: DataDir. See State.
	StateDir         string           `mapstructure:"state_dir"`
	Log              Log              `mapstructure:"log"`
	Policy           Policy           `mapstructure:"policy"`
	WorkloadDefaults WorkloadDefaults `mapstructure:"workload_defaults"`
	Node             Node             `mapstructure:"node"`
	Network          Network          `mapstructure:"network"`
	Container        Container        `mapstructure:"container"`
	VM               VM               `mapstructure:"vm"`
	API              API              `mapstructure:"api"`
	// ListenUnix is the API's unix socket; empty for none.
	ListenUnix string  `mapstructure:"listen_unix"`
	Auth       Auth    `mapstructure:"auth"`
	TLS        TLS     `mapstructure:"tls"`
	Audit      Audit   `mapstructure:"audit"`
	Images     Images  `mapstructure:"images"`
	Storage    Storage `mapstructure:"storage"`
	Volumes    Volumes `mapstructure:"volumes"`
	Exec       Exec    `mapstructure:"exec"`
}

// Exec caps the exec sessions open at once.
type Exec struct {
	MaxSessions            int `mapstructure:"max_sessions"`
	MaxSessionsPerWorkload int `mapstructure:"max_sessions_per_workload"`
}

// Volumes is what workloads may mount from the host.
type Volumes struct {
	// HostPaths are the host directories under which workloads may mount
	// host paths; empty: none. /, /proc, /sys, /dev and the data
	// directory are never allowed.
	HostPaths []string `mapstructure:"host_paths"`
}

type Log struct {
	Level  string `mapstructure:"level"`
	Format string `mapstructure:"format"`
}

type Policy struct {
	File string `mapstructure:"file"`
}

type WorkloadDefaults struct {
	// CPU and MemoryMB are the requests of a spec that names no
	// resources, CPULimit and MemoryLimitMB its limits (a limit below the
	// request is the request).
	CPU           float64 `mapstructure:"cpu"`
	MemoryMB      int64   `mapstructure:"memory_mb"`
	CPULimit      float64 `mapstructure:"cpu_limit"`
	MemoryLimitMB int64   `mapstructure:"memory_limit_mb"`
	Pids          int64   `mapstructure:"pids"`
	// DiskMB is a workload's ephemeral storage when its spec names none;
	// 0: no budget of its own.
	DiskMB      int64         `mapstructure:"disk_mb"`
	StopTimeout time.Duration `mapstructure:"stop_timeout"`
}

type Node struct {
	ReservedCPU      float64 `mapstructure:"reserved_cpu"`
	ReservedMemoryMB int64   `mapstructure:"reserved_memory_mb"`
	CPUOvercommit    float64 `mapstructure:"cpu_overcommit"`
	MaxWorkloads     int     `mapstructure:"max_workloads"`
	// Labels describe the node to isolation policy rules.
	Labels map[string]string `mapstructure:"labels"`
	// BootIDFile is where the node's boot id is read: tasks stamped with
	// another one belong to an earlier boot and are gone.
	BootIDFile string `mapstructure:"boot_id_file"`
	// MonitorPath is the per-task monitor binary; empty: berth-monitor
	// next to the berth binary.
	MonitorPath string `mapstructure:"monitor_path"`
}

type Network struct {
	Enabled    bool     `mapstructure:"enabled"`
	Name       string   `mapstructure:"name"`
	Bridge     string   `mapstructure:"bridge"`
	Subnet     string   `mapstructure:"subnet"`
	DNS        []string `mapstructure:"dns"`
	PluginDirs []string `mapstructure:"plugin_dirs"`
}

type Container struct {
	Enabled     bool   `mapstructure:"enabled"`
	Runc        string `mapstructure:"runc"`
	LogMaxBytes int64  `mapstructure:"log_max_bytes"`
	// LogMaxFiles is how many rotated files of each log are kept; the
	// limits are the most a workload's spec may ask for (logs).
	LogMaxFiles      int   `mapstructure:"log_max_files"`
	LogMaxBytesLimit int64 `mapstructure:"log_max_bytes_limit"`
	LogMaxFilesLimit int   `mapstructure:"log_max_files_limit"`
	// StartTimeout bounds runc create and start: a runc that hangs fails
	// the start instead of wedging the workload.
	StartTimeout time.Duration `mapstructure:"start_timeout"`
	// PreparedLayers is how many filesystems for writable layers of the
	// default disk budget are kept made ahead of the starts that take them.
	PreparedLayers int `mapstructure:"prepared_layers"`
	// PreparedMonitors is how many container monitors are kept started
	// ahead of the starts that hand them their task.
	PreparedMonitors int    `mapstructure:"prepared_monitors"`
	UserNS           UserNS `mapstructure:"userns"`
}

// UserNS puts each container in a user namespace of its own: its root is
// an unprivileged host id range of its own.
type UserNS struct {
	// Mode is auto (on where the kernel supports id-mapped mounts on
	// overlayfs) or off.
	Mode string `mapstructure:"mode"`
	// SubIDUser, when set, takes the ranges from this user's entries in
	// /etc/subuid and /etc/subgid instead of Base and Size.
	SubIDUser string `mapstructure:"subid_user"`
	// Base and Size are the host ids (uids and gids alike) the ranges are
	// carved from, RangeSize ids per container.
	Base      int64 `mapstructure:"base"`
	Size      int64 `mapstructure:"size"`
	RangeSize int64 `mapstructure:"range_size"`
}

type VM struct {
	Enabled bool   `mapstructure:"enabled"`
	URI     string `mapstructure:"uri"`
	Accel   string `mapstructure:"accel"`
	Boot    string `mapstructure:"boot"` // how guests boot the node's kernel: auto, pvh or bzimage
	// Firmware is what runs before a guest's kernel: auto, qboot or seabios.
	Firmware string `mapstructure:"firmware"`
	InitPath string `mapstructure:"init_path"`
	// VolumeTransport is how volumes reach guests: auto, virtiofs or 9p.
	VolumeTransport string `mapstructure:"volume_transport"`
}

type API struct {
	MaxBodyBytes int64 `mapstructure:"max_body_bytes"`
	// MaxHeaderBytes limits a request's header block.
	MaxHeaderBytes int `mapstructure:"max_header_bytes"`
	// ReadHeaderTimeout bounds reading a request's headers.
	ReadHeaderTimeout time.Duration `mapstructure:"read_header_timeout"`
	// RequestTimeout bounds reading and answering a request that is not a
	// blocking query, a stream or a long operation.
	RequestTimeout time.Duration `mapstructure:"request_timeout"`
	// IdleTimeout closes a keep-alive connection with no request.
	IdleTimeout time.Duration `mapstructure:"idle_timeout"`
	// StreamIdleTimeout bounds each write of a log or event stream.
	StreamIdleTimeout time.Duration `mapstructure:"stream_idle_timeout"`
}

// Auth is who may use the API.
type Auth struct {
	// TokensFile turns authentication on (internal/auth documents the
	// format); empty: no authentication, loopback and unix socket only.
	TokensFile string `mapstructure:"tokens_file"`
	// TrustUnixRoot makes a root peer on the unix socket an admin.
	TrustUnixRoot bool `mapstructure:"trust_unix_root"`
}

// TLS is the TCP listener's transport security.
type TLS struct {
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
	// ClientCAFile enables client certificates signed by these CAs; the
	// tokens file maps them to roles.
	ClientCAFile string `mapstructure:"client_ca_file"`
}

// Images is what the image store may pull and keep.
type Images struct {
	// AllowedRegistries are host[:port] patterns of the registries pulls
	// may use over HTTPS ("*" any name); empty: none.
	AllowedRegistries []string `mapstructure:"allowed_registries"`
	// InsecureRegistries are patterns of registries reached over plain
	// HTTP, loopback ones included; empty: none.
	InsecureRegistries []string `mapstructure:"insecure_registries"`
	// MaxUnpackedBytes bounds the apparent size of one image's unpacked
	// root filesystem; 0: no limit.
	MaxUnpackedBytes int64 `mapstructure:"max_unpacked_bytes"`
	// MaxEntries bounds the files, directories and links of one image's
	// unpacked root filesystem; 0: no limit.
	MaxEntries int64 `mapstructure:"max_entries"`
	// DiskGroup alone may read whole-disk VM images: QEMU's group under
	// libvirt. Empty: root only.
	DiskGroup string `mapstructure:"disk_group"`
	// AuthFile is a docker-style config.json with the registries'
	// credentials (auths, credsStore, credHelpers); empty: the docker
	// config of the user running berth.
	AuthFile string `mapstructure:"auth_file"`
	// GCHighPercent and GCLowPercent are image collection's watermarks
	// of the data directory's filesystem use; 0 high: off.
	GCHighPercent int `mapstructure:"gc_high_percent"`
	GCLowPercent  int `mapstructure:"gc_low_percent"`
}

// Storage is how the data directory's disk is kept usable.
type Storage struct {
	// MinFreeBytes is the free space below which pulls, imports and
	// submits are refused; 0: no floor.
	MinFreeBytes int64 `mapstructure:"min_free_bytes"`
}

// Audit is where the audit log goes.
type Audit struct {
	// File: empty for <data_dir>/audit.log, "-" for stderr.
	File string `mapstructure:"file"`
}

// IsLoopback reports whether a listen address can only be reached from
// this machine: localhost or a loopback IP. An empty host (every
// interface) and other names are not.
func IsLoopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Flags maps command-line flags to config keys, e.g. "listen" -> "listen",
// "data-dir" -> "data_dir".
var Flags = map[string]string{
	"listen":      "listen",
	"data-dir":    "data_dir",
	"state-dir":   "state_dir",
	"log-level":   "log.level",
	"policy":      "policy.file",
	"tokens":      "auth.tokens_file",
	"listen-unix": "listen_unix",
}

// Load reads the configuration. file may be empty (defaults only); flags
// may be nil. Only flags the user set override lower layers.
func Load(file string, flags *pflag.FlagSet) (*Config, error) {
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(configs.DefaultAgentConfig)); err != nil {
		return nil, fmt.Errorf("built-in config: %w", err)
	}
	known := make(map[string]bool)
	for _, k := range v.AllKeys() {
		known[k] = true
	}
	if file != "" {
		v.SetConfigFile(file)
		if err := v.MergeInConfig(); err != nil {
			return nil, fmt.Errorf("config file %s: %w", file, err)
		}
		var unknown []string
		for _, k := range v.AllKeys() {
			if !known[k] && !underMapKey(k) {
				unknown = append(unknown, k)
			}
		}
		if len(unknown) > 0 {
			sort.Strings(unknown)
			return nil, fmt.Errorf("config %s: unknown key(s) %s (check the spelling against configs/berth.yaml)", file, strings.Join(unknown, ", "))
		}
	}
	v.SetEnvPrefix("BERTH")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()
	if flags != nil {
		for flag, key := range Flags {
			if f := flags.Lookup(flag); f != nil && f.Changed {
				if err := v.BindPFlag(key, f); err != nil {
					return nil, err
				}
			}
		}
	}
	var c Config
	err := v.UnmarshalExact(&c, func(dc *mapstructure.DecoderConfig) {
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(mapstructure.StringToTimeDurationHookFunc())
	})
	if err != nil {
		return nil, fmt.Errorf("config%s: %w", inFile(file), unknownKeyError(err))
	}
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("config%s: %w", inFile(file), err)
	}
	return &c, nil
}

// mapKeys are config keys whose value is a map of the operator's own keys.
var mapKeys = []string{"node.labels"}

func underMapKey(k string) bool {
	for _, m := range mapKeys {
		if strings.HasPrefix(k, m+".") {
			return true
		}
	}
	return false
}

func inFile(file string) string {
	if file == "" {
		return ""
	}
	return " " + file
}

// unknownKeyError makes mapstructure's "has invalid keys" message read as
// what it is for an operator.
func unknownKeyError(err error) error {
	msg := err.Error()
	if i := strings.Index(msg, "has invalid keys: "); i >= 0 {
		keys := msg[i+len("has invalid keys: "):]
		if j := strings.IndexByte(keys, '\n'); j >= 0 {
			keys = keys[:j]
		}
		return fmt.Errorf("unknown key(s) %s (check the spelling against configs/berth.yaml)", keys)
	}
	return err
}

// Validate checks every key and names the bad one.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if _, port, err := net.SplitHostPort(c.Listen); c.Listen != "" && (err != nil || port == "") {
		bad("listen", "%q is not HOST:PORT", c.Listen)
	}
	c.validateSecurity(bad)
	if !filepath.IsAbs(c.DataDir) {
		bad("data_dir", "%q must be an absolute path", c.DataDir)
	}
	if c.StateDir != "" && !filepath.IsAbs(c.StateDir) {
		bad("state_dir", "%q must be an absolute path (or empty for data_dir)", c.StateDir)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		bad("log.format", "%q is not text or json", c.Log.Format)
	}
	d := c.WorkloadDefaults
	if d.CPU <= 0 || d.CPU > 1024 {
		bad("workload_defaults.cpu", "%g must be between 0 and 1024 cores", d.CPU)
	}
	if d.MemoryMB < 8 {
		bad("workload_defaults.memory_mb", "%d is below 8 MiB", d.MemoryMB)
	}
	if d.CPULimit < 0 || d.CPULimit > 1024 {
		bad("workload_defaults.cpu_limit", "%g must be between 0 and 1024 cores", d.CPULimit)
	}
	if d.MemoryLimitMB < 0 {
		bad("workload_defaults.memory_limit_mb", "must not be negative")
	}
	if d.Pids < 1 {
		bad("workload_defaults.pids", "%d must be at least 1", d.Pids)
	}
	if d.DiskMB < 0 || d.DiskMB > 0 && d.DiskMB < 16 {
		bad("workload_defaults.disk_mb", "%d must be 0 (no budget) or at least 16 MiB", d.DiskMB)
	}
	if d.StopTimeout <= 0 || d.StopTimeout > time.Hour {
		bad("workload_defaults.stop_timeout", "%v must be between 0s and 1h", d.StopTimeout)
	}
	if c.Node.ReservedCPU < 0 {
		bad("node.reserved_cpu", "must not be negative")
	}
	if c.Node.ReservedMemoryMB < 0 {
		bad("node.reserved_memory_mb", "must not be negative")
	}
	if c.Node.CPUOvercommit < 1 || c.Node.CPUOvercommit > 64 {
		bad("node.cpu_overcommit", "%g must be between 1 and 64", c.Node.CPUOvercommit)
	}
	if c.Node.MaxWorkloads < 0 {
		bad("node.max_workloads", "must not be negative")
	}
	if c.Network.Enabled {
		if p, err := netip.ParsePrefix(c.Network.Subnet); err != nil || !p.Addr().Is4() || p.Bits() > 30 {
			bad("network.subnet", "%q is not an IPv4 CIDR of at most /30", c.Network.Subnet)
		}
		if c.Network.Bridge == "" || len(c.Network.Bridge) > 15 || strings.ContainsAny(c.Network.Bridge, "/ ") {
			bad("network.bridge", "%q is not a usable interface name (at most 15 characters)", c.Network.Bridge)
		}
		if c.Network.Name == "" {
			bad("network.name", "must name the CNI network")
		}
		for _, d := range c.Network.DNS {
			if _, err := netip.ParseAddr(d); err != nil {
				bad("network.dns", "%q is not an IP address", d)
			}
		}
	}
	if c.Container.Enabled && c.Container.Runc == "" {
		bad("container.runc", "must name the runc binary")
	}
	if c.Container.LogMaxFiles < 1 || c.Container.LogMaxFilesLimit < c.Container.LogMaxFiles {
		bad("container.log_max_files", "%d must be at least 1 and at most container.log_max_files_limit (%d)", c.Container.LogMaxFiles, c.Container.LogMaxFilesLimit)
	}
	if c.Container.LogMaxBytesLimit < c.Container.LogMaxBytes {
		bad("container.log_max_bytes_limit", "%d is below container.log_max_bytes", c.Container.LogMaxBytesLimit)
	}
	if c.Container.LogMaxBytes < 0 {
		bad("container.log_max_bytes", "must not be negative")
	}
	if c.Container.StartTimeout < time.Second {
		bad("container.start_timeout", "must be at least 1s")
	}
	if c.Container.PreparedLayers < 0 || c.Container.PreparedLayers > 64 {
		bad("container.prepared_layers", "%d must be between 0 (none) and 64", c.Container.PreparedLayers)
	}
	if c.Container.PreparedMonitors < 0 || c.Container.PreparedMonitors > 16 {
		bad("container.prepared_monitors", "%d must be between 0 (none) and 16", c.Container.PreparedMonitors)
	}
	c.validateUserNS(bad)
	switch c.VM.Accel {
	case "auto", "kvm", "tcg":
	default:
		bad("vm.accel", "%q is not auto, kvm or tcg", c.VM.Accel)
	}
	switch c.VM.Boot {
	case "auto", "pvh", "bzimage":
	default:
		bad("vm.boot", "%q is not auto, pvh or bzimage", c.VM.Boot)
	}
	switch c.VM.Firmware {
	case "auto", "qboot", "seabios":
	default:
		bad("vm.firmware", "%q is not auto, qboot or seabios", c.VM.Firmware)
	}
	switch c.VM.VolumeTransport {
	case "auto", "virtiofs", "9p":
	default:
		bad("vm.volume_transport", "%q is not auto, virtiofs or 9p", c.VM.VolumeTransport)
	}
	if c.VM.Enabled && c.VM.URI == "" {
		bad("vm.uri", "must be a libvirt URI such as qemu:///system")
	}
	if c.API.MaxBodyBytes < 1024 {
		bad("api.max_body_bytes", "%d is too small for a workload spec", c.API.MaxBodyBytes)
	}
	c.validateImages(bad)
	c.validateVolumes(bad)
	if c.Exec.MaxSessions < 1 {
		bad("exec.max_sessions", "%d must be at least 1", c.Exec.MaxSessions)
	}
	if n := c.Exec.MaxSessionsPerWorkload; n < 1 || n > c.Exec.MaxSessions {
		bad("exec.max_sessions_per_workload", "%d must be between 1 and exec.max_sessions (%d)", n, c.Exec.MaxSessions)
	}
	if !c.Container.Enabled && !c.VM.Enabled {
		errs = append(errs, errors.New("container.enabled and vm.enabled are both false: the agent could run nothing"))
	}
	return errors.Join(errs...)
}

// validateImages checks the image and storage keys.
func (c *Config) validateImages(bad func(key, format string, args ...any)) {
	if h, l := c.Images.GCHighPercent, c.Images.GCLowPercent; h < 0 || h > 100 || l < 0 || (h > 0 && l >= h) {
		bad("images.gc_high_percent", "%d and images.gc_low_percent %d: want 0 <= low < high <= 100 (high 0: no collection)", h, l)
	}
	if f := c.Images.AuthFile; f != "" && !filepath.IsAbs(f) {
		bad("images.auth_file", "%q must be an absolute path", f)
	}
	for _, l := range []struct {
		key  string
		list []string
	}{{"images.allowed_registries", c.Images.AllowedRegistries}, {"images.insecure_registries", c.Images.InsecureRegistries}} {
		for i, p := range l.list {
			if err := image.ValidateRegistryPattern(p); err != nil {
				bad(fmt.Sprintf("%s[%d]", l.key, i), "%v", err)
			}
		}
	}
	for _, n := range []struct {
		key string
		n   int64
	}{{"images.max_unpacked_bytes", c.Images.MaxUnpackedBytes}, {"images.max_entries", c.Images.MaxEntries}, {"storage.min_free_bytes", c.Storage.MinFreeBytes}} {
		if n.n < 0 {
			bad(n.key, "%d must not be negative (0: no limit)", n.n)
		}
	}
}

// validateVolumes checks volumes.host_paths: clean absolute paths that
// do not expose the whole host, the kernel's views or the data directory
// (package volume checks them again, symlinks resolved, when it opens).
func (c *Config) validateVolumes(bad func(key, format string, args ...any)) {
	for i, p := range c.Volumes.HostPaths {
		key := fmt.Sprintf("volumes.host_paths[%d]", i)
		switch {
		case !filepath.IsAbs(p) || filepath.Clean(p) != p:
			bad(key, "%q is not a clean absolute path", p)
		case p == "/":
			bad(key, "/ is the whole host")
		case within(p, "/proc") || within(p, "/sys") || within(p, "/dev"):
			bad(key, "%q: /proc, /sys and /dev are never shared", p)
		case within(p, c.DataDir) || within(c.DataDir, p):
			bad(key, "%q holds or is inside the data directory %s", p, c.DataDir)
		}
	}
}

func within(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// validateUserNS checks the container.userns keys.
func (c *Config) validateUserNS(bad func(key, format string, args ...any)) {
	u := c.Container.UserNS
	switch u.Mode {
	case "auto", "off":
	default:
		bad("container.userns.mode", "%q is not auto or off", u.Mode)
	}
	if u.SubIDUser != "" && (strings.ContainsAny(u.SubIDUser, ": \t\n") || len(u.SubIDUser) > 32) {
		bad("container.userns.subid_user", "%q is not a user name", u.SubIDUser)
	}
	if u.RangeSize < 65536 || u.RangeSize > 1<<31 {
		bad("container.userns.range_size", "%d must be between 65536 (images use ids up to 65534, nobody) and 2147483648", u.RangeSize)
	}
	if u.SubIDUser != "" {
		return // the subordinate ids file gives base and size; the driver checks them
	}
	const lastID = 1<<32 - 2 // 4294967295 is (uid_t)-1
	if u.Base < 65536 || u.Base > lastID {
		bad("container.userns.base", "%d must be between 65536 (above the host's own users and groups) and %d", u.Base, lastID)
	}
	if u.Size < u.RangeSize {
		bad("container.userns.size", "%d must hold at least one range of container.userns.range_size (%d) ids", u.Size, u.RangeSize)
	} else if u.Base+u.Size-1 > lastID {
		bad("container.userns.size", "base %d + size %d reaches past the last host id %d", u.Base, u.Size, lastID)
	}
}

// validateSecurity checks the listeners, auth, TLS and audit keys: no
// listener anyone else can reach without TLS and tokens.
func (c *Config) validateSecurity(bad func(key, format string, args ...any)) {
	if c.Listen == "" && c.ListenUnix == "" {
		bad("listen", "listen and listen_unix are both empty: the API would be unreachable")
	}
	if c.ListenUnix != "" && !filepath.IsAbs(c.ListenUnix) {
		bad("listen_unix", "%q must be an absolute path", c.ListenUnix)
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		bad("tls.cert_file", "tls.cert_file and tls.key_file go together")
	}
	if c.TLS.ClientCAFile != "" && c.TLS.CertFile == "" {
		bad("tls.client_ca_file", "client certificates need TLS: set tls.cert_file and tls.key_file")
	}
	if c.TLS.ClientCAFile != "" && c.Auth.TokensFile == "" {
		bad("tls.client_ca_file", "client certificates are mapped to roles by the tokens file: set auth.tokens_file")
	}
	if c.Listen != "" && !IsLoopback(c.Listen) {
		if c.TLS.CertFile == "" {
			bad("listen", "%q is reachable from other machines: berth refuses it without TLS (tls.cert_file, tls.key_file)", c.Listen)
		}
		if c.Auth.TokensFile == "" {
			bad("listen", "%q is reachable from other machines: berth refuses it without authentication (auth.tokens_file)", c.Listen)
		}
	}
	a := c.API
	if a.MaxHeaderBytes < 4<<10 || a.MaxHeaderBytes > 1<<20 {
		bad("api.max_header_bytes", "%d must be between 4096 and 1048576", a.MaxHeaderBytes)
	}
	for key, d := range map[string]time.Duration{
		"api.read_header_timeout": a.ReadHeaderTimeout, "api.request_timeout": a.RequestTimeout,
		"api.idle_timeout": a.IdleTimeout, "api.stream_idle_timeout": a.StreamIdleTimeout,
	} {
		if d < 100*time.Millisecond || d > time.Hour {
			bad(key, "%v must be between 100ms and 1h", d)
		}
	}
}

// State is the directory for state that ends with the node's boot:
// state_dir, or data_dir when it is empty.
func (c *Config) State() string {
	if c.StateDir != "" {
		return c.StateDir
	}
	return c.DataDir
}
