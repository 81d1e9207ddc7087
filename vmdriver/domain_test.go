package vmdriver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/berthd/berth/guest"
)

func testSpec(accel Accel) domainSpec {
	return domainSpec{
		Name:  "berth-t1",
		Meta:  domainMeta{ID: "t1", Root: "/var/lib/berth/vms"},
		Accel: accel, VCPUs: 2, MemoryKi: memoryKiB(256 << 20),
		Kernel: "/boot/vmlinuz", Initrd: "/cache/initramfs.cpio.gz", Cmdline: kernelCmdline,
		RootDisk: "/t/root.qcow2", RootFormat: "qcow2", ConfigDisk: "/t/config.img",
		Ports: map[string]string{
			guest.StdoutPort: "/t/stdout.sock", guest.StderrPort: "/t/stderr.sock", guest.StatusPort: "/t/status.sock",
		},
		Console: "/t/console.log",
	}
}

// parsedDomain generates the domain XML of s and parses it back, as
// libvirt will read it.
func parsedDomain(t *testing.T, s domainSpec) libvirtxml.Domain {
	t.Helper()
	doc, err := domainXML(s)
	if err != nil {
		t.Fatal(err)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(doc); err != nil {
		t.Fatalf("generated XML does not parse: %v\n%s", err, doc)
	}
	return dom
}

// The domain follows package guest's contract: what libvirt gets is parsed
// back and checked field by field.
func TestDomainXML(t *testing.T) {
	dom := parsedDomain(t, testSpec(AccelTCG))
	if dom.Type != "qemu" || dom.Name != "berth-t1" {
		t.Errorf("type %q name %q, want qemu berth-t1", dom.Type, dom.Name)
	}
	if dom.OnPoweroff != "destroy" || dom.OnReboot != "destroy" || dom.OnCrash != "destroy" {
		t.Errorf("lifecycle actions = %s/%s/%s, want destroy on all", dom.OnPoweroff, dom.OnReboot, dom.OnCrash)
	}
	if dom.Features == nil || dom.Features.ACPI == nil {
		t.Error("no ACPI: the power button would not reach the guest")
	}
	if dom.CPU == nil || dom.CPU.Mode == "host-passthrough" || dom.CPU.Model == nil || dom.CPU.Model.Value != "qemu64" {
		t.Errorf("cpu = %+v, want the qemu64 model under TCG", dom.CPU)
	}
	if f := dom.Features; f.SMM == nil || f.SMM.State != "off" || f.VMPort == nil || f.VMPort.State != "off" {
		t.Errorf("features smm %+v vmport %+v, want both off", f.SMM, f.VMPort)
	}
	if tcg := dom.Features.TCG; tcg == nil || tcg.TBCache == nil || tcg.TBCache.Size != tcgTBCacheMiB || tcg.TBCache.Unit != "MiB" {
		t.Errorf("tcg features = %+v, want a %d MiB translation cache", tcg, tcgTBCacheMiB)
	}
	if dom.VCPU.Value != 2 || dom.Memory.Value != (256<<10)+uint(GuestMemoryOverhead>>10) || dom.Memory.Unit != "KiB" {
		t.Errorf("vcpu %d memory %d %s", dom.VCPU.Value, dom.Memory.Value, dom.Memory.Unit)
	}
	if dom.OS.Kernel != "/boot/vmlinuz" || dom.OS.Initrd != "/cache/initramfs.cpio.gz" ||
		!strings.Contains(dom.OS.Cmdline, "console=ttyS0") || !strings.Contains(dom.OS.Cmdline, "panic=-1") {
		t.Errorf("os = %+v", dom.OS)
	}
	devs := dom.Devices
	serials := map[string]libvirtxml.DomainDisk{}
	for _, d := range devs.Disks {
		if d.Target.Bus != "virtio" {
			t.Errorf("disk %s on bus %s, want virtio", d.Serial, d.Target.Bus)
		}
		serials[d.Serial] = d
	}
	if d := serials[guest.RootDiskSerial]; d.Driver == nil || d.Driver.Type != "qcow2" || d.Source.File.File != "/t/root.qcow2" || d.ReadOnly != nil {
		t.Errorf("root disk = %+v", d)
	}
	if d := serials[guest.ConfigDiskSerial]; d.Driver == nil || d.Driver.Type != "raw" || d.ReadOnly == nil {
		t.Errorf("config disk = %+v, want raw and read-only", d)
	}
	ports := map[string]string{}
	for _, c := range devs.Channels {
		if c.Source.UNIX == nil || c.Source.UNIX.Mode != "bind" {
			t.Errorf("channel %+v is not a unix socket QEMU listens on", c)
			continue
		}
		ports[c.Target.VirtIO.Name] = c.Source.UNIX.Path
	}
	for port, sock := range testSpec(AccelTCG).Ports {
		if ports[port] != sock {
			t.Errorf("port %s on %q, want %q", port, ports[port], sock)
		}
	}
	if len(devs.Serials) != 1 || devs.Serials[0].Source.File == nil || devs.Serials[0].Source.File.Path != "/t/console.log" {
		t.Errorf("serial console = %+v", devs.Serials)
	}
	if len(devs.Interfaces) != 0 || len(devs.Hostdevs) != 0 || len(devs.Graphics) != 0 {
		t.Errorf("unexpected devices: %d interfaces, %d hostdevs, %d graphics", len(devs.Interfaces), len(devs.Hostdevs), len(devs.Graphics))
	}
	if devs.MemBalloon == nil || devs.MemBalloon.Model != "none" {
		t.Errorf("memballoon = %+v, want none", devs.MemBalloon)
	}
	if !strings.Contains(dom.Metadata.XML, "<id>t1</id>") || !strings.Contains(dom.Metadata.XML, metadataNS) {
		t.Errorf("metadata = %s", dom.Metadata.XML)
	}
}

// Every device sits on the root bus (no PCIe root ports), each in a slot
// of its own, and the command line skips the crypto self-tests.
func TestDomainXMLFlatPCI(t *testing.T) {
	spec := testSpec(AccelTCG)
	spec.Interfaces = []libvirtxml.DomainInterface{bridgeInterface("berth0", "52:54:00:00:00:01"), bridgeInterface("berth0", "52:54:00:00:00:02")}
	dom := parsedDomain(t, spec)
	slots := map[uint]string{}
	check := func(what string, a *libvirtxml.DomainAddress) {
		if a == nil || a.PCI == nil || a.PCI.Bus == nil || *a.PCI.Bus != 0 || a.PCI.Slot == nil || a.PCI.Function == nil || *a.PCI.Function != 0 {
			t.Errorf("%s: address %+v, want a slot on bus 0", what, a)
			return
		}
		if other, dup := slots[*a.PCI.Slot]; dup {
			t.Errorf("%s and %s share slot %#x", what, other, *a.PCI.Slot)
		}
		if *a.PCI.Slot == 0 || *a.PCI.Slot >= 0x1f {
			t.Errorf("%s in reserved slot %#x", what, *a.PCI.Slot)
		}
		slots[*a.PCI.Slot] = what
	}
	for _, d := range dom.Devices.Disks {
		check("disk "+d.Serial, d.Address)
	}
	for _, i := range dom.Devices.Interfaces {
		check("interface "+i.MAC.Address, i.Address)
	}
	for _, c := range dom.Devices.Controllers {
		switch c.Type {
		case "virtio-serial":
			check("virtio-serial", c.Address)
		case "pci":
			t.Errorf("PCI controller %s: berth's guests need no root ports", c.Model)
		}
	}
	if len(slots) != 5 {
		t.Errorf("%d devices placed, want 5", len(slots))
	}
	if !strings.Contains(dom.OS.Cmdline, "cryptomgr.notests") {
		t.Errorf("cmdline %q", dom.OS.Cmdline)
	}
	spec.Interfaces = make([]libvirtxml.DomainInterface, 40)
	if _, err := domainXML(spec); err == nil {
		t.Error("40 interfaces fit on the root bus")
	}
}

func TestDomainXMLKVM(t *testing.T) {
	dom := parsedDomain(t, testSpec(AccelKVM))
	if dom.Type != "kvm" || dom.CPU == nil || dom.CPU.Mode != "host-model" {
		t.Errorf("type %q cpu %+v, want kvm with host-model (never host-passthrough)", dom.Type, dom.CPU)
	}
	if dom.Features.TCG != nil {
		t.Errorf("tcg features under KVM: %+v", dom.Features.TCG)
	}
	if _, err := domainXML(testSpec(AccelAuto)); err == nil {
		t.Error("domainXML accepted an unresolved accel")
	}
}

func TestSizing(t *testing.T) {
	for _, c := range []struct {
		cpu  float64
		want uint
	}{{0, 1}, {0.5, 1}, {1, 1}, {1.2, 2}, {3, 3}} {
		if got := vcpus(c.cpu); got != c.want {
			t.Errorf("vcpus(%v) = %d, want %d", c.cpu, got, c.want)
		}
	}
	if got, want := memoryKiB(0), uint((DefaultMemoryBytes+GuestMemoryOverhead)>>10); got != want {
		t.Errorf("memoryKiB(0) = %d, want %d", got, want)
	}
}

func TestExitResultFromStatus(t *testing.T) {
	cases := []struct {
		name, status string
		killed       bool
		code, sig    int
		errHas       string
	}{
		{"exited", `{"event":"started","pid":5}` + "\n" + `{"event":"exited","exit_code":7}` + "\n", false, 7, 0, ""},
		{"signal", `{"event":"started","pid":5}` + "\n" + `{"event":"exited","exit_code":143,"signal":15}` + "\n", false, 143, 15, ""},
		{"init error", `{"event":"error","message":"exec foo: not found","exit_code":127}` + "\n", false, 127, 0, "not found"},
		{"forced off", `{"event":"started","pid":5}` + "\n", true, 137, 9, ""},
		{"crashed", `{"event":"started","pid":5}` + "\n", false, -1, 0, "KERNEL-PANIC-MARKER"},
		{"result wins over kill", `{"event":"exited","exit_code":3}` + "\n", true, 3, 0, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, dir, statusLog, c.status)
			writeFile(t, dir, consoleLog, "boot...\nKERNEL-PANIC-MARKER\n")
			if c.killed {
				writeFile(t, dir, killedFile, "")
			}
			res := exitResult(dir)
			if res.ExitCode != c.code || res.Signal != c.sig || !strings.Contains(res.Err, c.errHas) || (c.errHas == "" && res.Err != "") {
				t.Errorf("result = %+v, want code %d signal %d err containing %q", res, c.code, c.sig, c.errHas)
			}
		})
	}
}

func writeFile(t *testing.T, dir, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}
