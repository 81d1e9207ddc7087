package vmdriver

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/errdefs"
)

// The firmware follows vm.firmware and what is installed, and the
// fingerprint says which and why; qboot configured but missing makes the
// driver unhealthy instead of booting something else.
func TestFirmwareChoice(t *testing.T) {
	rom := filepath.Join(t.TempDir(), "qboot.rom")
	if err := os.WriteFile(rom, []byte("rom"), 0o644); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "qboot.rom")
	for _, tc := range []struct {
		config       Firmware
		path         string
		want, romArg string
		reason       string
		unavailable  bool
	}{
		{config: "", path: rom, want: "qboot", romArg: rom, reason: "qboot at " + rom},
		{config: FirmwareAuto, path: missing, want: "seabios", reason: "no qboot"},
		{config: FirmwareQboot, path: rom, want: "qboot", romArg: rom, reason: "vm.firmware is qboot"},
		{config: FirmwareQboot, path: missing, want: "unavailable", reason: "not installed", unavailable: true},
		{config: FirmwareSeaBIOS, path: rom, want: "seabios", reason: "vm.firmware is seabios"},
		{config: FirmwareAuto, path: t.TempDir(), want: "seabios", reason: "not a regular file"},
	} {
		d, err := New(Options{Root: t.TempDir(), Firmware: tc.config, QbootPath: tc.path, InitPath: "/bin/true"})
		if err != nil {
			t.Fatal(err)
		}
		c := d.firmware()
		details := map[string]string{}
		derr := d.firmwareDetails(details)
		name := string(tc.config) + " with " + tc.path
		if details["firmware"] != tc.want || !strings.Contains(details["firmware_reason"], tc.reason) {
			t.Errorf("%s: details %v, want firmware %s saying %q", name, details, tc.want, tc.reason)
		}
		if c.rom != tc.romArg {
			t.Errorf("%s: rom %q, want %q", name, c.rom, tc.romArg)
		}
		if tc.unavailable != (derr != nil) || tc.unavailable != (c.err != nil) {
			t.Errorf("%s: error %v / %v, want one: %v", name, derr, c.err, tc.unavailable)
		}
		if tc.unavailable && !errors.Is(c.err, errdefs.ErrUnavailable) {
			t.Errorf("%s: %v, want unavailable", name, c.err)
		}
	}
	if _, err := New(Options{Root: t.TempDir(), Firmware: "uefi", InitPath: "/bin/true"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Fatalf("firmware uefi: %v, want invalid argument", err)
	}
}

// A direct kernel boot gets the firmware as a read-only ROM; without one
// the domain has no loader (QEMU's SeaBIOS), and a whole-disk domain, which
// needs SeaBIOS to find its bootloader, refuses one.
func TestDomainXMLFirmware(t *testing.T) {
	s := testSpec(AccelTCG)
	s.Firmware = "/usr/share/qemu/qboot.rom"
	dom := parsedDomain(t, s)
	if l := dom.OS.Loader; l == nil || l.Path != s.Firmware || l.Type != "rom" || l.Readonly != "yes" {
		t.Errorf("loader %+v, want the read-only ROM %s", l, s.Firmware)
	}
	if dom.OS.Kernel != s.Kernel {
		t.Errorf("kernel %q, want %q", dom.OS.Kernel, s.Kernel)
	}

	dom = parsedDomain(t, testSpec(AccelTCG))
	if dom.OS.Loader != nil {
		t.Errorf("loader %+v without a firmware, want none", dom.OS.Loader)
	}

	w := domainSpec{Name: "berth-d1", Meta: domainMeta{ID: "d1", Root: "/r"}, Accel: AccelTCG, VCPUs: 1, MemoryKi: memoryKiB(0),
		RootDisk: "/r/root.qcow2", RootFormat: "qcow2", WholeDisk: true, ConsoleSocket: "/r/console.sock", Firmware: s.Firmware}
	if _, err := domainXML(w); err == nil || !strings.Contains(err.Error(), "no kernel") {
		t.Errorf("whole-disk domain with a firmware: %v, want refused", err)
	}
}
