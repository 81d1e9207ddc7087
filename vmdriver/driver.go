package vmdriver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

// Name is the isolation vmdriver provides.
const Name = "vm"

// handleVersion is the version of the handles Start returns. Version 2
// handles carry no state: the task directory is the only truth.
const handleVersion = 2

// Defaults of Options.
const (
	DefaultURI          = "qemu:///system"
	DefaultDomainPrefix = "berth-"
)

const (
	// powerButtonInterval is how often Stop presses the power button again
	// while it waits: berth-init ignores a press that arrives before it has
	// found its devices, and a workload may trap a first SIGTERM.
	powerButtonInterval = 2 * time.Second
	// destroyWait bounds how long Destroy waits for a forced-off VM's
	// monitor to record the end before removing the task anyway.
	destroyWait = 15 * time.Second
	// maxMonitorRespawns bounds how often a task's monitor is restarted
	// while its VM runs before berth gives up and forces the VM off.
	maxMonitorRespawns = 3
	// consoleTail is how much of console.log an error about a crashed
	// guest quotes.
	consoleTail = 2048
	// maxSocketPath is the room in sockaddr_un.sun_path, less the NUL.
	maxSocketPath = 107
)

// Files in a task directory.
const (
	taskStateFile = "task.json"
	rootDiskFile  = "root.qcow2"
	configDisk    = "config.img"
	consoleLog    = "console.log"
	statusLog     = "status.log"
	killedFile    = "killed"
	// consoleSocket is a whole-disk task's serial console (QEMU listens).
	consoleSocket = "console.sock"
	// consolePort names the serial console among the monitor's ports.
	consolePort = "console"
)

var portSockets = map[string]string{
	guest.StdoutPort: "stdout.sock",
	guest.StderrPort: "stderr.sock",
	guest.StatusPort: "status.sock",
}

// Options configure the driver.
type Options struct {
	// Root is the driver's state directory, e.g. /var/lib/berth/vms. QEMU
	// runs as libvirt's unprivileged user and opens the task disks under
	// it, so Root and its parents must be traversable (o+x); Fingerprint
	// says when they are not.
	Root string
	// URI is libvirt's connection URI; default DefaultURI.
	URI string
	// Accel is auto (default), kvm or tcg. auto boots a probe guest under
	// KVM once, in the background, and uses KVM only if it reaches user
	// space within ProbeTimeout.
	Accel Accel
	// Boot is how guests boot the node's kernel: auto (default: through
	// its PVH entry point where the kernel allows, else its bzImage), pvh
	// or bzimage. See BootMode.
	Boot BootMode
	// Firmware is what runs before a directly booted kernel: auto
	// (default: qboot where installed, else SeaBIOS), qboot or seabios;
	// QbootPath is where qboot is looked for (default DefaultQbootPath).
	// See Firmware.
	Firmware  Firmware
	QbootPath string
	// ProbeTimeout bounds auto's KVM probe guest; default DefaultProbeTimeout.
	ProbeTimeout time.Duration
	// DomainPrefix starts the name of every domain of this driver; default
	// DefaultDomainPrefix. Domains are named prefix + task id.
	DomainPrefix string
	// InitPath is the static berth-init binary put into the initramfs;
	// default: berth-init next to this executable.
	InitPath string
	// BootDir and ModulesDir are where the guest kernel and its modules
	// are found; default /boot and /lib/modules.
	BootDir, ModulesDir string
	// MonitorCmd starts a monitor; the task directory is appended.
	// Default: berth-monitor next to this executable.
	MonitorCmd []string
	// MonitorEnv is the monitor's environment (default: none but PATH).
	MonitorEnv []string
	// LogMaxBytes caps each of a task's stdout and stderr logs; 0 means 64 MiB.
	LogMaxBytes int64
	// QEMUGroup is the group QEMU runs in (name or number, e.g. Debian's
	// libvirt-qemu): the only one that may pass through the driver's
	// directories. Empty: anyone may pass through (0711), nobody may list.
	QEMUGroup string
	// StatusMaxBytes caps the guest's status channel: a guest that writes
	// more is misbehaving, and its VM is ended. 0 means 1 MiB.
	StatusMaxBytes int64
	// BootID is the node's boot id (default: the kernel's); tests set
	// another one to simulate a reboot.
	BootID string
	// BaseHeadroom is the free space of each image's root disk (default
	// rootdisk.DefaultHeadroom).
	BaseHeadroom int64
	// VolumeTransport is auto (default), virtiofs or 9p (volumes.go);
	// VirtiofsdPath overrides where virtiofsd is looked for.
	VolumeTransport VolumeTransport
	VirtiofsdPath   string
	Logger          *slog.Logger
}

// Driver is the libvirt VM driver.
type Driver struct {
	opts     Options
	hv       *hypervisor
	tasksDir string
	cacheDir string
	log      *slog.Logger

	// The boot assets, prepared once per node kernel (see bootAssets).
	bootMu      sync.Mutex
	boot        *bootAssets
	bootWarming atomic.Bool // a preparation runs in the background

	// The acceleration, decided once (see resolveAccel).
	accelMu    sync.Mutex
	accel      *accelChoice
	probeDone  chan struct{} // set while the KVM probe runs; closed at its end
	probeErr   error         // why the last probe could not run
	probeErrAt time.Time
	probeWG    sync.WaitGroup
	// cheapAccel and probeGuest decide the acceleration; tests replace them.
	cheapAccel func(ctx context.Context) (c accelChoice, probe bool, err error)
	probeGuest func(ctx context.Context) (probeOutcome, error)
	// probeCPUModel, when set, replaces the probe guest's host-model CPU
	// (tests: a model nested KVM starts, to see a guest hang).
	probeCPUModel string

	// ctx ends at Close, stopping a running probe.
	ctx    context.Context
	cancel context.CancelFunc

	sup *supervisor.Supervisor[taskState]

	// execChans are the VMs' exec channel connections, by task id.
	execMu    sync.Mutex
	execChans map[string]*execChannel

	// qemuGID is QEMU's group (Options.QEMUGroup); -1 for none.
	qemuGID int
}

var _ driver.Driver = (*Driver)(nil)

// taskState is task.json: what the driver knows of a task beyond its
// files, written at Start.
type taskState struct {
	ID     string `json:"id"`
	Domain string `json:"domain"`
	UUID   string `json:"uuid,omitempty"`
	LogDir string `json:"log_dir"`
	// LogMaxBytes and LogMaxFiles are the task's own log limits (0: the
	// driver's).
	LogMaxBytes int64      `json:"log_max_bytes,omitempty"`
	LogMaxFiles int        `json:"log_max_files,omitempty"`
	Accel       Accel      `json:"accel"`
	QEMU        proc.Ident `json:"qemu"`
	MemoryBytes int64      `json:"memory_bytes"`
	StartedAt   time.Time  `json:"started_at"`
	// WholeDisk is the whole-disk image (driver.Image.DiskPath) the task
	// boots; empty for an OCI task booted into berth-init.
	WholeDisk string `json:"whole_disk,omitempty"`
	// BootID is the node's boot id at Start: a task of another boot is
	// gone with it.
	BootID string `json:"boot_id,omitempty"`
	// Attach says the task's berth-init serves attach sessions (a VM
	// started by an older berth does not, and must not be sent them);
	// Stdin and TTY are the task's driver.TaskConfig fields.
	Attach bool `json:"attach,omitempty"`
	Stdin  bool `json:"stdin,omitempty"`
	TTY    bool `json:"tty,omitempty"`
}

// task is the driver's view of one VM.
type task = supervisor.Task[taskState]

// New prepares the driver's directories. It does not connect to libvirt:
// Fingerprint reports whether libvirt is reachable, and every call
// (re)connects as needed.
func New(opts Options) (*Driver, error) {
	if opts.Root == "" {
		return nil, errors.New("vmdriver: root directory is required")
	}
	root, err := filepath.Abs(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("vmdriver: %w", err)
	}
	opts.Root = root
	if opts.URI == "" {
		opts.URI = DefaultURI
	}
	if opts.Accel == "" {
		opts.Accel = AccelAuto
	}
	switch opts.Accel {
	case AccelAuto, AccelKVM, AccelTCG:
	default:
		return nil, fmt.Errorf("vmdriver: accel %q: want auto, kvm or tcg: %w", opts.Accel, errdefs.ErrInvalidArgument)
	}
	if opts.Boot, err = checkBootMode(opts.Boot); err != nil {
		return nil, fmt.Errorf("vmdriver: %w", err)
	}
	if opts.Firmware, err = checkFirmware(opts.Firmware); err != nil {
		return nil, fmt.Errorf("vmdriver: %w", err)
	}
	if opts.QbootPath == "" {
		opts.QbootPath = DefaultQbootPath
	}
	if opts.ProbeTimeout <= 0 {
		opts.ProbeTimeout = DefaultProbeTimeout
	}
	if opts.DomainPrefix == "" {
		opts.DomainPrefix = DefaultDomainPrefix
	}
	if opts.BootDir == "" {
		opts.BootDir = "/boot"
	}
	if opts.ModulesDir == "" {
		opts.ModulesDir = "/lib/modules"
	}
	if opts.InitPath == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("vmdriver: find own executable: %w", err)
		}
		opts.InitPath = filepath.Join(filepath.Dir(exe), "berth-init")
	}
	if opts.MonitorEnv == nil {
		opts.MonitorEnv = []string{"PATH=" + os.Getenv("PATH")}
	}
	if opts.LogMaxBytes == 0 {
		opts.LogMaxBytes = 64 << 20
	}
	if opts.StatusMaxBytes == 0 {
		opts.StatusMaxBytes = 1 << 20
	}
	if opts.BaseHeadroom == 0 {
		opts.BaseHeadroom = rootdisk.DefaultHeadroom
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	d := &Driver{
		opts:     opts,
		hv:       &hypervisor{uri: opts.URI},
		tasksDir: filepath.Join(opts.Root, "tasks"),
		cacheDir: filepath.Join(opts.Root, "cache"),
		log:      opts.Logger.With("driver", Name),

		execChans: map[string]*execChannel{},
	}
	sup, err := supervisor.New[taskState](supervisor.Options{
		Kind: monitor.KindPorts, Noun: "vm task",
		Monitor: opts.MonitorCmd, Env: opts.MonitorEnv, BootID: opts.BootID, Logger: d.log,
	})
	if err != nil {
		return nil, fmt.Errorf("vmdriver: %w", err)
	}
	d.sup = sup
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.cheapAccel = func(ctx context.Context) (accelChoice, bool, error) { return chooseAccel(ctx, d.hv, d.opts.Accel) }
	d.probeGuest = func(ctx context.Context) (probeOutcome, error) {
		return d.bootProbeGuest(ctx, AccelKVM, d.opts.ProbeTimeout)
	}
	if d.qemuGID, err = resolveGroup(opts.QEMUGroup); err != nil {
		return nil, err
	}
	// QEMU (libvirt's unprivileged user) may pass through to the disks
	// libvirt hands it, and list nothing (perms.go).
	for _, dir := range []string{opts.Root, d.tasksDir, d.cacheDir} {
		if err := d.qemuDir(dir, os.MkdirAll); err != nil {
			return nil, fmt.Errorf("vmdriver: %w", err)
		}
	}
	return d, nil
}

// Close stops a running KVM probe (removing its guest) and drops the
// libvirt connection and the exec channels (their sessions end). Tasks
// keep running.
func (d *Driver) Close(ctx context.Context) error {
	d.cancel()
	d.closeExec()
	probed := make(chan struct{})
	go func() {
		d.probeWG.Wait()
		close(probed)
	}()
	select {
	case <-probed:
	case <-ctx.Done():
		return fmt.Errorf("vmdriver: close: the KVM probe guest is still being removed: %w", ctx.Err())
	}
	d.hv.close()
	return nil
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return Name }

func (d *Driver) taskDir(id string) string    { return filepath.Join(d.tasksDir, id) }
func (d *Driver) domainName(id string) string { return d.opts.DomainPrefix + id }
