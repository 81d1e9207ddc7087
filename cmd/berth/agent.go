package main

import (
	"log/slog"
	"os"
	"runtime/debug"
	"strings"

	"github.com/spf13/cobra"

	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/daemon"
)

func newAgentCmd() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the berth agent (the per-node daemon) in the foreground",
		Long: `Run the berth agent in the foreground.

Configuration comes in layers: built-in defaults (configs/berth.yaml) < the
file given with --config < BERTH_* environment variables (BERTH_DATA_DIR,
BERTH_LOG_LEVEL, BERTH_CONTAINER_RUNC, ...) < flags. Workloads keep running
when the agent stops; the next start re-attaches to them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config.Load(file, cmd.Flags())
			if err != nil {
				return err
			}
			log := newLogger(cfg.Log)
			slog.SetDefault(log)
			setAgentGC()
			d, err := daemon.New(cmd.Context(), cfg, daemon.Options{Version: version, Logger: log})
			if err != nil {
				return err
			}
			return d.Serve(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&file, "config", "", "config file (YAML); see configs/berth.yaml for every key")
	f.String("listen", "", "API listen address HOST:PORT (default 127.0.0.1:7470)")
	f.String("data-dir", "", "state, images, bundles and logs (default /var/lib/berth)")
	f.String("state-dir", "", "running containers' runtime files, best on a tmpfs such as /run/berth (default: the data dir)")
	f.String("log-level", "", "debug, info, warn or error (default info)")
	f.String("policy", "", "isolation policy file (default: the built-in policy)")
	f.String("tokens", "", "tokens file: turns authentication on (berth token add writes it)")
	f.String("listen-unix", "", "API unix socket path (default /run/berth/berth.sock)")
	for name := range config.Flags {
		if f.Lookup(name) == nil {
			panic("config flag without a command-line flag: " + name)
		}
	}
	return cmd
}

func newLogger(c config.Log) *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(strings.ToUpper(c.Level))); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// agentGCPercent is the agent's garbage-collection target unless GOGC
// says otherwise: the agent runs on every node beside the workloads, its
// live heap is small (a few MiB, a few KiB per workload) and a collection
// of it costs about a millisecond, so it trades a little CPU for holding
// at most half its live heap again in garbage instead of all of it
// (BenchmarkFootprint: agent memory per running container).
const agentGCPercent = 50

func setAgentGC() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(agentGCPercent)
	}
}
