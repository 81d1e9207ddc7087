package vmdriver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/qcow2"
	"github.com/berthd/berth/vmdriver/initramfs"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

// BootMode is how guests boot the node's kernel.
type BootMode string

const (
	// BootAuto boots the kernel through its PVH entry point where it can
	// (BootPVH), else its bzImage (BootBzImage), and says why in the
	// fingerprint.
	BootAuto BootMode = "auto"
	// BootPVH boots the vmlinux extracted once from the node's bzImage
	// straight into the kernel's 32-bit PVH entry point (the firmware only
	// hands over: qboot itself, SeaBIOS through QEMU's pvh.bin): no loading
	// of the bzImage by the firmware, no real-mode setup and no
	// decompression in the guest, which under TCG are most of a boot
	// (issue 17). A kernel without the PVH note makes the driver unhealthy.
	BootPVH BootMode = "pvh"
	// BootBzImage boots the node's bzImage as shipped, through the
	// firmware and the kernel's own decompressor.
	BootBzImage BootMode = "bzimage"
)

func checkBootMode(m BootMode) (BootMode, error) {
	switch m {
	case "":
		return BootAuto, nil
	case BootAuto, BootPVH, BootBzImage:
		return m, nil
	}
	return "", fmt.Errorf("boot %q: want auto, pvh or bzimage: %w", m, errdefs.ErrInvalidArgument)
}

// bootAssets are the kernel and initramfs every guest boots, prepared for
// one node kernel.
type bootAssets struct {
	// kernel is what guests boot: its Path is the extracted vmlinux in PVH
	// mode and the node's bzImage otherwise; its release and modules are
	// the node kernel's.
	kernel initramfs.Kernel
	// node is the node's kernel, and nodeID the identity of its file when
	// these assets were prepared: a replaced file is prepared again.
	node   initramfs.Kernel
	nodeID fileID
	initrd string
	mode   BootMode // pvh or bzimage
	reason string   // why mode
	// err is why no guest can boot this kernel as configured (vm.boot pvh
	// and a kernel without the PVH entry point); kept, so that a Start
	// and the fingerprint say it without extracting again.
	err error
}

// fileID tells one file from another at the same path.
type fileID struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

func statID(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, err
	}
	id := fileID{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.dev, id.ino = uint64(st.Dev), st.Ino
	}
	return id, nil
}

// current tells whether b was prepared for the node kernel k as it is now.
func (b *bootAssets) current(k initramfs.Kernel, id fileID) bool {
	return b != nil && b.node == k && b.nodeID == id
}

// bootAssets finds the node's kernel, builds (or finds cached) the
// initramfs and decides how guests boot the kernel: through its PVH entry
// point, from the vmlinux extracted (or found cached) for it, or as its
// bzImage. The result is kept until the node's kernel changes.
func (d *Driver) bootAssets(ctx context.Context) (*bootAssets, error) {
	k, err := initramfs.FindKernel(d.opts.BootDir, d.opts.ModulesDir)
	if err != nil {
		return nil, fmt.Errorf("guest kernel: %w: %w", err, errdefs.ErrUnavailable)
	}
	id, err := statID(k.Path)
	if err != nil {
		return nil, fmt.Errorf("guest kernel: %w: %w", err, errdefs.ErrUnavailable)
	}
	d.bootMu.Lock()
	defer d.bootMu.Unlock()
	if b := d.boot; b.current(k, id) {
		if b.err != nil {
			return nil, b.err
		}
		return b, nil
	}
	initrd, err := initramfs.Build(ctx, initramfs.Options{Kernel: k, InitPath: d.opts.InitPath, CacheDir: d.cacheDir})
	if err != nil {
		return nil, err
	}
	b := &bootAssets{kernel: k, node: k, nodeID: id, initrd: initrd, mode: BootBzImage}
	keep := true
	if d.opts.Boot == BootBzImage {
		b.reason = "vm.boot is bzimage: the kernel boots as shipped, through the firmware"
	} else {
		v, err := initramfs.ExtractVmlinux(ctx, k.Path, d.cacheDir)
		switch {
		case err == nil:
			b.kernel.Path, b.mode = v.Path, BootPVH
			b.reason = fmt.Sprintf("the %s-compressed kernel is booted uncompressed through its PVH entry point (extracted once to %s)", v.Compression, v.Path)
		case ctx.Err() != nil:
			return nil, err
		case d.opts.Boot == BootPVH:
			b.err = fmt.Errorf("vm.boot is pvh, but the guest kernel %s cannot boot through PVH: %w: %w", k.Path, err, errdefs.ErrUnavailable)
			keep = errors.Is(err, initramfs.ErrNoPVH)
		default:
			b.reason = fmt.Sprintf("the kernel boots as its bzImage: %v", err)
			// A verdict on the kernel is kept; a failure to extract
			// (a full disk) is tried again at the next boot.
			keep = errors.Is(err, initramfs.ErrNoPVH)
			d.log.Warn("guest kernel: booting the bzImage instead of its PVH entry point", "kernel", k.Path, "err", err)
		}
	}
	if keep {
		d.boot = b
	}
	if b.err != nil {
		return nil, b.err
	}
	return b, nil
}

// bootDetails reports how guests boot the node kernel k into a
// fingerprint's details, without waiting: while the boot assets are not
// prepared for k it says so and prepares them in the background (extracting
// a kernel takes seconds), so that node status shows the boot mode soon
// and the first VM does not wait for it. It returns why no guest can boot,
// or nil.
func (d *Driver) bootDetails(details map[string]string, k initramfs.Kernel) error {
	id, _ := statID(k.Path)
	var b *bootAssets
	if d.bootMu.TryLock() { // held only while assets are prepared
		b = d.boot
		d.bootMu.Unlock()
	}
	details["boot_config"] = string(d.opts.Boot)
	if !b.current(k, id) {
		details["boot"] = "pending"
		details["boot_reason"] = "the guest kernel is being prepared (extracted from the bzImage once and checked for its PVH entry point)"
		d.warmBoot()
		return nil
	}
	if b.err != nil {
		details["boot"] = string(BootPVH)
		details["boot_reason"] = b.err.Error()
		return b.err
	}
	details["boot"] = string(b.mode)
	details["boot_reason"] = b.reason
	return nil
}

// warmBoot prepares the boot assets in the background, once at a time,
// until Close (which waits for it as for the KVM probe).
func (d *Driver) warmBoot() {
	if d.ctx.Err() != nil || !d.bootWarming.CompareAndSwap(false, true) {
		return
	}
	d.probeWG.Add(1)
	go func() {
		defer d.probeWG.Done()
		defer d.bootWarming.Store(false)
		if _, err := d.bootAssets(d.ctx); err != nil && d.ctx.Err() == nil {
			d.log.Warn("prepare the guest kernel", "err", err)
		}
	}()
}

// checkWholeDisk checks that a whole-disk image is an absolute path to a
// qcow2 image, before anything is built for it.
func checkWholeDisk(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("disk path %q is not absolute", path)
	}
	ok, err := qcow2.IsFile(path)
	if err != nil {
		return fmt.Errorf("disk image: %v", err)
	}
	if !ok {
		return fmt.Errorf("disk image %s is not a qcow2 image", path)
	}
	return nil
}

// prepareBoot readies an OCI task's direct kernel boot: the kernel and
// initramfs, the root disk overlay over the image's ext4 base, the config
// disk for berth-init and the virtio-serial ports.
func (d *Driver) prepareBoot(ctx context.Context, cfg *driver.TaskConfig, dir string, spec *domainSpec) error {
	boot, err := d.bootAssets(ctx)
	if err != nil {
		return err
	}
	fw := d.firmware()
	if fw.err != nil {
		return fw.err
	}
	// The disk budget is the root disk's free space: past it the guest's
	// writes fail with ENOSPC, and the overlay never outgrows the base.
	headroom := d.opts.BaseHeadroom
	if cfg.Resources.DiskBytes > 0 {
		headroom = cfg.Resources.DiskBytes
	}
	base, err := rootdisk.Base(ctx, cfg.Image.RootfsDir, baseKey(cfg.Image), d.cacheDir, rootdisk.WithHeadroom(headroom))
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
	gcfg.ExecChannel = true
	if err := d.addVolumes(cfg.Mounts, spec, &gcfg); err != nil {
		return err
	}
	cfgData, err := guest.EncodeConfig(gcfg)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, configDisk), cfgData, 0o600); err != nil {
		return fmt.Errorf("write config disk: %w", err)
	}
	spec.Kernel, spec.Initrd, spec.Cmdline = boot.kernel.Path, boot.initrd, kernelCmdline
	spec.Firmware = fw.rom
	spec.ConfigDisk = filepath.Join(dir, configDisk)
	spec.Console = filepath.Join(dir, consoleLog)
	spec.Ports = map[string]string{}
	for port, sock := range portSockets {
		spec.Ports[port] = filepath.Join(dir, sock)
	}
	spec.Ports[guest.ExecPort] = filepath.Join(dir, execSocket)
	return nil
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
	gc := guest.Config{Args: cfg.Args, Env: cfg.Env, Workdir: cfg.Workdir, User: user, Hostname: host, Stdin: cfg.Stdin, TTY: cfg.TTY}
	if n := cfg.Network; n != nil && n.Mode == driver.NetworkBridge {
		gc.Network = &guest.Network{Interface: "eth0", Address: n.Address, Gateway: n.Gateway, DNS: n.DNS}
	}
	return gc, nil
}
