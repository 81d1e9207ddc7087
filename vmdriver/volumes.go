package vmdriver

import (
	"fmt"
	"os"

	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/guest"
)

// VolumeTransport is how a task's volumes reach its guest.
type VolumeTransport string

const (
	// VolumeAuto uses virtio-fs where virtiofsd is installed, else 9p.
	VolumeAuto VolumeTransport = "auto"
	// VolumeVirtiofs shares through virtio-fs: a virtiofsd per volume
	// (libvirt starts it as root and ends it with the domain) and the
	// guest's memory shared with it (memfd).
	VolumeVirtiofs VolumeTransport = guest.FSVirtiofs
	// Volume9p shares through QEMU's own 9p server (virtio-9p).
	Volume9p VolumeTransport = guest.FS9p
)

// virtiofsdPaths are where Debian (qemu-system-common) and others install
// virtiofsd.
var virtiofsdPaths = []string{"/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd"}

// maxVMVolumes is how many volumes a VM takes: each is a PCI device, in
// the slots below slotLastUsable that NICs do not use.
const maxVMVolumes = 16

// volumeTransport decides the transport and says why.
func (d *Driver) volumeTransport() (VolumeTransport, string, string) {
	virtiofsd := d.opts.VirtiofsdPath
	if virtiofsd == "" {
		for _, p := range virtiofsdPaths {
			if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
				virtiofsd = p
				break
			}
		}
	}
	switch d.opts.VolumeTransport {
	case Volume9p:
		return Volume9p, "", "vm.volume_transport is 9p"
	case VolumeVirtiofs:
		if virtiofsd == "" {
			return VolumeVirtiofs, "", "vm.volume_transport is virtiofs, but no virtiofsd is installed (qemu-system-common)"
		}
		return VolumeVirtiofs, virtiofsd, "vm.volume_transport is virtiofs"
	}
	if virtiofsd == "" {
		return Volume9p, "", "no virtiofsd installed (qemu-system-common): 9p"
	}
	return VolumeVirtiofs, virtiofsd, "virtiofsd at " + virtiofsd
}

// VolumeTransport is the transport the driver gives VMs' volumes.
func (d *Driver) VolumeTransport() VolumeTransport {
	t, _, _ := d.volumeTransport()
	return t
}

// addVolumes gives a task's domain its volumes (one filesystem device
// each, shared memory for virtio-fs) and tells berth-init where to mount
// them. The sources are the agent's staged mounts, read-only when the
// volume is: virtiofsd has no read-only mode, and libvirt's <readonly/>
// does not apply to virtio-fs, so the host side is a read-only mount.
func (d *Driver) addVolumes(mounts []driver.Mount, spec *domainSpec, gc *guest.Config) error {
	if len(mounts) == 0 {
		return nil
	}
	if len(mounts) > maxVMVolumes || slotLastUsable-uint(len(mounts)) < slotFirstNIC+uint(len(spec.Interfaces)) {
		return fmt.Errorf("vm task: %d volumes; a VM takes at most %d: %w", len(mounts), maxVMVolumes, errdefs.ErrInvalidArgument)
	}
	transport, virtiofsd, why := d.volumeTransport()
	if transport == VolumeVirtiofs && virtiofsd == "" {
		return fmt.Errorf("vm task: %s: %w", why, errdefs.ErrUnavailable)
	}
	for i, m := range mounts {
		tag := guest.VolumeTag(i)
		fs := libvirtxml.DomainFilesystem{
			AccessMode: "passthrough",
			Source:     &libvirtxml.DomainFilesystemSource{Mount: &libvirtxml.DomainFilesystemSourceMount{Dir: m.Source}},
			Target:     &libvirtxml.DomainFilesystemTarget{Dir: tag},
			Address:    pciSlot(slotLastUsable - uint(i)),
		}
		if transport == VolumeVirtiofs {
			fs.Driver = &libvirtxml.DomainFilesystemDriver{Type: "virtiofs", Queue: 1024}
			fs.Binary = &libvirtxml.DomainFilesystemBinary{Path: virtiofsd}
		} else {
			// squash: QEMU creates files as itself (the staged mount shows
			// them as root's on disk) and ignores the guest's chown.
			fs.AccessMode = "squash"
			fs.Driver = &libvirtxml.DomainFilesystemDriver{Type: "path"}
			if m.ReadOnly {
				fs.ReadOnly = &libvirtxml.DomainFilesystemReadOnly{}
			}
		}
		spec.Filesystems = append(spec.Filesystems, fs)
		gc.Volumes = append(gc.Volumes, guest.Volume{Tag: tag, Path: m.Target, FSType: string(transport), ReadOnly: m.ReadOnly})
	}
	spec.SharedMemory = transport == VolumeVirtiofs
	return nil
}

// memoryBacking is the domain's memory backing: shared memfd when
// virtiofsd must map the guest's memory, none otherwise.
func memoryBacking(shared bool) *libvirtxml.DomainMemoryBacking {
	if !shared {
		return nil
	}
	return &libvirtxml.DomainMemoryBacking{
		MemorySource: &libvirtxml.DomainMemorySource{Type: "memfd"},
		MemoryAccess: &libvirtxml.DomainMemoryAccess{Mode: "shared"},
	}
}

// volumeDetails reports the transport in the driver's fingerprint.
func (d *Driver) volumeDetails(details map[string]string) {
	transport, virtiofsd, why := d.volumeTransport()
	details["volumes"] = string(transport)
	details["volumes_reason"] = why
	if transport == VolumeVirtiofs && virtiofsd == "" {
		details["volumes"] = "unavailable"
	}
}
