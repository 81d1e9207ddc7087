package vmdriver

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/vmdriver/initramfs"
	"libvirt.org/go/libvirt"
)

// Fingerprint implements driver.Driver.
func (d *Driver) Fingerprint(ctx context.Context) driver.Fingerprint {
	fp := driver.Fingerprint{
		Capabilities: driver.Capabilities{WholeDisk: true},
		Details:      map[string]string{"uri": d.opts.URI, "accel_config": string(d.opts.Accel)},
	}
	unhealthy := func(format string, args ...any) driver.Fingerprint {
		fp.Healthy = false
		fp.Reason = fmt.Sprintf(format, args...)
		return fp
	}
	versions, err := call(ctx, d.hv, func(c *libvirt.Connect) ([2]string, error) {
		lib, err := c.GetLibVersion()
		if err != nil {
			return [2]string{}, err
		}
		v := [2]string{versionString(lib)}
		if hv, err := c.GetVersion(); err == nil {
			v[1] = versionString(hv)
		}
		return v, nil
	})
	if err != nil {
		return unhealthy("libvirt is unreachable: %v", lvError(err))
	}
	fp.Version = versions[0]
	fp.Details["libvirt_version"] = versions[0]
	if versions[1] != "" {
		fp.Details["qemu_version"] = versions[1]
	}
	// Never waits for the KVM probe: while it runs, accel is "probing"
	// and the driver healthy (Start waits for the verdict).
	choice, err := d.resolveAccel(ctx, false)
	if err != nil {
		return unhealthy("%v", err)
	}
	fp.Capabilities.Accel = driver.Accel(choice.Accel)
	d.volumeDetails(fp.Details)
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
	if dir := untraversable(filepath.Dir(d.opts.Root)); dir != "" {
		return unhealthy("%s is not traversable by others (mode o-x): QEMU runs unprivileged and cannot reach the task disks under %s; chmod o+x %s", dir, d.opts.Root, dir)
	}
	if err := d.bootDetails(fp.Details, k); err != nil {
		return unhealthy("%v", err)
	}
	if err := d.firmwareDetails(fp.Details); err != nil {
		return unhealthy("%v", err)
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
