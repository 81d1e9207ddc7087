//go:build linux

package pid1

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The guest has no udev: devices are matched through sysfs attributes and
// their nodes appear in devtmpfs under the kernel's own names.

// findDisks maps the serial number of every block device under
// sysRoot/block to its device name ("vda"). virtio-blk exposes the serial
// the host set (-device virtio-blk-pci,serial=... or libvirt's <serial>) as
// the "serial" attribute; devices without one are skipped.
func findDisks(sysRoot string) (map[string]string, error) {
	entries, err := os.ReadDir(filepath.Join(sysRoot, "block"))
	if err != nil {
		return nil, fmt.Errorf("list block devices: %w", err)
	}
	disks := make(map[string]string)
	for _, e := range entries {
		serial, err := readAttr(filepath.Join(sysRoot, "block", e.Name(), "serial"))
		if err != nil || serial == "" {
			continue
		}
		// First one wins: order is the kernel's, stable within a boot, and
		// two disks with one serial are the host's bug, reported by the
		// caller if it matters.
		if _, dup := disks[serial]; !dup {
			disks[serial] = e.Name()
		}
	}
	return disks, nil
}

// findPorts maps virtio-serial port names to their device names
// ("vport0p1"), from sysRoot/class/virtio-ports/*/name. A port's name
// arrives from the host after the port itself, so it can be empty for a
// moment after the device appears.
func findPorts(sysRoot string) (map[string]string, error) {
	dir := filepath.Join(sysRoot, "class", "virtio-ports")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]string{}, nil // virtio_console has not probed yet
	}
	if err != nil {
		return nil, fmt.Errorf("list virtio ports: %w", err)
	}
	ports := make(map[string]string)
	for _, e := range entries {
		name, err := readAttr(filepath.Join(dir, e.Name(), "name"))
		if err != nil || name == "" {
			continue
		}
		if _, dup := ports[name]; !dup {
			ports[name] = e.Name()
		}
	}
	return ports, nil
}

// findInputs returns the event device names ("event0") of every input
// device called name, from sysRoot/class/input/event*/device/name. ACPI can
// register more than one "Power Button" (the fixed-feature button and a
// PNP0C0C device); the caller listens on all of them.
func findInputs(sysRoot, name string) ([]string, error) {
	matches, err := filepath.Glob(filepath.Join(sysRoot, "class", "input", "event*"))
	if err != nil {
		return nil, fmt.Errorf("list input devices: %w", err)
	}
	var found []string
	for _, m := range matches {
		n, err := readAttr(filepath.Join(m, "device", "name"))
		if err == nil && n == name {
			found = append(found, filepath.Base(m))
		}
	}
	return found, nil
}

func readAttr(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(data)), nil
}
