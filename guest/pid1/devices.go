//go:build linux

package pid1

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/berthd/berth/guest"
)

var (
	requiredDisks = []string{guest.RootDiskSerial, guest.ConfigDiskSerial}
	requiredPorts = []string{guest.StatusPort, guest.StdoutPort, guest.StderrPort}
)

// devices are the device nodes berth-init uses, by role.
type devices struct {
	disks   map[string]string // serial -> /dev/vdX
	ports   map[string]string // port name -> /dev/vportNpM
	buttons []string          // /dev/input/eventN of every power button
}

// scanDevices looks once for every device berth-init uses and returns what
// it found with the names of the required ones still missing. A device
// counts only once its node exists under devRoot: devtmpfs creates nodes
// asynchronously, after sysfs shows the device.
func scanDevices(sysRoot, devRoot string) (devices, []string, error) {
	d := devices{disks: map[string]string{}, ports: map[string]string{}}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }

	disks, err := findDisks(sysRoot)
	if err != nil {
		return d, nil, err
	}
	ports, err := findPorts(sysRoot)
	if err != nil {
		return d, nil, err
	}
	buttons, err := findInputs(sysRoot, PowerButtonName)
	if err != nil {
		return d, nil, err
	}
	for serial, name := range disks {
		if p := filepath.Join(devRoot, name); exists(p) {
			d.disks[serial] = p
		}
	}
	for port, name := range ports {
		if p := filepath.Join(devRoot, name); exists(p) {
			d.ports[port] = p
		}
	}
	for _, name := range buttons {
		if p := filepath.Join(devRoot, "input", name); exists(p) {
			d.buttons = append(d.buttons, p)
		}
	}
	var missing []string
	for _, s := range requiredDisks {
		if _, ok := d.disks[s]; !ok {
			missing = append(missing, "disk with serial "+s)
		}
	}
	for _, p := range requiredPorts {
		if _, ok := d.ports[p]; !ok {
			missing = append(missing, "virtio-serial port "+p)
		}
	}
	return d, missing, nil
}

// waitDevices polls until the required disks and ports are there, then
// gives the power button up to buttonGrace more: it is optional (without
// it the host can only force the guest off), so its absence must not fail
// the workload, but it is normally registered by the time the disks are.
// When ctx ends first, the devices found so far are returned with an error
// naming what is missing, so the caller can still report through the status
// port if that much exists.
func waitDevices(ctx context.Context, sysRoot, devRoot string, poll, buttonGrace time.Duration) (devices, error) {
	var since time.Time // when the required devices were all found
	for {
		d, missing, err := scanDevices(sysRoot, devRoot)
		if err != nil {
			return d, err
		}
		if len(missing) == 0 {
			if since.IsZero() {
				since = time.Now()
			}
			if len(d.buttons) > 0 || time.Since(since) >= buttonGrace {
				return d, nil
			}
		}
		select {
		case <-ctx.Done():
			if len(missing) == 0 {
				return d, nil
			}
			slices.Sort(missing)
			return d, fmt.Errorf("devices missing after waiting: %s (is the domain defined with them?)", strings.Join(missing, ", "))
		case <-time.After(poll):
		}
	}
}
