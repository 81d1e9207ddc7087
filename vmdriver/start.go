package vmdriver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/proc"
	"github.com/berthd/berth/supervisor/monitor"
	"github.com/berthd/berth/vmdriver/rootdisk"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

func validateTask(cfg *driver.TaskConfig) error {
	if err := driver.CheckID(cfg.ID); err != nil {
		return err
	}
	var problems []string
	switch disk := cfg.Image.DiskPath; {
	case disk != "":
		// The disk's own OS decides what runs: Args and the rest are unused.
		if err := checkWholeDisk(disk); err != nil {
			problems = append(problems, "image: "+err.Error())
		}
	case len(cfg.Args) == 0:
		problems = append(problems, "args: a command is required")
	}
	if cfg.Image.DiskPath != "" && (cfg.Stdin || cfg.TTY) {
		problems = append(problems, "stdin, tty: a whole-disk image runs its own OS, with no berth-init to hold a terminal or stdin")
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
	if err := d.qemuDir(dir, os.Mkdir); err != nil {
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
		LogMaxBytes: cfg.Logs.MaxBytes, LogMaxFiles: cfg.Logs.MaxFiles,
		MemoryBytes: cfg.Resources.MemoryBytes, WholeDisk: cfg.Image.DiskPath, BootID: d.sup.BootID(),
		Attach: cfg.Image.DiskPath == "", Stdin: cfg.Stdin, TTY: cfg.TTY,
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
	if err := cfg.RunCommit(); err != nil {
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
	create := func() (string, error) {
		return call(ctx, d.hv, func(c *libvirt.Connect) (string, error) {
			dom, err := c.DomainCreateXML(xmlDoc, createFlags)
			if err != nil {
				return "", err
			}
			defer dom.Free()
			uuid, _ := dom.GetUUIDString()
			return uuid, nil
		})
	}
	st.UUID, err = create()
	if isAlreadyExists(err) {
		// The task directory was new, so a domain of this task is what an
		// interrupted earlier start left: its creation went on in
		// libvirtd after the agent that asked for it was killed, and
		// recovery, finding no domain yet, removed its directory (its
		// sockets and disks with it). Nothing can reach that guest; it is
		// destroyed (only when its metadata says it is ours) and this
		// start creates the domain afresh.
		d.log.Warn("destroying a domain an interrupted start of this task left", "task_id", cfg.ID, "domain", st.Domain)
		if derr := d.destroyDomain(ctx, cfg.ID); derr != nil {
			return nil, fmt.Errorf("vm task %s: domain %s exists (left by an interrupted start?) and cannot be removed: %w", cfg.ID, st.Domain, derr)
		}
		st.UUID, err = create()
	}
	if err != nil {
		if isAlreadyExists(err) {
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
	t := d.sup.NewTask(cfg.ID, dir, st)
	t.SetRunning(st.QEMU.Pid, st.StartedAt)
	exited, err := d.spawnMonitor(ctx, t)
	if err != nil {
		return nil, err
	}
	if res, ok := readMonitorResult(dir); ok && res.Error != "" {
		<-exited.Done()
		return nil, fmt.Errorf("vm task %s: monitor: %s (see %s)", cfg.ID, res.Error, filepath.Join(dir, monitor.LogFile))
	}
	if spec.WholeDisk {
		if err := d.resume(ctx, cfg.ID); err != nil {
			return nil, err
		}
	}
	if err := d.sup.Register(t); err != nil {
		return nil, err
	}
	go d.supervise(t, exited)
	return &driver.Handle{ID: cfg.ID, Driver: Name, Version: handleVersion}, nil
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

// isAlreadyExists reports libvirt's refusal to create a domain whose name
// is taken.
func isAlreadyExists(err error) bool {
	var le libvirt.Error
	return errors.As(err, &le) && le.Code == libvirt.ERR_OPERATION_FAILED && strings.Contains(le.Message, "already exists")
}
