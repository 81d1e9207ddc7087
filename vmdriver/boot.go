package vmdriver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
	"github.com/berthd/berth/internal/qcow2"
	"github.com/berthd/berth/vmdriver/initramfs"
	"github.com/berthd/berth/vmdriver/rootdisk"
)

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
