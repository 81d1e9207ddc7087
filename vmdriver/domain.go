package vmdriver

import (
	"encoding/xml"
	"fmt"
	"math"

	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/guest"
)

// GuestMemoryOverhead is added to a task's memory request to size its VM:
// the guest kernel, its page tables and the unpacked initramfs live in the
// VM's RAM but are not the workload's. A workload asking for 256 MiB gets a
// VM of 256 MiB plus this, so it can really use what it asked for.
const GuestMemoryOverhead int64 = 96 << 20

// DefaultMemoryBytes is the workload memory a task gets when it asks for
// none (the VM needs some RAM; an unlimited one makes no sense).
const DefaultMemoryBytes int64 = 256 << 20

// metadataNS is the XML namespace of berth's <metadata> element. A domain
// is berth's only when its name has the driver's prefix AND it carries
// this element with the driver's root: other domains on the same libvirtd
// are never touched.
const (
	metadataNS  = "https://github.com/berthd/berth/xmlns/vmdriver/1"
	metadataKey = "berth"
)

// domainMeta is the content of berth's <metadata> element.
type domainMeta struct {
	XMLName xml.Name `xml:"task"`
	ID      string   `xml:"id"`
	Root    string   `xml:"root"`
	// Probe marks the KVM probe guest, which is no task (its ID is empty).
	Probe bool `xml:"probe,omitempty"`
}

// Accel is how guests are run.
type Accel string

const (
	// AccelAuto probes for KVM and falls back to TCG.
	AccelAuto Accel = "auto"
	// AccelKVM is hardware virtualization (libvirt domain type kvm).
	AccelKVM Accel = "kvm"
	// AccelTCG is QEMU's software emulation (libvirt domain type qemu).
	AccelTCG Accel = "tcg"
)

// domainSpec is everything that shapes one task's domain. It is plain data
// so the XML it becomes can be tested without libvirt.
type domainSpec struct {
	Name  string
	Meta  domainMeta
	Accel Accel // kvm or tcg, never auto
	// CPUModel replaces KVM's host-model CPU with a named model (tests).
	CPUModel string
	VCPUs    uint
	MemoryKi uint

	Kernel, Initrd, Cmdline string
	// Firmware is the ROM QEMU runs before a directly booted kernel
	// (qboot); empty: QEMU's default, SeaBIOS.
	Firmware string

	RootDisk, RootFormat string // the task's overlay (qcow2); none when empty
	ConfigDisk           string // raw, read-only; none when empty

	// Sockets of the virtio-serial ports, by port name; QEMU listens on
	// them (libvirt creates them and passes the fd). The task's monitor
	// connects to the output and status ports, the driver to the exec
	// port when a session needs it.
	Ports   map[string]string
	Console string // file the serial console is appended to

	// WholeDisk boots RootDisk by its own bootloader (BIOS, boot from hd)
	// instead of Kernel and Initrd, and the serial console goes to
	// ConsoleSocket (QEMU listens; the task's monitor connects) instead of
	// the Console file.
	WholeDisk     bool
	ConsoleSocket string

	// Interfaces are the task's network devices: a virtio-net NIC whose
	// tap libvirt attaches to the node bridge (see bridgeInterface), or
	// none for a guest with loopback only.
	Interfaces []libvirtxml.DomainInterface

	// Filesystems are the task's volumes, and SharedMemory backs the
	// guest's memory with a shared memfd, as virtio-fs needs (volumes.go).
	Filesystems  []libvirtxml.DomainFilesystem
	SharedMemory bool
}

// kernelCmdline is the guest kernel's command line, as package guest
// requires: console on the first serial port, reboot (which ends the
// domain) on panic. quiet keeps the emulated UART, slow under TCG, from
// printing every boot message. cryptomgr.notests skips the self-tests of
// every crypto algorithm the kernel and its modules register, a quarter
// of a second of a TCG boot (issue 17): the algorithms work the same, and
// a guest that needs FIPS-style self-tests is no berth guest.
const kernelCmdline = "console=ttyS0 panic=-1 quiet cryptomgr.notests"

// tcgTBCacheMiB bounds TCG's translation cache, QEMU's own memory for the
// host code it translates the guest's into. QEMU reserves 1 GiB for it
// and keeps what it has filled resident: a berth guest fills some 56 MiB
// booting and idling, a third of an idle VM's RSS (issue 17). 32 MiB,
// QEMU's default until 5.0, holds the working set of the boot; past it
// QEMU flushes the cache and translates again. The guest's own memory is
// untouched by this.
const tcgTBCacheMiB = 32

// vcpus turns a CPU request in cores into whole vCPUs, at least one.
func vcpus(cores float64) uint {
	if cores <= 1 || math.IsNaN(cores) {
		return 1
	}
	return uint(math.Ceil(cores))
}

// memoryKiB is the VM's RAM for a workload request, in KiB.
func memoryKiB(req int64) uint {
	if req <= 0 {
		req = DefaultMemoryBytes
	}
	return uint((req + GuestMemoryOverhead + 1023) / 1024)
}

// PCI slots on the root bus. Every device sits there as an integrated
// endpoint: left to itself, libvirt puts each behind a PCIe root port of
// its own and adds a spare one for hotplug, and each port costs the guest
// enumeration, hotplug and AER set-up, slow under TCG (issue 17). berth
// hot-plugs nothing.
const (
	slotSerial     = 0x01
	slotRootDisk   = 0x02
	slotConfig     = 0x03
	slotFirstNIC   = 0x04
	slotLastUsable = 0x1e // 0x1f is the ICH9 LPC, SATA and SMBus
)

func pciSlot(slot uint) *libvirtxml.DomainAddress {
	zero := uint(0)
	return &libvirtxml.DomainAddress{PCI: &libvirtxml.DomainAddressPCI{Domain: &zero, Bus: &zero, Slot: &slot, Function: &zero}}
}

// domainXML renders the domain definition: a transient, ACPI-capable q35
// machine booted directly into berth's kernel and initramfs, with two
// virtio-blk disks found by serial, four virtio-serial ports, a serial
// console into a file, a virtio-net NIC on the node bridge when the task
// has a bridge network, and nothing else: no USB, no balloon, no graphics,
// no host devices, no PCIe root ports (see pciSlot).
func domainXML(s domainSpec) (string, error) {
	meta, err := xml.Marshal(struct {
		XMLName xml.Name `xml:"task"`
		NS      string   `xml:"xmlns,attr"`
		ID      string   `xml:"id"`
		Root    string   `xml:"root"`
		Probe   bool     `xml:"probe,omitempty"`
	}{NS: metadataNS, ID: s.Meta.ID, Root: s.Meta.Root, Probe: s.Meta.Probe})
	if err != nil {
		return "", err
	}
	domType := "qemu"
	var cpu *libvirtxml.DomainCPU
	var tcg *libvirtxml.DomainFeatureTCG
	switch s.Accel {
	case AccelKVM:
		domType = "kvm"
		// host-model, never host-passthrough: passthrough aborts on hosts
		// whose MSRs the guest CPU cannot mirror (nested virtualization).
		cpu = &libvirtxml.DomainCPU{Mode: "host-model"}
		if s.CPUModel != "" {
			cpu = &libvirtxml.DomainCPU{Mode: "custom", Match: "exact", Check: "none",
				Model: &libvirtxml.DomainCPUModel{Value: s.CPUModel, Fallback: "forbid"}}
		}
	case AccelTCG:
		// A named model TCG emulates fully; x86-64 baseline is all the
		// Debian kernel needs.
		cpu = &libvirtxml.DomainCPU{Mode: "custom", Match: "exact", Check: "none",
			Model: &libvirtxml.DomainCPUModel{Value: "qemu64", Fallback: "forbid"}}
		tcg = &libvirtxml.DomainFeatureTCG{TBCache: &libvirtxml.DomainFeatureTCGTBCache{Unit: "MiB", Size: tcgTBCacheMiB}}
	default:
		return "", fmt.Errorf("domain accel %q: want kvm or tcg", s.Accel)
	}

	zero := uint(0)
	var disks []libvirtxml.DomainDisk
	if s.RootDisk != "" {
		disk := libvirtxml.DomainDisk{
			Device:  "disk",
			Driver:  &libvirtxml.DomainDiskDriver{Name: "qemu", Type: s.RootFormat, Cache: "none", IO: "native", Discard: "unmap"},
			Source:  &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: s.RootDisk}},
			Target:  &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
			Serial:  guest.RootDiskSerial,
			Address: pciSlot(slotRootDisk),
		}
		if s.WholeDisk {
			disk.Serial = ""
			disk.Boot = &libvirtxml.DomainDeviceBoot{Order: 1}
		}
		disks = append(disks, disk)
	}
	osCfg := &libvirtxml.DomainOS{
		Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
		Kernel:  s.Kernel,
		Initrd:  s.Initrd,
		Cmdline: s.Cmdline,
	}
	if s.Firmware != "" {
		if s.Kernel == "" {
			return "", fmt.Errorf("domain %s: firmware %s is for a direct kernel boot, and there is no kernel", s.Name, s.Firmware)
		}
		osCfg.Loader = &libvirtxml.DomainLoader{Path: s.Firmware, Type: "rom", Readonly: "yes"}
	}
	console := libvirtxml.DomainSerial{
		Source: &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: s.Console, Append: "on"}},
		Target: &libvirtxml.DomainSerialTarget{Port: &zero},
	}
	if s.WholeDisk {
		if s.RootDisk == "" || s.ConsoleSocket == "" || s.Kernel != "" {
			return "", fmt.Errorf("whole-disk domain %s: want a root disk and a console socket, and no kernel", s.Name)
		}
		osCfg = &libvirtxml.DomainOS{Type: osCfg.Type}
		console.Source = &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind", Path: s.ConsoleSocket}}
	}
	if s.ConfigDisk != "" {
		disks = append(disks, libvirtxml.DomainDisk{
			Device:   "disk",
			Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source:   &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: s.ConfigDisk}},
			Target:   &libvirtxml.DomainDiskTarget{Dev: "vdb", Bus: "virtio"},
			ReadOnly: &libvirtxml.DomainDiskReadOnly{},
			Serial:   guest.ConfigDiskSerial,
			Address:  pciSlot(slotConfig),
		})
	}
	var channels []libvirtxml.DomainChannel
	for _, port := range []string{guest.StdoutPort, guest.StderrPort, guest.StatusPort, guest.ExecPort} {
		path, ok := s.Ports[port]
		if !ok {
			continue
		}
		channels = append(channels, libvirtxml.DomainChannel{
			Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: "bind", Path: path}},
			Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: port}},
		})
	}
	if len(s.Interfaces) > slotLastUsable-slotFirstNIC+1 {
		return "", fmt.Errorf("domain %s: %d network interfaces, at most %d", s.Name, len(s.Interfaces), slotLastUsable-slotFirstNIC+1)
	}
	ifaces := make([]libvirtxml.DomainInterface, len(s.Interfaces))
	for i, iface := range s.Interfaces {
		iface.Address = pciSlot(slotFirstNIC + uint(i))
		ifaces[i] = iface
	}
	dom := libvirtxml.Domain{
		Type:          domType,
		Name:          s.Name,
		Metadata:      &libvirtxml.DomainMetadata{XML: string(meta)},
		Memory:        &libvirtxml.DomainMemory{Value: s.MemoryKi, Unit: "KiB"},
		MemoryBacking: memoryBacking(s.SharedMemory),
		VCPU:          &libvirtxml.DomainVCPU{Value: s.VCPUs},
		OS:            osCfg,
		// ACPI carries the power button berth-init turns into SIGTERM.
		// The VMware I/O port and SMM (which only secure-boot firmware
		// uses) are off: no berth guest uses them, and together they cost
		// the firmware and the kernel 0.1-0.2 s of a TCG boot (issue 17).
		Features: &libvirtxml.DomainFeatureList{
			ACPI: &libvirtxml.DomainFeature{}, APIC: &libvirtxml.DomainFeatureAPIC{}, TCG: tcg,
			VMPort: &libvirtxml.DomainFeatureState{State: "off"}, SMM: &libvirtxml.DomainFeatureSMM{State: "off"},
		},
		CPU:        cpu,
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy",
		OnReboot:   "destroy",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Disks: disks,
			Controllers: []libvirtxml.DomainController{
				{Type: "usb", Model: "none"},
				{Type: "virtio-serial", Index: &zero, Address: pciSlot(slotSerial)},
			},
			Channels:    channels,
			Interfaces:  ifaces,
			Filesystems: s.Filesystems,
			Serials:     []libvirtxml.DomainSerial{console},
			MemBalloon:  &libvirtxml.DomainMemBalloon{Model: "none"},
		},
	}
	return dom.Marshal()
}

// bridgeInterface is a virtio-net NIC on the node's bridge with the MAC
// the node network assigned. libvirt makes the tap (vnetN) and enslaves it
// to the bridge, and removes it when the domain ends.
func bridgeInterface(bridge, mac string) libvirtxml.DomainInterface {
	return libvirtxml.DomainInterface{
		Source: &libvirtxml.DomainInterfaceSource{Bridge: &libvirtxml.DomainInterfaceSourceBridge{Bridge: bridge}},
		MAC:    &libvirtxml.DomainInterfaceMAC{Address: mac},
		Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
	}
}
