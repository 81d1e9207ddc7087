package vmdriver

import (
	"fmt"
	"os"

	"github.com/berthd/berth/errdefs"
)

// Firmware is what runs before a guest's kernel when the driver boots the
// kernel directly (every OCI task; a whole-disk image always boots through
// SeaBIOS, which finds its bootloader).
type Firmware string

const (
	// FirmwareAuto uses qboot where it is installed, else SeaBIOS, and
	// says why in the fingerprint.
	FirmwareAuto Firmware = "auto"
	// FirmwareQboot is qboot, QEMU's minimal x86 firmware: it sets up
	// memory, PCI and the ACPI tables QEMU builds, then jumps to the kernel
	// QEMU loaded (its PVH entry point or its bzImage setup), without
	// SeaBIOS's POST: no option ROMs, no scan for bootable disks (SeaBIOS
	// drives every virtio disk of the domain looking for one), no boot
	// menu: about 0.3 s of a hand-started QEMU of berth's devices under
	// TCG (2.66 s to a busybox init's first line with SeaBIOS, 2.38 s with
	// qboot), less through libvirt.
	FirmwareQboot Firmware = "qboot"
	// FirmwareSeaBIOS is QEMU's default BIOS.
	FirmwareSeaBIOS Firmware = "seabios"
)

// DefaultQbootPath is where Debian's qemu-system-data installs qboot.
const DefaultQbootPath = "/usr/share/qemu/qboot.rom"

func checkFirmware(f Firmware) (Firmware, error) {
	switch f {
	case "":
		return FirmwareAuto, nil
	case FirmwareAuto, FirmwareQboot, FirmwareSeaBIOS:
		return f, nil
	}
	return "", fmt.Errorf("firmware %q: want auto, qboot or seabios: %w", f, errdefs.ErrInvalidArgument)
}

// firmwareChoice is the firmware guests boot with, as decided now.
type firmwareChoice struct {
	firmware Firmware // qboot or seabios
	rom      string   // the ROM QEMU runs; empty: QEMU's default (SeaBIOS)
	reason   string
	err      error // why no guest can boot as configured (vm.firmware qboot, not installed)
}

// firmware decides the firmware of a direct kernel boot. It looks for
// qboot each time (a stat): installing or removing the package changes
// what the next guest boots with, and the fingerprint says so.
func (d *Driver) firmware() firmwareChoice {
	if d.opts.Firmware == FirmwareSeaBIOS {
		return firmwareChoice{firmware: FirmwareSeaBIOS, reason: "vm.firmware is seabios"}
	}
	rom := d.opts.QbootPath
	st, err := os.Stat(rom)
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", rom)
	}
	switch {
	case err == nil && d.opts.Firmware == FirmwareQboot:
		return firmwareChoice{firmware: FirmwareQboot, rom: rom, reason: "vm.firmware is qboot (" + rom + ")"}
	case err == nil:
		return firmwareChoice{firmware: FirmwareQboot, rom: rom, reason: "qboot at " + rom + ": the kernel is booted without SeaBIOS's POST"}
	case d.opts.Firmware == FirmwareQboot:
		return firmwareChoice{firmware: FirmwareQboot, err: fmt.Errorf("vm.firmware is qboot, but it is not installed (%v; package qemu-system-data): %w", err, errdefs.ErrUnavailable)}
	}
	return firmwareChoice{firmware: FirmwareSeaBIOS, reason: fmt.Sprintf("no qboot (%v; package qemu-system-data): SeaBIOS", err)}
}

// firmwareDetails reports the firmware in the driver's fingerprint and
// returns why no guest can boot, or nil.
func (d *Driver) firmwareDetails(details map[string]string) error {
	c := d.firmware()
	details["firmware"] = string(c.firmware)
	details["firmware_config"] = string(d.opts.Firmware)
	if c.err != nil {
		details["firmware"] = "unavailable"
		details["firmware_reason"] = c.err.Error()
		return c.err
	}
	details["firmware_reason"] = c.reason
	return nil
}
