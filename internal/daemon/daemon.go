// Package daemon wires the agent from its configuration: the image store,
// the drivers, the lifecycle manager and the HTTP API, and runs them until
// told to stop. cmd/berth calls it for `berth agent`; integration tests
// call it in-process.
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"time"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/ctrdriver"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/auth"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/network"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/vmdriver"
	"github.com/berthd/berth/volume"
)

// driverCloseTimeout bounds how long shutdown waits for a driver to let go
// of what it holds (a KVM probe guest being removed).
const driverCloseTimeout = 30 * time.Second

// Options are what the configuration file does not hold.
type Options struct {
	Version string
	Logger  *slog.Logger
	// Drivers, when set, replace the drivers built from the configuration
	// (tests use the fake driver).
	Drivers []driver.Driver
}

// Daemon is a running agent.
type Daemon struct {
	cfg     *config.Config
	drivers []driver.Driver
	log     *slog.Logger
	images  *image.Store
	agent   *agent.Agent
	api     *server.Server
	ln      net.Listener // TCP (TLS when configured); nil for none
	http    *http.Server

	unixLn  net.Listener // nil for none
	tlsConf *tls.Config
	tokens  *auth.Store // nil when auth is off
	audit   *os.File
}

// New opens the data directory, recovers the node's workloads and binds
// the API's listener. Nothing is served until Serve.
func New(ctx context.Context, cfg *config.Config, opts Options) (*Daemon, error) {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(cfg.DataDir, 0o711); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	// Canonical (symlinks resolved): what refuses host paths that expose
	// it compares names too, and a symlinked data directory has two.
	real, err := filepath.EvalSymlinks(cfg.DataDir)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	cfg.DataDir = real
	d := &Daemon{cfg: cfg, log: log}

	// The image store asks the agent which images are in use; the agent
	// needs the store. The closure breaks the cycle: until the agent
	// exists, everything counts as in use, so nothing is collected early.
	var ag *agent.Agent
	inUse := func(digest string) bool { return ag == nil || ag.UsesImage(digest) }
	imgs, err := image.New(filepath.Join(cfg.DataDir, "images"), image.WithInUse(inUse), image.WithLogger(log),
		image.WithRegistries(imageRegistries(cfg)),
		image.WithLimits(image.Limits{
			MaxUnpackedBytes: cfg.Images.MaxUnpackedBytes, MaxEntries: cfg.Images.MaxEntries, MinFreeBytes: cfg.Storage.MinFreeBytes,
		}),
		image.WithDiskGroup(diskGroup(cfg)), imageAuth(cfg),
		image.WithGC(image.GCPolicy{HighPercent: cfg.Images.GCHighPercent, LowPercent: cfg.Images.GCLowPercent}))
	if err != nil {
		return nil, err
	}
	d.images = imgs

	drivers := opts.Drivers
	if drivers == nil {
		drivers, err = d.buildDrivers()
		if err != nil {
			return nil, err
		}
	}
	d.drivers = drivers
	bootID, err := supervisor.BootID(cfg.Node.BootIDFile)
	if err != nil {
		return nil, err
	}
	var netw *network.Manager
	if cfg.Network.Enabled {
		dns := cfg.Network.DNS
		if len(dns) == 0 {
			dns = nil // the host's
		}
		netw, err = network.New(network.Config{
			Name: cfg.Network.Name, Bridge: cfg.Network.Bridge, Subnet: cfg.Network.Subnet,
			DNS: dns, PluginDirs: cfg.Network.PluginDirs, DataDir: filepath.Join(cfg.DataDir, "network"),
		})
		if err != nil {
			return nil, err
		}
	}
	shareGID, vmOwner := d.nineP(drivers)
	vols, err := volume.Open(volume.Options{
		ShareGID: shareGID,
		Root:     filepath.Join(cfg.DataDir, "volumes"), DataDir: cfg.DataDir,
		HostPaths: cfg.Volumes.HostPaths, MinFreeBytes: cfg.Storage.MinFreeBytes, Logger: log,
	})
	if err != nil {
		return nil, err
	}
	// The metrics registry is made first: the agent reports its starts
	// to it, the API serves it.
	metrics := server.NewMetrics()
	ag, err = agent.New(ctx, agent.Options{
		BootID:        bootID,
		Volumes:       vols,
		VMVolumeOwner: vmOwner,
		OnStart:       metrics.ObserveStart,
		Network:       netw,
		DataDir:       cfg.DataDir,
		Drivers:       drivers,
		Images:        imgs,
		Defaults: agent.Defaults{
			CPU:           cfg.WorkloadDefaults.CPU,
			MemoryMB:      cfg.WorkloadDefaults.MemoryMB,
			CPULimit:      cfg.WorkloadDefaults.CPULimit,
			MemoryLimitMB: cfg.WorkloadDefaults.MemoryLimitMB,
			Pids:          cfg.WorkloadDefaults.Pids,
			DiskMB:        cfg.WorkloadDefaults.DiskMB,
			Logs: agent.LogDefaults{
				MaxBytes: cfg.Container.LogMaxBytes, MaxFiles: cfg.Container.LogMaxFiles,
				MaxBytesLimit: cfg.Container.LogMaxBytesLimit, MaxFilesLimit: cfg.Container.LogMaxFilesLimit,
			},
		},
		StopTimeout:  cfg.WorkloadDefaults.StopTimeout,
		VMOverheadMB: vmdriver.GuestMemoryOverhead >> 20,
		NodeLabels:   cfg.Node.Labels,
		Reserved: agent.Reserved{
			CPU:           cfg.Node.ReservedCPU,
			MemoryMB:      cfg.Node.ReservedMemoryMB,
			CPUOvercommit: cfg.Node.CPUOvercommit,
			MaxWorkloads:  cfg.Node.MaxWorkloads,
		},
		Version:    opts.Version,
		Logger:     log,
		PolicyFile: cfg.Policy.File,
		ExecLimits: agent.ExecLimits{MaxSessions: cfg.Exec.MaxSessions, MaxSessionsPerWorkload: cfg.Exec.MaxSessionsPerWorkload},
	})
	if err != nil {
		return nil, err
	}
	d.agent = ag
	apiOpts, err := d.security()
	if err == nil {
		err = d.listen()
	}
	if err != nil {
		d.closeSecurity()
		ag.Close()
		return nil, err
	}
	apiOpts.Metrics = metrics
	d.api = server.New(ag, apiOpts)
	d.http = d.httpServer(d.api)
	return d, nil
}

// imageRegistries is the operator's choice of registries; the workload
// network's addresses count as the node's own (other tenants' workloads).
func imageRegistries(cfg *config.Config) image.Registries {
	r := image.Registries{Allowed: cfg.Images.AllowedRegistries, Insecure: cfg.Images.InsecureRegistries}
	if p, err := netip.ParsePrefix(cfg.Network.Subnet); err == nil && cfg.Network.Enabled {
		r.NodeNetworks = []netip.Prefix{p.Masked()}
	}
	return r
}

// qemuGroup is QEMU's group, when it exists: the only one that may pass
// through the VM driver's directories.
func qemuGroup(cfg *config.Config) string {
	if _, err := user.LookupGroup(cfg.Images.DiskGroup); err != nil {
		if _, nerr := strconv.Atoi(cfg.Images.DiskGroup); nerr != nil {
			return ""
		}
	}
	return cfg.Images.DiskGroup
}

// diskGroup may read whole-disk images: QEMU's group, when VMs run here.
func diskGroup(cfg *config.Config) string {
	if !cfg.VM.Enabled {
		return ""
	}
	return cfg.Images.DiskGroup
}

func (d *Daemon) buildDrivers() ([]driver.Driver, error) {
	bootID, err := supervisor.BootID(d.cfg.Node.BootIDFile)
	if err != nil {
		return nil, err
	}
	var monitorCmd []string
	if d.cfg.Node.MonitorPath != "" {
		monitorCmd = []string{d.cfg.Node.MonitorPath}
	}
	var ds []driver.Driver
	if d.cfg.Container.Enabled {
		cd, err := ctrdriver.New(ctrdriver.Options{
			Root:         filepath.Join(d.cfg.DataDir, "containers"),
			StateDir:     filepath.Join(d.cfg.State(), "containers"),
			Runc:         d.cfg.Container.Runc,
			LogMaxBytes:  d.cfg.Container.LogMaxBytes,
			StartTimeout: d.cfg.Container.StartTimeout,
			UserNS: ctrdriver.UserNSOptions{
				Mode:      ctrdriver.UserNSMode(d.cfg.Container.UserNS.Mode),
				SubIDUser: d.cfg.Container.UserNS.SubIDUser,
				Base:      uint32(d.cfg.Container.UserNS.Base),
				Size:      uint32(d.cfg.Container.UserNS.Size),
				RangeSize: uint32(d.cfg.Container.UserNS.RangeSize),
				Dir:       filepath.Join(d.cfg.DataDir, "userns"),
			},
			MonitorCmd:     monitorCmd,
			BootID:         bootID,
			LayerPool:      d.cfg.Container.PreparedLayers,
			LayerPoolBytes: d.cfg.WorkloadDefaults.DiskMB << 20,
			Monitors:       d.cfg.Container.PreparedMonitors,
			Logger:         d.log,
		})
		if err != nil {
			return nil, err
		}
		ds = append(ds, cd)
	}
	if d.cfg.VM.Enabled {
		vd, err := vmdriver.New(vmdriver.Options{
			Root:            filepath.Join(d.cfg.DataDir, "vms"),
			URI:             d.cfg.VM.URI,
			Accel:           vmdriver.Accel(d.cfg.VM.Accel),
			Boot:            vmdriver.BootMode(d.cfg.VM.Boot),
			Firmware:        vmdriver.Firmware(d.cfg.VM.Firmware),
			InitPath:        d.cfg.VM.InitPath,
			LogMaxBytes:     d.cfg.Container.LogMaxBytes,
			MonitorCmd:      monitorCmd,
			BootID:          bootID,
			QEMUGroup:       qemuGroup(d.cfg),
			Logger:          d.log,
			VolumeTransport: vmdriver.VolumeTransport(d.cfg.VM.VolumeTransport),
		})
		if err != nil {
			return nil, err
		}
		ds = append(ds, vd)
	}
	return ds, nil
}

// Addr is the address the API listens on: TCP HOST:PORT, or
// unix:///PATH when there is no TCP listener.
func (d *Daemon) Addr() string {
	if d.ln == nil {
		return d.UnixAddr()
	}
	return d.ln.Addr().String()
}

// UnixAddr is the unix socket as a client address, or "".
func (d *Daemon) UnixAddr() string {
	if d.unixLn == nil {
		return ""
	}
	return "unix://" + d.unixLn.Addr().String()
}

// Agent is the lifecycle manager (for tests).
func (d *Daemon) Agent() *agent.Agent { return d.agent }

// Serve serves the API until ctx ends, then shuts down: it stops taking
// requests, lets running ones finish for a few seconds and closes the
// state. Workloads keep running; the next start re-attaches to them.
func (d *Daemon) Serve(ctx context.Context) error {
	d.log.Info("berth agent listening", "addr", d.Addr(), "unix", d.UnixAddr(), "tls", d.tlsConf != nil, "auth", d.tokens != nil, "data_dir", d.cfg.DataDir)
	errc := make(chan error, 2)
	for _, ln := range []net.Listener{d.ln, d.unixLn} {
		if ln != nil {
			go func() { errc <- d.http.Serve(ln) }()
		}
	}
	readyCtx, cancelReady := context.WithCancel(ctx)
	readyDone := make(chan struct{})
	go func() {
		defer close(readyDone)
		d.notifyReady(readyCtx)
	}()
	var serveErr error
	select {
	case serveErr = <-errc:
	case <-ctx.Done():
	}
	cancelReady()
	<-readyDone
	d.notifyStopping()
	shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.http.Shutdown(shutCtx); err != nil {
		// Followers of logs and blocking queries are cut off.
		d.http.Close()
	}
	d.closeSecurity()
	if err := d.agent.Close(); err != nil && serveErr == nil {
		serveErr = err
	}
	closeCtx, cancelClose := context.WithTimeout(context.Background(), driverCloseTimeout)
	defer cancelClose()
	for _, dr := range d.drivers {
		if err := dr.Close(closeCtx); err != nil {
			d.log.Warn("close driver", "driver", dr.Name(), "err", err)
		}
	}
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	d.log.Info("berth agent stopped")
	return serveErr
}

// imageAuth is where pulls find their registry credentials.
func imageAuth(cfg *config.Config) image.Option {
	if cfg.Images.AuthFile == "" {
		return func(*image.Store) {}
	}
	return image.WithAuthFile(cfg.Images.AuthFile)
}
