// Package testdisk builds a small bootable whole-disk VM image for tests,
// from Debian packages on the machine (nothing is downloaded).
package testdisk

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/vmdriver/initramfs"
)

// A bootable whole-disk image, built here from Debian packages (nothing is
// downloaded): an MBR disk (syslinux's mbr.bin) with one active FAT16
// partition holding SYSLINUX, the node's kernel and a busybox initramfs
// whose /init prints Hello on ttyS0 and powers off, or with hold
// prints and then runs until it is forced off (busybox ignores the ACPI
// power button: nothing in it listens to it).

// Hello is the line the disk's init prints on its console.
const Hello = "hello from the disk image"

// Tools and files the disk build needs, with their Debian packages
// (hack/deps.sh installs them).
var diskTools = map[string]string{
	"mkfs.fat": "dosfstools",
	"syslinux": "syslinux",
	"mcopy":    "mtools",
	"qemu-img": "qemu-utils",
}

const mbrBin = "/usr/lib/syslinux/mbr/mbr.bin" // syslinux-common

// Build writes a bootable qcow2 disk into dir and returns its path.
func Build(t testing.TB, dir string, hold bool) string {
	t.Helper()
	for tool, pkg := range diskTools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found: install %s (hack/deps.sh does)", tool, pkg)
		}
	}
	mbr, err := os.ReadFile(mbrBin)
	if err != nil {
		t.Fatalf("%v: install syslinux-common", err)
	}
	k, err := initramfs.FindKernel("/boot", "/lib/modules")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := func(name string) string { return filepath.Join(dir, name) }

	script := "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\necho '" + Hello + "'\n"
	if hold {
		script += "while :; do /bin/busybox sleep 1; done\n"
	}
	script += "/bin/busybox poweroff -f\n"
	writeCPIO(t, p("initrd"), script)
	kargs := "console=ttyS0 panic=-1 quiet"
	// SERIAL: the bootloader talks on ttyS0 too, so the console's very
	// first lines are in the log (the guest starts paused until the
	// monitor is connected).
	cfg := "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  INITRD initrd\n  APPEND " + kargs + "\n"
	if err := os.WriteFile(p("syslinux.cfg"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	kernel, err := os.ReadFile(k.Path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p("vmlinuz"), kernel, 0o644); err != nil {
		t.Fatal(err)
	}

	// The partition: FAT16 starting at sector 2048 (its boot sector says
	// so: -h), SYSLINUX installed into it through mtools, no mount needed.
	const startSector = 2048
	part := p("part.img")
	sh(t, "mkfs.fat", "-F", "16", "-h", fmt.Sprint(startSector), "-n", "BERTHTEST", "-C", part, "32768")
	sh(t, "syslinux", "--install", part)
	sh(t, "mcopy", "-i", part, p("vmlinuz"), p("initrd"), p("syslinux.cfg"), "::/")
	partData, err := os.ReadFile(part)
	if err != nil {
		t.Fatal(err)
	}

	// The disk: MBR boot code, one active partition entry (type 0x06,
	// FAT16; CHS fields unused), the partition at 1 MiB.
	hdr := make([]byte, startSector*512)
	copy(hdr, mbr[:min(len(mbr), 440)])
	entry := hdr[446:462]
	entry[0] = 0x80
	copy(entry[1:4], []byte{0xfe, 0xff, 0xff})
	entry[4] = 0x06
	copy(entry[5:8], []byte{0xfe, 0xff, 0xff})
	binary.LittleEndian.PutUint32(entry[8:12], startSector)
	binary.LittleEndian.PutUint32(entry[12:16], uint32(len(partData)/512))
	hdr[510], hdr[511] = 0x55, 0xaa
	raw := p("disk.raw")
	if err := os.WriteFile(raw, append2(hdr, partData), 0o644); err != nil {
		t.Fatal(err)
	}
	img := p("disk.qcow2")
	sh(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, img)
	for _, f := range []string{"vmlinuz", "initrd", "syslinux.cfg", "part.img", "disk.raw"} {
		os.Remove(p(f))
	}
	return img
}

func append2(a, b []byte) []byte { return append(append(make([]byte, 0, len(a)+len(b)), a...), b...) }

func sh(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// writeCPIO writes a newc initramfs: busybox, /init, and the directories
// and /dev/console the script needs.
func writeCPIO(t testing.TB, path, initScript string) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatalf("%v: install busybox-static", err)
	}
	var buf bytes.Buffer
	ino := 0
	add := func(name string, mode uint32, rdev [2]int, data []byte) {
		ino++
		fmt.Fprintf(&buf, "070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
			ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name)+1, 0)
		buf.WriteString(name)
		buf.WriteByte(0)
		for buf.Len()%4 != 0 {
			buf.WriteByte(0)
		}
		buf.Write(data)
		for buf.Len()%4 != 0 {
			buf.WriteByte(0)
		}
	}
	for _, d := range []string{"bin", "dev", "proc"} {
		add(d, 0o040755, [2]int{}, nil)
	}
	add("dev/console", 0o020600, [2]int{5, 1}, nil)
	add("bin/busybox", 0o100755, [2]int{}, bb)
	add("init", 0o100755, [2]int{}, []byte(initScript))
	add("TRAILER!!!", 0, [2]int{}, nil)
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}
