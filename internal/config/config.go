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
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/berthd/berth/configs"
)

// Config is the agent's configuration.
type Config struct {
	Listen           string           `mapstructure:"listen"`
	DataDir          string           `mapstructure:"data_dir"`
	Log              Log              `mapstructure:"log"`
	Policy           Policy           `mapstructure:"policy"`
	WorkloadDefaults WorkloadDefaults `mapstructure:"workload_defaults"`
	Node             Node             `mapstructure:"node"`
	Container        Container        `mapstructure:"container"`
	VM               VM               `mapstructure:"vm"`
	API              API              `mapstructure:"api"`
}

type Log struct {
	Level  string `mapstructure:"level"`
	Format string `mapstructure:"format"`
}

type Policy struct {
	File string `mapstructure:"file"`
}

type WorkloadDefaults struct {
	CPU         float64       `mapstructure:"cpu"`
	MemoryMB    int64         `mapstructure:"memory_mb"`
	Pids        int64         `mapstructure:"pids"`
	StopTimeout time.Duration `mapstructure:"stop_timeout"`
}

type Node struct {
	ReservedCPU      float64 `mapstructure:"reserved_cpu"`
	ReservedMemoryMB int64   `mapstructure:"reserved_memory_mb"`
	CPUOvercommit    float64 `mapstructure:"cpu_overcommit"`
	MaxWorkloads     int     `mapstructure:"max_workloads"`
	// Labels describe the node to isolation policy rules.
	Labels map[string]string `mapstructure:"labels"`
}

type Container struct {
	Enabled     bool   `mapstructure:"enabled"`
	Runc        string `mapstructure:"runc"`
	LogMaxBytes int64  `mapstructure:"log_max_bytes"`
}

type VM struct {
	Enabled  bool   `mapstructure:"enabled"`
	URI      string `mapstructure:"uri"`
	Accel    string `mapstructure:"accel"`
	InitPath string `mapstructure:"init_path"`
}

type API struct {
	MaxBodyBytes int64 `mapstructure:"max_body_bytes"`
}

// Flags maps command-line flags to config keys, e.g. "listen" -> "listen",
// "data-dir" -> "data_dir".
var Flags = map[string]string{
	"listen":    "listen",
	"data-dir":  "data_dir",
	"log-level": "log.level",
	"policy":    "policy.file",
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
	if _, port, err := net.SplitHostPort(c.Listen); err != nil || port == "" {
		bad("listen", "%q is not HOST:PORT", c.Listen)
	}
	if !filepath.IsAbs(c.DataDir) {
		bad("data_dir", "%q must be an absolute path", c.DataDir)
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
	if d.Pids < 1 {
		bad("workload_defaults.pids", "%d must be at least 1", d.Pids)
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
	if c.Container.Enabled && c.Container.Runc == "" {
		bad("container.runc", "must name the runc binary")
	}
	if c.Container.LogMaxBytes < 0 {
		bad("container.log_max_bytes", "must not be negative")
	}
	switch c.VM.Accel {
	case "auto", "kvm", "tcg":
	default:
		bad("vm.accel", "%q is not auto, kvm or tcg", c.VM.Accel)
	}
	if c.VM.Enabled && c.VM.URI == "" {
		bad("vm.uri", "must be a libvirt URI such as qemu:///system")
	}
	if c.API.MaxBodyBytes < 1024 {
		bad("api.max_body_bytes", "%d is too small for a workload spec", c.API.MaxBodyBytes)
	}
	if !c.Container.Enabled && !c.VM.Enabled {
		errs = append(errs, errors.New("container.enabled and vm.enabled are both false: the agent could run nothing"))
	}
	return errors.Join(errs...)
}
