package vmdriver

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"libvirt.org/go/libvirtxml"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/vmdriver/initramfs"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

// Name is the isolation vmdriver provides.
const Name = "vm"

// handleVersion is the version of handleState; bump it when the layout changes.
const handleVersion = 1

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
	// MonitorCmd starts a monitor; the task directory is appended. Default:
	// this executable with the argument "vm-monitor" (`berth vm-monitor DIR`).
	MonitorCmd []string
	// MonitorEnv is the monitor's environment (default: none but PATH).
	MonitorEnv []string
	// LogMaxBytes caps each of a task's stdout and stderr logs; 0 means 64 MiB.
	LogMaxBytes int64
	// BaseHeadroom is the free space of each image's root disk (default
	// rootdisk.DefaultHeadroom).
	BaseHeadroom int64
	Logger       *slog.Logger
}

// Driver is the libvirt VM driver.
type Driver struct {
	opts     Options
	hv       *hypervisor
	tasksDir string
	cacheDir string
	log      *slog.Logger

	bootMu sync.Mutex
	boot   *bootAssets

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

	mu    sync.Mutex
	tasks map[string]*task
}

var _ driver.Driver = (*Driver)(nil)

// bootAssets are the kernel and initramfs every guest boots.
type bootAssets struct {
	kernel initramfs.Kernel
	initrd string
}

// taskState is task.json: what the driver knows of a task beyond its
// files, written at Start.
type taskState struct {
	ID          string     `json:"id"`
	Domain      string     `json:"domain"`
	UUID        string     `json:"uuid,omitempty"`
	LogDir      string     `json:"log_dir"`
	Accel       Accel      `json:"accel"`
	QEMU        proc.Ident `json:"qemu"`
	MemoryBytes int64      `json:"memory_bytes"`
	StartedAt   time.Time  `json:"started_at"`
	// WholeDisk is the whole-disk image (driver.Image.DiskPath) the task
	// boots; empty for an OCI task booted into berth-init.
	WholeDisk string `json:"whole_disk,omitempty"`
}

// task is the driver's in-memory view of one VM.
type task struct {
	id    string
	dir   string
	state taskState
	done  chan struct{} // closed once exit is set
	exit  *driver.ExitResult

	mu      sync.Mutex
	monitor proc.Ident
}

type handleState struct {
	Dir     string     `json:"dir"`
	Domain  string     `json:"domain"`
	QEMU    proc.Ident `json:"qemu"`
	Monitor proc.Ident `json:"monitor"`
}

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
	if opts.InitPath == "" || len(opts.MonitorCmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("vmdriver: find own executable: %w", err)
		}
		if opts.InitPath == "" {
			opts.InitPath = filepath.Join(filepath.Dir(exe), "berth-init")
		}
		if len(opts.MonitorCmd) == 0 {
			opts.MonitorCmd = []string{exe, "vm-monitor"}
		}
	}
	if opts.MonitorEnv == nil {
		opts.MonitorEnv = []string{"PATH=" + os.Getenv("PATH")}
	}
	if opts.LogMaxBytes == 0 {
		opts.LogMaxBytes = 64 << 20
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
		tasks:    map[string]*task{},
	}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	d.cheapAccel = func(ctx context.Context) (accelChoice, bool, error) { return chooseAccel(ctx, d.hv, d.opts.Accel) }
	d.probeGuest = func(ctx context.Context) (probeOutcome, error) {
		return d.bootProbeGuest(ctx, AccelKVM, d.opts.ProbeTimeout)
	}
	// 0711: QEMU (libvirt's unprivileged user) may pass through to the
	// disks libvirt hands it, and list nothing.
	for _, dir := range []string{opts.Root, d.tasksDir, d.cacheDir} {
		if err := os.MkdirAll(dir, 0o711); err != nil {
			return nil, fmt.Errorf("vmdriver: %w", err)
		}
		if err := os.Chmod(dir, 0o711); err != nil {
			return nil, fmt.Errorf("vmdriver: %w", err)
		}
	}
	return d, nil
}

// Close stops a running KVM probe (removing its guest) and drops the
// libvirt connection. Tasks keep running.
func (d *Driver) Close(ctx context.Context) error {
	d.cancel()
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

// Fingerprint implements driver.Driver.
func (d *Driver) Fingerprint(ctx context.Context) driver.Fingerprint {
	fp := driver.Fingerprint{Details: map[string]string{"uri": d.opts.URI, "accel_config": string(d.opts.Accel)}}
	unhealthy := func(format string, args ...any) driver.Fingerprint {
		fp.Healthy = false
		fp.Reason = fmt.Sprintf(format, args...)
		return fp
	}
	err := d.hv.do(ctx, func(c *libvirt.Connect) error {
		lib, err := c.GetLibVersion()
		if err != nil {
			return err
		}
		fp.Version = versionString(lib)
		fp.Details["libvirt_version"] = fp.Version
		if hv, err := c.GetVersion(); err == nil {
			fp.Details["qemu_version"] = versionString(hv)
		}
		return nil
	})
	if err != nil {
		return unhealthy("libvirt is unreachable: %v", lvError(err))
	}
	// Never waits for the KVM probe: while it runs, accel is "probing"
	// and the driver healthy (Start waits for the verdict).
	choice, err := d.resolveAccel(ctx, false)
	if err != nil {
		return unhealthy("%v", err)
	}
	fp.Details["accel"] = string(choice.Accel)
	fp.Details["accel_reason"] = choice.Reason
	if choice.Probed {
		fp.Details["accel_probe_duration"] = choice.ProbeTook.Round(time.Millisecond).String()
	}
	k, err := initramfs.FindKernel(d.opts.BootDir, d.opts.ModulesDir)
	if err != nil {
		return unhealthy("no guest kernel: %v (install linux-image-amd64)", err)
	}
	fp.Details["kernel"] = k.Release
	if _, err := os.Stat(d.opts.InitPath); err != nil {
		return unhealthy("berth-init is missing: %v (build cmd/berth-init static and install it next to berth)", err)
	}
	for _, tool := range []string{"qemu-img", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			return unhealthy("%s is not installed (install qemu-utils and e2fsprogs)", tool)
		}
	}
	if d.opts.URI == DefaultURI {
		if _, err := os.Stat(virtlogdSocket); err != nil {
			return unhealthy("virtlogd is not running (%s is missing): libvirt needs it for the VM console; start it with `virtlogd -d`", virtlogdSocket)
		}
	}
	if dir := untraversable(d.opts.Root); dir != "" {
		return unhealthy("%s is not traversable by others (mode o-x): QEMU runs unprivileged and cannot reach the task disks under %s; chmod o+x %s", dir, d.opts.Root, dir)
	}
	fp.Healthy = true
	return fp
}

// virtlogdSocket is where the system virtlogd listens.
const virtlogdSocket = "/run/libvirt/virtlogd-sock"

// versionString turns libvirt's major*1e6+minor*1e3+micro into "M.m.u".
func versionString(v uint32) string {
	return fmt.Sprintf("%d.%d.%d", v/1000000, v/1000%1000, v%1000)
}

// untraversable returns the first directory from / to dir that others
// cannot search, or "".
func untraversable(dir string) string {
	for p := dir; ; p = filepath.Dir(p) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o001 == 0 {
			return p
		}
		if p == filepath.Dir(p) {
			return ""
		}
	}
}

// bootAssets finds the kernel and builds (or finds cached) the initramfs.
func (d *Driver) bootAssets(ctx context.Context) (*bootAssets, error) {
	d.bootMu.Lock()
	defer d.bootMu.Unlock()
	if d.boot != nil {
		return d.boot, nil
	}
	k, err := initramfs.FindKernel(d.opts.BootDir, d.opts.ModulesDir)
	if err != nil {
		return nil, fmt.Errorf("guest kernel: %w: %w", err, errdefs.ErrUnavailable)
	}
	initrd, err := initramfs.Build(ctx, initramfs.Options{Kernel: k, InitPath: d.opts.InitPath, CacheDir: d.cacheDir})
	if err != nil {
		return nil, err
	}
	d.boot = &bootAssets{kernel: k, initrd: initrd}
	return d.boot, nil
}

func (d *Driver) taskDir(id string) string    { return filepath.Join(d.tasksDir, id) }
func (d *Driver) domainName(id string) string { return d.opts.DomainPrefix + id }

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("task id %q: want 1-64 letters, digits, '.', '_' or '-': %w", id, errdefs.ErrInvalidArgument)
	}
	return nil
}

func validateTask(cfg *driver.TaskConfig) error {
	var problems []string
	if err := checkID(cfg.ID); err != nil {
		problems = append(problems, err.Error())
	}
	switch disk := cfg.Image.DiskPath; {
	case disk != "":
		// The disk's own OS decides what runs: Args and the rest are unused.
		if err := checkWholeDisk(disk); err != nil {
			problems = append(problems, "image: "+err.Error())
		}
	case len(cfg.Args) == 0:
		problems = append(problems, "args: a command is required")
	}
	if cfg.Image.RootfsDir == "" && cfg.Image.DiskPath == "" {
		problems = append(problems, "image: rootfs dir or disk path is required")
	}
	if cfg.LogDir == "" {
		problems = append(problems, "log dir is required")
	}
	if cfg.Resources.CPU < 0 || cfg.Resources.MemoryBytes < 0 {
		problems = append(problems, "resources: negative cpu or memory")
	}
	if len(problems) > 0 {
		return fmt.Errorf("vm task: %s: %w", strings.Join(problems, "; "), errdefs.ErrInvalidArgument)
	}
	return nil
}

// qcow2Magic starts every qcow2 image.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb}

// checkWholeDisk checks that a whole-disk image is an absolute path to a
// qcow2 image, before anything is built for it.
func checkWholeDisk(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("disk path %q is not absolute", path)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("disk image: %v", err)
	}
	defer f.Close()
	magic := make([]byte, len(qcow2Magic))
	if _, err := io.ReadFull(f, magic); err != nil || !bytes.Equal(magic, qcow2Magic) {
		return fmt.Errorf("disk image %s is not a qcow2 image", path)
	}
	return nil
}

// Start implements driver.Driver.
func (d *Driver) Start(ctx context.Context, cfg *driver.TaskConfig) (h *driver.Handle, err error) {
	if err := validateTask(cfg); err != nil {
		return nil, err
	}
	dir := d.taskDir(cfg.ID)
	if n := len(filepath.Join(dir, portSockets[guest.StatusPort])); n > maxSocketPath {
		return nil, fmt.Errorf("vm task %s: socket paths under %s would be %d bytes, more than unix sockets allow (%d); use a shorter driver root: %w",
			cfg.ID, d.opts.Root, n, maxSocketPath, errdefs.ErrInvalidArgument)
	}
	if err := os.Mkdir(dir, 0o711); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("vm task %s: %w", cfg.ID, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("create task dir: %w", err)
	}
	domainCreated := false
	defer func() {
		if err != nil {
			if cerr := d.cleanup(context.WithoutCancel(ctx), cfg.ID, domainCreated); cerr != nil {
				d.log.Warn("clean up after failed start", "task_id", cfg.ID, "err", cerr)
			}
		}
	}()

	// Fail fast, before building anything, when libvirt is unreachable.
	if _, err := d.hv.connect(); err != nil {
		return nil, err
	}
	// Waits for auto's KVM probe when it still runs.
	choice, err := d.resolveAccel(ctx, true)
	if err != nil {
		return nil, err
	}
	st := taskState{
		ID: cfg.ID, Domain: d.domainName(cfg.ID), LogDir: cfg.LogDir, Accel: choice.Accel,
		MemoryBytes: cfg.Resources.MemoryBytes, WholeDisk: cfg.Image.DiskPath,
	}
	if st.MemoryBytes <= 0 {
		st.MemoryBytes = DefaultMemoryBytes
	}
	spec := domainSpec{
		Name:       st.Domain,
		Meta:       domainMeta{ID: cfg.ID, Root: d.opts.Root},
		Accel:      choice.Accel,
		VCPUs:      vcpus(cfg.Resources.CPU),
		MemoryKi:   memoryKiB(cfg.Resources.MemoryBytes),
		RootDisk:   filepath.Join(dir, rootDiskFile),
		RootFormat: "qcow2",
	}
	if n := cfg.Network; n != nil {
		switch n.Mode {
		case driver.NetworkBridge:
			if n.Bridge == "" || n.MAC == "" {
				return nil, fmt.Errorf("vm task %s: a bridge network needs a bridge and a MAC: %w", cfg.ID, errdefs.ErrInvalidArgument)
			}
			spec.Interfaces = []libvirtxml.DomainInterface{bridgeInterface(n.Bridge, n.MAC)}
		case driver.NetworkHost:
			return nil, fmt.Errorf("vm task %s: the host network exists only for containers: %w", cfg.ID, errdefs.ErrInvalidArgument)
		}
	}
	if st.WholeDisk != "" {
		// The disk boots by its own bootloader; its serial console is the
		// task's stdout, through the monitor.
		if err := rootdisk.OverlayOf(ctx, st.WholeDisk, "qcow2", spec.RootDisk); err != nil {
			return nil, err
		}
		spec.WholeDisk = true
		spec.ConsoleSocket = filepath.Join(dir, consoleSocket)
	} else if err := d.prepareBoot(ctx, cfg, dir, &spec); err != nil {
		return nil, err
	}
	// The monitor appends here; create them now so the agent can tail
	// them from the moment Start returns.
	for _, name := range []string{driver.StdoutLog, driver.StderrLog} {
		f, err := os.OpenFile(filepath.Join(cfg.LogDir, name), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, fmt.Errorf("create log: %w", err)
		}
		f.Close()
	}
	xmlDoc, err := domainXML(spec)
	if err != nil {
		return nil, err
	}
	// task.json before the domain: a Recover after a crash right after
	// CreateXML must know the domain is ours and where its logs go.
	if err := fileutil.WriteJSON(filepath.Join(dir, taskStateFile), st); err != nil {
		return nil, err
	}
	domainCreated = true // from here on, a failure may have left one
	// A whole-disk guest starts paused until its monitor is connected: a
	// serial port without a client drops what the guest writes (unlike the
	// virtio-serial ports berth-init uses, whose writes wait).
	createFlags := libvirt.DOMAIN_NONE
	if spec.WholeDisk {
		createFlags = libvirt.DOMAIN_START_PAUSED
	}
	err = d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := c.DomainCreateXML(xmlDoc, createFlags)
		if err != nil {
			return err
		}
		defer dom.Free()
		st.UUID, _ = dom.GetUUIDString()
		return nil
	})
	if err != nil {
		var le libvirt.Error
		if errors.As(err, &le) && le.Code == libvirt.ERR_OPERATION_FAILED && strings.Contains(le.Message, "already exists") {
			return nil, fmt.Errorf("vm task %s: domain %s: %w", cfg.ID, st.Domain, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("start domain %s: %w", st.Domain, lvError(err))
	}
	st.StartedAt = time.Now().UTC()
	if pid, err := findQEMU(st.Domain); err == nil {
		st.QEMU, _ = proc.Identify(pid)
	} else {
		d.log.Warn("cannot find the VM's qemu process; following it through libvirt only", "task_id", cfg.ID, "err", err)
	}
	if err := fileutil.WriteJSON(filepath.Join(dir, taskStateFile), st); err != nil {
		return nil, err
	}
	t := &task{id: cfg.ID, dir: dir, state: st, done: make(chan struct{})}
	exited, err := d.spawnMonitor(ctx, t)
	if err != nil {
		return nil, err
	}
	if res, ok := readMonitorResult(dir); ok && res.Error != "" {
		<-exited
		return nil, fmt.Errorf("vm task %s: monitor: %s (see %s)", cfg.ID, res.Error, filepath.Join(dir, monitorLogFile))
	}
	if spec.WholeDisk {
		if err := d.resume(ctx, cfg.ID); err != nil {
			return nil, err
		}
	}
	d.mu.Lock()
	d.tasks[cfg.ID] = t
	d.mu.Unlock()
	go d.supervise(t, exited)
	return d.handle(t), nil
}

// prepareBoot readies an OCI task's direct kernel boot: the kernel and
// initramfs, the root disk overlay over the image's ext4 base, the config
// disk for berth-init and the virtio-serial ports.
func (d *Driver) prepareBoot(ctx context.Context, cfg *driver.TaskConfig, dir string, spec *domainSpec) error {
	boot, err := d.bootAssets(ctx)
	if err != nil {
		return err
	}
	base, err := rootdisk.Base(ctx, cfg.Image.RootfsDir, baseKey(cfg.Image), d.cacheDir, rootdisk.WithHeadroom(d.opts.BaseHeadroom))
	if err != nil {
		return err
	}
	if err := rootdisk.Overlay(ctx, base, spec.RootDisk); err != nil {
		return err
	}
	gcfg, err := guestConfig(cfg)
	if err != nil {
		return err
	}
	cfgData, err := guest.EncodeConfig(gcfg)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, configDisk), cfgData, 0o644); err != nil {
		return fmt.Errorf("write config disk: %w", err)
	}
	spec.Kernel, spec.Initrd, spec.Cmdline = boot.kernel.Path, boot.initrd, kernelCmdline
	spec.ConfigDisk = filepath.Join(dir, configDisk)
	spec.Console = filepath.Join(dir, consoleLog)
	spec.Ports = map[string]string{}
	for port, sock := range portSockets {
		spec.Ports[port] = filepath.Join(dir, sock)
	}
	return nil
}

// resume starts the vCPUs of a task's domain created paused.
func (d *Driver) resume(ctx context.Context, id string) error {
	return d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil {
			return err
		}
		if dom == nil {
			return nil // it already ended: the monitor records how
		}
		defer dom.Free()
		if err := dom.Resume(); err != nil && !isNotRunning(err) {
			return fmt.Errorf("resume domain %s: %w", d.domainName(id), lvError(err))
		}
		return nil
	})
}

func (d *Driver) handle(t *task) *driver.Handle {
	t.mu.Lock()
	hs := handleState{Dir: t.dir, Domain: t.state.Domain, QEMU: t.state.QEMU, Monitor: t.monitor}
	t.mu.Unlock()
	state, _ := json.Marshal(hs)
	return &driver.Handle{ID: t.id, Driver: Name, Version: handleVersion, State: state}
}

// baseKey identifies an image's root disk in the cache: its digest, or,
// for an image without one, its rootfs path.
func baseKey(img driver.Image) string {
	if img.Digest != "" {
		return img.Digest
	}
	sum := sha256.Sum256([]byte(img.RootfsDir))
	return "rootfs-" + hex.EncodeToString(sum[:8])
}

// guestConfig is what berth-init is told: the task's command, environment,
// working directory, numeric user (resolved against the image's own
// /etc/passwd here, where an error can reach the submitter) and hostname.
func guestConfig(cfg *driver.TaskConfig) (guest.Config, error) {
	uid, gid, err := driver.ResolveUser(cfg.Image.RootfsDir, cfg.User)
	if err != nil {
		return guest.Config{}, err
	}
	user := ""
	if cfg.User != "" {
		user = strconv.FormatUint(uint64(uid), 10) + ":" + strconv.FormatUint(uint64(gid), 10)
	}
	host := cfg.Name
	if host == "" {
		host = cfg.ID
	}
	if len(host) > 63 {
		host = host[:63]
	}
	gc := guest.Config{Args: cfg.Args, Env: cfg.Env, Workdir: cfg.Workdir, User: user, Hostname: host}
	if n := cfg.Network; n != nil && n.Mode == driver.NetworkBridge {
		gc.Network = &guest.Network{Interface: "eth0", Address: n.Address, Gateway: n.Gateway, DNS: n.DNS}
	}
	return gc, nil
}

// findQEMU returns the pid of the domain's QEMU: from libvirtd's pid file,
// or, when libvirt keeps it elsewhere, from the process table (QEMU's
// command line carries "-name guest=NAME,").
func findQEMU(domain string) (int, error) {
	for _, dir := range []string{"/run/libvirt/qemu", "/var/run/libvirt/qemu"} {
		data, err := os.ReadFile(filepath.Join(dir, domain+".pid"))
		if err != nil {
			continue
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 0 {
			return pid, nil
		}
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	needle := []byte("guest=" + domain + ",")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, needle) {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no qemu process for domain %s", domain)
}

// spawnMonitor starts the task's monitor and waits until it has connected
// to the VM's ports (or given up). The returned channel closes when the
// monitor exits.
func (d *Driver) spawnMonitor(ctx context.Context, t *task) (<-chan struct{}, error) {
	mcfg := monitorConfig{
		ID: t.id, QEMU: t.state.QEMU, LogMaxBytes: d.opts.LogMaxBytes,
		Sockets: map[string]string{},
		Outputs: map[string]string{
			guest.StdoutPort: filepath.Join(t.state.LogDir, driver.StdoutLog),
			guest.StderrPort: filepath.Join(t.state.LogDir, driver.StderrLog),
			guest.StatusPort: filepath.Join(t.dir, statusLog),
		},
		Durable: []string{guest.StatusPort},
	}
	for port, sock := range portSockets {
		mcfg.Sockets[port] = filepath.Join(t.dir, sock)
	}
	if t.state.WholeDisk != "" {
		// One port: the serial console is the task's stdout.
		mcfg.Sockets = map[string]string{consolePort: filepath.Join(t.dir, consoleSocket)}
		mcfg.Outputs = map[string]string{consolePort: filepath.Join(t.state.LogDir, driver.StdoutLog)}
		mcfg.Durable = nil
	}
	if err := fileutil.WriteJSON(filepath.Join(t.dir, monitorConfigFile), mcfg); err != nil {
		return nil, err
	}
	_ = os.Remove(filepath.Join(t.dir, monitorDoneFile))
	logf, err := os.OpenFile(filepath.Join(t.dir, monitorLogFile), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer readyR.Close()
	args := append(append([]string(nil), d.opts.MonitorCmd[1:]...), t.dir)
	cmd := exec.Command(d.opts.MonitorCmd[0], args...)
	cmd.Env = d.opts.MonitorEnv
	cmd.Dir = t.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{readyW} // fd 3 = readyFD
	// Its own session: the agent's death or its terminal's signals must not
	// reach the monitor.
	cmd.SysProcAttr = &unix.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		readyW.Close()
		return nil, fmt.Errorf("start monitor: %w", err)
	}
	readyW.Close()
	ident, err := proc.Identify(cmd.Process.Pid)
	if err != nil {
		ident = proc.Ident{Pid: cmd.Process.Pid}
	}
	if err := fileutil.WriteJSON(filepath.Join(t.dir, monitorPidFile), ident); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, err
	}
	t.mu.Lock()
	t.monitor = ident
	t.mu.Unlock()
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait() // it is our child while this agent lives: reap it
		close(exited)
	}()
	readCh := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = readyR.Read(b[:])
		close(readCh)
	}()
	select {
	case <-readCh:
		return exited, nil
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-exited
		return nil, ctx.Err()
	}
}

func readMonitorResult(dir string) (monitorResult, bool) {
	var res monitorResult
	if err := fileutil.ReadJSON(filepath.Join(dir, monitorDoneFile), &res); err != nil {
		return res, false
	}
	return res, true
}

// vmAlive reports whether the task's QEMU still runs: by its process
// identity when known, else by asking libvirt.
func (d *Driver) vmAlive(t *task) bool {
	if t.state.QEMU.Pid != 0 {
		return t.state.QEMU.Alive()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	alive, err := d.domainAlive(ctx, t.id)
	if err != nil {
		d.log.Warn("cannot tell whether the VM runs", "task_id", t.id, "err", err)
		return true // keep supervising rather than report a wrong end
	}
	return alive
}

// supervise follows a task's monitor until the VM has ended and its
// result is on disk. A monitor that dies while the VM runs (killed by
// someone) is replaced: the guest's writes wait for the new one.
func (d *Driver) supervise(t *task, exited <-chan struct{}) {
	for respawns := 0; ; respawns++ {
		<-exited
		res, finished := readMonitorResult(t.dir)
		if finished && res.Error == "" || !d.vmAlive(t) {
			d.finish(t)
			return
		}
		reason := "the VM's monitor died while the VM ran"
		if finished {
			reason = "the VM's monitor failed: " + res.Error
		}
		if respawns >= maxMonitorRespawns {
			d.forceOff(t, reason+"; berth forced the VM off")
			return
		}
		d.log.Warn(reason+"; starting a new one", "task_id", t.id)
		ctx, cancel := context.WithTimeout(context.Background(), connectTimeout+5*time.Second)
		next, err := d.spawnMonitor(ctx, t)
		cancel()
		if err != nil {
			d.forceOff(t, fmt.Sprintf("%s and a new monitor could not start (%v); berth forced the VM off", reason, err))
			return
		}
		exited = next
	}
}

// forceOff ends a VM nobody can follow any more and records why.
func (d *Driver) forceOff(t *task, reason string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.destroyDomain(ctx, t.id); err != nil {
		d.log.Error("force off unsupervised VM", "task_id", t.id, "err", err)
	}
	t.exit = &driver.ExitResult{ExitCode: -1, Err: reason, FinishedAt: time.Now().UTC()}
	close(t.done)
}

// finish turns what the VM left on disk into the task's exit result: the
// guest's last status record, or berth's own forced stop, or a crash.
func (d *Driver) finish(t *task) {
	if t.state.WholeDisk != "" {
		t.exit = wholeDiskExitResult(t.dir)
	} else {
		t.exit = exitResult(t.dir)
	}
	close(t.done)
}

// wholeDiskExitResult is how a whole-disk guest ended: nothing in it
// reports a result, so it is 0 when the guest powered itself off (or
// reset, which ends the domain too) and 137 when berth forced it off.
func wholeDiskExitResult(dir string) *driver.ExitResult {
	res := &driver.ExitResult{FinishedAt: monitorFinishedAt(dir)}
	if _, err := os.Stat(filepath.Join(dir, killedFile)); err == nil {
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	}
	return res
}

// monitorFinishedAt is when the monitor saw the VM end, or now.
func monitorFinishedAt(dir string) time.Time {
	if mr, ok := readMonitorResult(dir); ok && !mr.FinishedAt.IsZero() {
		return mr.FinishedAt
	}
	return time.Now().UTC()
}

func exitResult(dir string) *driver.ExitResult {
	res := &driver.ExitResult{FinishedAt: monitorFinishedAt(dir)}
	var last *guest.Status
	var err error
	if f, ferr := os.Open(filepath.Join(dir, statusLog)); ferr == nil {
		last, _, err = guest.ReadLastStatus(f)
		f.Close()
	} else {
		err = fmt.Errorf("%w: no status channel output (%v)", guest.ErrNoResult, ferr)
	}
	_, killedErr := os.Stat(filepath.Join(dir, killedFile))
	switch {
	case err == nil:
		res.ExitCode, res.Signal = last.ExitCode, last.Signal
		if last.Event == guest.EventError {
			res.Err = last.Message
		}
	case killedErr == nil:
		// berth forced the VM off after the grace period: the workload was
		// killed as a container's would be by SIGKILL.
		res.ExitCode, res.Signal = 128+int(unix.SIGKILL), int(unix.SIGKILL)
	default:
		res.ExitCode = -1
		res.Err = fmt.Sprintf("the VM ended without reporting the workload's result (%v); end of its console:\n%s",
			err, tail(filepath.Join(dir, consoleLog), consoleTail))
	}
	return res
}

// tail returns up to n bytes from the end of a file.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err.Error()
	}
	off := max(fi.Size()-n, 0)
	buf := make([]byte, fi.Size()-off)
	nr, _ := f.ReadAt(buf, off)
	return string(buf[:nr])
}

func (d *Driver) get(id string) (*task, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t, ok := d.tasks[id]
	if !ok {
		return nil, fmt.Errorf("vm task %s: %w", id, errdefs.ErrNotFound)
	}
	return t, nil
}

func (t *task) exited() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

// Wait implements driver.Driver.
func (d *Driver) Wait(ctx context.Context, id string) (*driver.ExitResult, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	select {
	case <-t.done:
		return t.exit, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Stop implements driver.Driver: the ACPI power button, which berth-init
// turns into SIGTERM for the workload, pressed again every few seconds;
// after timeout the domain is destroyed and the workload reported killed
// (137).
func (d *Driver) Stop(ctx context.Context, id string, timeout time.Duration) error {
	t, err := d.get(id)
	if err != nil {
		return err
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		if t.exited() {
			return nil
		}
		if err := d.pressPowerButton(ctx, id); err != nil && !t.exited() {
			d.log.Warn("press the VM's power button", "task_id", id, "err", err)
		}
		select {
		case <-t.done:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			d.log.Info("stop timeout reached; destroying the VM", "task_id", id, "timeout", timeout)
			return d.kill(ctx, t)
		case <-time.After(powerButtonInterval):
		}
	}
}

func (d *Driver) pressPowerButton(ctx context.Context, id string) error {
	return d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil || dom == nil {
			return err
		}
		defer dom.Free()
		if err := dom.ShutdownFlags(libvirt.DOMAIN_SHUTDOWN_ACPI_POWER_BTN); err != nil && !isNotRunning(err) {
			return lvError(err)
		}
		return nil
	})
}

// kill forces the VM off and waits until its end is recorded. The marker
// is written first, so the result is 137 whoever reads it, even an agent
// restarted after dying right here.
func (d *Driver) kill(ctx context.Context, t *task) error {
	if err := os.WriteFile(filepath.Join(t.dir, killedFile), nil, 0o600); err != nil {
		return fmt.Errorf("record forced stop: %w", err)
	}
	if err := d.destroyDomain(ctx, t.id); err != nil {
		return err
	}
	select {
	case <-t.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Destroy implements driver.Driver.
func (d *Driver) Destroy(ctx context.Context, id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	t, _ := d.get(id)
	if t != nil && !t.exited() {
		kctx, cancel := context.WithTimeout(ctx, destroyWait)
		err := d.kill(kctx, t)
		cancel()
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			d.log.Warn("VM end not recorded before removal", "task_id", id, "err", err)
		}
	}
	if err := d.cleanup(ctx, id, true); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.tasks, id)
	d.mu.Unlock()
	return nil
}

// cleanup removes every resource of a task: its domain (if any), its
// monitor (if still there), its task directory with the disks, sockets,
// console and status logs. The stdout and stderr logs are in the agent's
// log dir and the agent's to remove. It is idempotent. withDomain false
// skips libvirt, for a start that failed before it created the domain.
func (d *Driver) cleanup(ctx context.Context, id string, withDomain bool) error {
	if withDomain {
		if err := d.destroyDomain(ctx, id); err != nil {
			return fmt.Errorf("vm task %s: %w", id, err)
		}
	}
	dir := d.taskDir(id)
	var mon proc.Ident
	if fileutil.ReadJSON(filepath.Join(dir, monitorPidFile), &mon) == nil && mon.Alive() {
		// QEMU is gone, so the monitor is draining and about to leave.
		if exited, err := proc.Watch(mon); err == nil {
			select {
			case <-exited:
			case <-time.After(drainTimeout + time.Second):
				_ = unix.Kill(mon.Pid, unix.SIGKILL)
			}
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove task dir: %w", err)
	}
	return nil
}

// Inspect implements driver.Driver.
func (d *Driver) Inspect(ctx context.Context, id string) (*driver.TaskStatus, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	st := &driver.TaskStatus{ID: id, State: driver.TaskRunning, Pid: t.state.QEMU.Pid, StartedAt: t.state.StartedAt}
	if t.exited() {
		st.State, st.Exit = driver.TaskExited, t.exit
	}
	return st, nil
}

// Stats implements driver.Driver: the VM's CPU time, QEMU's resident
// memory (what the VM costs the host: guest pages touched plus QEMU's own,
// so it can exceed the limit) and the VM's RAM size as the limit. Without a
// balloon device the host cannot see the guest's own accounting.
func (d *Driver) Stats(ctx context.Context, id string) (*driver.Stats, error) {
	t, err := d.get(id)
	if err != nil {
		return nil, err
	}
	if t.exited() {
		return nil, fmt.Errorf("vm task %s has exited: %w", id, errdefs.ErrFailedPrecondition)
	}
	var st driver.Stats
	err = d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil {
			return err
		}
		if dom == nil {
			return fmt.Errorf("vm task %s has no domain (it is exiting): %w", id, errdefs.ErrFailedPrecondition)
		}
		defer dom.Free()
		info, err := dom.GetInfo()
		if err != nil {
			return err
		}
		st.CPUUsageNanos = info.CpuTime
		st.MemoryLimit = info.MaxMem * 1024
		mem, err := dom.MemoryStats(uint32(libvirt.DOMAIN_MEMORY_STAT_NR), 0)
		if err != nil {
			return err
		}
		for _, m := range mem {
			if m.Tag == int32(libvirt.DOMAIN_MEMORY_STAT_RSS) {
				st.MemoryBytes = m.Val * 1024
			}
		}
		return nil
	})
	if err != nil {
		if isNotRunning(err) {
			return nil, fmt.Errorf("vm task %s is exiting: %w", id, errdefs.ErrFailedPrecondition)
		}
		return nil, fmt.Errorf("stats of vm task %s: %w", id, lvError(err))
	}
	return &st, nil
}

// Recover implements driver.Driver. The task directory is the source of
// truth; the handle's state is only a cross-check.
func (d *Driver) Recover(ctx context.Context, h *driver.Handle) error {
	if h.Driver != "" && h.Driver != Name {
		return fmt.Errorf("handle of driver %q given to %s: %w", h.Driver, Name, errdefs.ErrInvalidArgument)
	}
	if h.Version > handleVersion {
		return fmt.Errorf("handle version %d is newer than this agent's %d: %w", h.Version, handleVersion, errdefs.ErrFailedPrecondition)
	}
	if err := checkID(h.ID); err != nil {
		return err
	}
	d.mu.Lock()
	_, known := d.tasks[h.ID]
	d.mu.Unlock()
	if known {
		return nil
	}
	dir := d.taskDir(h.ID)
	if _, err := os.Stat(dir); err != nil {
		return fmt.Errorf("vm task %s: %w", h.ID, errdefs.ErrNotFound)
	}
	t := &task{id: h.ID, dir: dir, done: make(chan struct{})}
	if err := fileutil.ReadJSON(filepath.Join(dir, taskStateFile), &t.state); err != nil {
		// Died before the domain was defined: the task never ran.
		t.exit = &driver.ExitResult{ExitCode: -1, Err: "the agent stopped before the VM started", FinishedAt: time.Now().UTC()}
		close(t.done)
		d.register(t)
		return nil
	}
	if t.state.QEMU.Pid == 0 {
		// Died between CreateXML and recording QEMU's pid.
		alive, err := d.domainAlive(ctx, h.ID)
		if err != nil {
			return fmt.Errorf("recover vm task %s: %w", h.ID, err)
		}
		if alive {
			if pid, err := findQEMU(t.state.Domain); err == nil {
				t.state.QEMU, _ = proc.Identify(pid)
				_ = fileutil.WriteJSON(filepath.Join(dir, taskStateFile), t.state)
			}
		}
	}
	var mon proc.Ident
	var exited <-chan struct{}
	if fileutil.ReadJSON(filepath.Join(dir, monitorPidFile), &mon) == nil {
		if ch, err := proc.Watch(mon); err == nil {
			exited = ch
			t.monitor = mon
		}
	}
	if exited == nil {
		// No monitor: the VM ended meanwhile (its result is on disk), or
		// the monitor was never started or died; supervise decides.
		closed := make(chan struct{})
		close(closed)
		exited = closed
	}
	d.register(t)
	go d.supervise(t, exited)
	return nil
}

func (d *Driver) register(t *task) {
	d.mu.Lock()
	d.tasks[t.id] = t
	d.mu.Unlock()
}

// List implements driver.Driver: every task with a directory, and every
// running domain of this driver (one whose directory is gone would
// otherwise leak unseen).
func (d *Driver) List(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(d.tasksDir)
	if err != nil {
		return nil, fmt.Errorf("list vm tasks: %w", err)
	}
	seen := map[string]bool{}
	var ids []string
	for _, e := range entries {
		if e.IsDir() && validID.MatchString(e.Name()) {
			seen[e.Name()] = true
			ids = append(ids, e.Name())
		}
	}
	doms, err := d.ownedDomains(ctx)
	if err != nil {
		return nil, fmt.Errorf("list vm tasks: %w", lvError(err))
	}
	for _, id := range doms {
		if !seen[id] {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
