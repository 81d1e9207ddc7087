// Package ctrdriver runs berth tasks as OCI containers under runc.
//
// Each task gets a directory under the driver's state directory (a tmpfs
// such as /run/berth/containers on a node: none of it outlives the boot):
//
//	tasks/<id>/bundle/config.json   OCI runtime spec (runtime-spec types)
//	tasks/<id>/bundle/rootfs        overlay mount: image rootfs + upper
//	                                (with user namespaces on, the overlay is
//	                                at <data_dir>/userns/<uid>.<gid>/rootfs,
//	                                reachable only by the range's root)
//	tasks/<id>/monitor.json, monitor.pid, status.json, stop.json
//	                                the monitor protocol (supervisor/monitor)
//	tasks/<id>/runc.log, monitor.log
//
// runc keeps its state under runc/ there, so berth never sees other
// runtimes' containers. The writable layer is on disk, under the driver's
// root:
//
//	layers/<id>/scratch, scratch.img  the layer's own filesystem (a disk
//	                                  budget) and its file
//	layers/<id>/upper, work           the layer without a budget A per-task monitor process (cmd/berth-monitor, started and
//
// followed by package supervisor) is the container's parent, so the agent
// can restart without the workload noticing.
package ctrdriver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/loopfs"
	"github.com/berthd/berth/internal/seccomp"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/supervisor/monitor"
)

// Name is the isolation ctrdriver provides.
const Name = "container"

// handleVersion is the version of the handles Start returns. Version 2
// handles carry no state: the task directory is the only truth.
const handleVersion = 2

// DefaultStartTimeout bounds runc create and start of one container.
const DefaultStartTimeout = 2 * time.Minute

// Options configure the driver.
type Options struct {
	// Root is the driver's directory on disk, e.g.
	// /var/lib/berth/containers: the writable layers and what is made
	// ahead of starts.
	Root string
	// StateDir holds the running tasks' runtime files: each task's
	// directory (its bundle, its monitor's config, records, logs and
	// sockets) and runc's state. None of it means anything after the
	// node's boot (a task of an earlier boot is released), so it belongs
	// on a tmpfs, e.g. /run/berth/containers, where a start's dozen new
	// files cost no disk inode. Default: Root.
	StateDir string
	// Runc is the runc binary; default "runc" from PATH.
	Runc string
	// MonitorCmd starts a monitor; the task directory is appended.
	// Default: berth-monitor next to this executable.
	MonitorCmd []string
	// Entry is berth-entry (cmd/berth-entry), which installs containers'
	// seccomp filter, compiled once, instead of runc. Default: berth-entry
	// next to the monitor binary; without it runc installs the profile.
	Entry string
	// MonitorEnv is the monitor's environment (default: none but PATH).
	MonitorEnv []string
	// LogMaxBytes caps each of a task's stdout and stderr logs; 0 means 64 MiB.
	LogMaxBytes int64
	// StartTimeout bounds runc create and start; a runc that hangs fails
	// the start. Default DefaultStartTimeout.
	StartTimeout time.Duration
	// BootID is the node's boot id (default: the kernel's); tests set
	// another one to simulate a reboot.
	BootID string
	// UserNS configures the containers' user namespaces (userns.go); the
	// default is on where the kernel supports them.
	UserNS UserNSOptions
	// LayerPool is how many filesystems for writable layers of
	// LayerPoolBytes (the default disk budget) are kept made and mounted
	// ahead of the starts that take them (layerpool.go); 0 makes each at
	// its start.
	LayerPool      int
	LayerPoolBytes int64
	// Monitors is how many monitors are kept started ahead of the starts
	// that hand them their task (supervisor.Options.Spares).
	Monitors int
	Logger   *slog.Logger
}

// Driver is the runc container driver.
type Driver struct {
	opts     Options
	runc     runc
	tasksDir string
	// layersDir holds the writable layers (on disk, under Root).
	layersDir string
	log       *slog.Logger
	sup       *supervisor.Supervisor[struct{}]
	userns    *userns
	// scratch makes the filesystems writable layers with a disk budget
	// live on.
	scratch *loopfs.Templates
	// layers are the writable layers' filesystems made ahead (nil: none).
	layers *layerPool
	// volatile: writable layers are volatile overlays (overlayOptions).
	volatile bool
	// seccomp says who installs the containers' seccomp filter.
	seccomp seccompLoader
	// unmounts holds, per task id, a channel closed when the unmount that
	// follows the report of its end is done (finish); Destroy waits for it.
	unmounts sync.Map
}

type task = supervisor.Task[struct{}]

var _ driver.Driver = (*Driver)(nil)

// New prepares the driver's directories. It does not fail when runc is
// missing: Fingerprint reports that.
func New(opts Options) (*Driver, error) {
	if opts.Root == "" {
		return nil, errors.New("ctrdriver: root directory is required")
	}
	if opts.Runc == "" {
		opts.Runc = "runc"
	}
	opts.Runc = findRunc(opts.Runc)
	if opts.MonitorEnv == nil {
		opts.MonitorEnv = []string{"PATH=" + withSbin(os.Getenv("PATH"))}
	}
	if opts.LogMaxBytes == 0 {
		opts.LogMaxBytes = 64 << 20
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.StateDir == "" {
		opts.StateDir = opts.Root
	}
	log := opts.Logger.With("driver", Name)
	sup, err := supervisor.New[struct{}](supervisor.Options{
		Kind: monitor.KindRunc, Noun: "container task",
		Monitor: opts.MonitorCmd, Env: opts.MonitorEnv, BootID: opts.BootID, Logger: log,
		Spares: opts.Monitors,
	})
	if err != nil {
		return nil, fmt.Errorf("ctrdriver: %w", err)
	}
	if old := liveTasksAt(opts.Root, opts.StateDir); old != "" {
		log.Warn("container tasks of an earlier state directory are still running: it stays in use until none is left there, and the configured one takes effect at a later start of the agent",
			"in_use", opts.Root, "configured", opts.StateDir, "task", old)
		opts.StateDir = opts.Root
	}
	tasksDir := filepath.Join(opts.StateDir, "tasks")
	d := &Driver{
		opts:      opts,
		runc:      runc{path: opts.Runc, root: filepath.Join(opts.StateDir, "runc")},
		tasksDir:  tasksDir,
		layersDir: filepath.Join(opts.Root, "layers"),
		log:       log,
		sup:       sup,
		userns:    newUserNS(opts.UserNS, opts.Root, tasksDir, log),
	}
	for _, dir := range []string{d.tasksDir, d.runc.root, d.layersDir} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("ctrdriver: %w", err)
		}
	}
	if opts.Entry == "" {
		opts.Entry = filepath.Join(filepath.Dir(sup.MonitorPath()), EntryName)
	}
	d.seccomp = newSeccompLoader(opts.Entry, opts.StateDir, seccomp.DefaultProfile())
	if d.seccomp.entry == nil {
		log.Info("runc installs the containers' seccomp filter, compiling it on every start", "reason", d.seccomp.reason)
	}
	if err := d.sweepLayers(); err != nil {
		return nil, fmt.Errorf("ctrdriver: %w", err)
	}
	if d.volatile, err = probeVolatile(opts.Root); err != nil {
		return nil, fmt.Errorf("ctrdriver: %w", err)
	}
	if !d.volatile {
		log.Info("overlayfs takes no volatile option on this kernel: each ended container's writable layer is synced at its unmount")
	}
	if d.scratch, err = loopfs.NewTemplates(filepath.Join(opts.Root, "scratch-templates")); err != nil {
		return nil, fmt.Errorf("ctrdriver: %w", err)
	}
	if d.layers, err = newLayerPool(filepath.Join(opts.Root, poolDir), opts.LayerPoolBytes, opts.LayerPool, d.scratch, log); err != nil {
		return nil, fmt.Errorf("ctrdriver: %w", err)
	}
	return d, nil
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return Name }

// Close implements driver.Driver. The driver holds no connection: tasks
// belong to their monitors and keep running. What it made ahead (user
// namespaces, spare monitors, prepared layers) is released.
func (d *Driver) Close(ctx context.Context) error {
	d.userns.pool.close()
	d.sup.Close()
	return d.layers.close()
}

// Fingerprint implements driver.Driver.
func (d *Driver) Fingerprint(ctx context.Context) driver.Fingerprint {
	fp := driver.Fingerprint{
		Capabilities: driver.Capabilities{HostNetwork: true},
		Details:      map[string]string{"cgroup_mode": cgroupMode(), "runc_path": d.runc.path},
	}
	d.userns.describe(fp.Details)
	d.layers.describe(fp.Details)
	d.seccomp.describe(fp.Details)
	fp.Details["prepared_monitors"] = d.sup.SpareStatus()
	fp.Details["state_dir"] = d.opts.StateDir
	fp.Details["overlay_volatile"] = "off"
	if d.volatile {
		fp.Details["overlay_volatile"] = "on"
	}
	fp.Capabilities.UserNS = fp.Details["userns"] == "on"
	v, err := d.runc.version(ctx)
	if err != nil {
		fp.Reason = fmt.Sprintf("runc is not usable: %v", err)
		return fp
	}
	fp.Version = v
	fp.Details["runc_version"] = v
	if os.Geteuid() != 0 {
		fp.Reason = "the agent does not run as root; runc containers need root"
		return fp
	}
	if err := checkControllers(); err != nil {
		fp.Reason = err.Error()
		return fp
	}
	if _, err := os.Stat(d.sup.MonitorPath()); err != nil {
		fp.Reason = fmt.Sprintf("the monitor binary is missing: %v (install berth-monitor next to berth)", err)
		return fp
	}
	fp.Healthy = true
	return fp
}

func (d *Driver) taskDir(id string) string { return filepath.Join(d.tasksDir, id) }

// layerDir is where task id's writable layer is, on disk.
func (d *Driver) layerDir(id string) string { return filepath.Join(d.layersDir, id) }

// sweepLayers removes the writable layers no task directory refers to:
// those of tasks that a reboot took with the state directory (a tmpfs),
// and those of starts a crash cut short before the task directory was
// made. It runs before any start.
func (d *Driver) sweepLayers() error {
	entries, err := os.ReadDir(d.layersDir)
	if err != nil {
		return fmt.Errorf("list writable layers: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if _, err := os.Lstat(d.taskDir(e.Name())); !errors.Is(err, os.ErrNotExist) {
			continue // the task's, released with it
		}
		dir := d.layerDir(e.Name())
		if err := unmountAll(filepath.Join(dir, scratchDir)); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("remove the writable layer of a task that is gone: %w", err))
			continue
		}
		d.log.Info("removed the writable layer of a task that is gone (the node rebooted, or a start was cut short)", "task", e.Name())
	}
	return errors.Join(errs...)
}

// liveTasksAt names a task left in root's own task directory when the
// state directory has moved away from root (an agent upgraded to a
// configuration with a state directory, with workloads running): the
// driver keeps root as its state directory while any is there, or it would
// not find them. Empty when there is none.
func liveTasksAt(root, stateDir string) string {
	if filepath.Clean(root) == filepath.Clean(stateDir) {
		return ""
	}
	entries, _ := os.ReadDir(filepath.Join(root, "tasks"))
	for _, e := range entries {
		if e.IsDir() && driver.CheckID(e.Name()) == nil {
			return e.Name()
		}
	}
	return ""
}

// Stats implements driver.Driver.
func (d *Driver) Stats(ctx context.Context, id string) (*driver.Stats, error) {
	t, err := d.sup.Get(id)
	if err != nil {
		return nil, err
	}
	if t.Exited() {
		return nil, fmt.Errorf("container task %s has exited: %w", id, errdefs.ErrFailedPrecondition)
	}
	st, err := readStats(id)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("container task %s has no cgroup (it is exiting): %w", id, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("read cgroup stats of %s: %w", id, err)
	}
	return st, nil
}

// List implements driver.Driver.
func (d *Driver) List(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.tasksDir)
	if err != nil {
		return nil, fmt.Errorf("list container tasks: %w", err)
	}
	ids := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.IsDir() && driver.CheckID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// sbinDirs hold runc on Debian (/usr/sbin/runc) but are often missing from
// the PATH of a login shell that is not root's.
var sbinDirs = []string{"/usr/local/sbin", "/usr/sbin", "/sbin"}

// findRunc resolves a bare runc name through PATH and then the sbin
// directories; a path or an unresolvable name is returned as given, and
// Fingerprint reports it unusable.
func findRunc(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if strings.ContainsRune(name, '/') {
		return name
	}
	for _, dir := range sbinDirs {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}

// withSbin appends the sbin directories PATH lacks.
func withSbin(path string) string {
	have := map[string]bool{}
	for _, dir := range filepath.SplitList(path) {
		have[dir] = true
	}
	for _, dir := range sbinDirs {
		if !have[dir] {
			if path != "" {
				path += string(filepath.ListSeparator)
			}
			path += dir
		}
	}
	return path
}
