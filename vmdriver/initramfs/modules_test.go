package initramfs

import (
	"bytes"
	"compress/gzip"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/berthd/berth/errdefs"
)

// fakeModules writes a modules directory with depmod's index files.
func fakeModules(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func names(mods []Module) []string {
	var out []string
	for _, m := range mods {
		out = append(out, m.Name)
	}
	return out
}

func TestResolve(t *testing.T) {
	dir := fakeModules(t, map[string]string{
		"modules.dep": `kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/jbd2/jbd2.ko
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/input/evdev.ko:
kernel/drivers/net/some-driver.ko.gz:
`,
		"modules.builtin": "kernel/drivers/acpi/button.ko\n",
		"modules.softdep": "# Soft dependencies extracted from modules themselves.\nsoftdep ext4 pre: crypto-crc32c\nsoftdep jbd2 pre: crypto-crc32c\nsoftdep evdev pre: no-such-alias post: virtio\n",
		"modules.alias": "alias crypto-crc32c-intel crc32c_intel\nalias crypto-crc32c crc32c_intel\nalias crypto-crc32c crc32c_generic\nalias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n" +
			"alias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel\nalias cpu:type:x86,ven*fam*mod*:feature:*009E* crc32c_intel\n",
	})

	mods, err := Resolve(dir, []string{"virtio-blk", "virtio_pci", "ext4", "button", "evdev", "some_driver"})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"virtio_ring", "virtio", "virtio_blk", "virtio_pci", "crc32c_intel", "crc32c_generic", "crc16", "jbd2", "ext4", "evdev", "some_driver"}
	if got := names(mods); !slices.Equal(got, want) {
		t.Errorf("Resolve = %q\nwant      %q", got, want)
	}
	if mods[0].Path != "kernel/drivers/virtio/virtio_ring.ko" {
		t.Errorf("path = %q", mods[0].Path)
	}
	// A driver for a CPU feature carries the CPUs it is for; the others
	// are for any CPU.
	for _, m := range mods {
		want := []string(nil)
		if m.Name == "crc32c_intel" {
			want = []string{"cpu:type:x86,ven*fam*mod*:feature:*0094*", "cpu:type:x86,ven*fam*mod*:feature:*009E*"}
		}
		if !slices.Equal(m.CPU, want) {
			t.Errorf("%s: cpu %q, want %q", m.Name, m.CPU, want)
		}
	}

	// Every module comes after everything it depends on.
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
	}
	for _, pair := range [][2]string{{"virtio_ring", "virtio"}, {"virtio", "virtio_pci"}, {"jbd2", "ext4"}, {"crc32c_generic", "jbd2"}} {
		if pos[pair[0]] > pos[pair[1]] {
			t.Errorf("%s loads after %s", pair[0], pair[1])
		}
	}

	if _, err := Resolve(dir, []string{"nonexistent"}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("unknown module: err = %v, want ErrNotFound", err)
	}
	if mods, err := Resolve(dir, []string{"button"}); err != nil || len(mods) != 0 {
		t.Errorf("built-in module: %v, %v; want nothing to load", mods, err)
	}
}

func TestResolveCycle(t *testing.T) {
	dir := fakeModules(t, map[string]string{"modules.dep": "a.ko: b.ko\nb.ko: a.ko\n"})
	if _, err := Resolve(dir, []string{"a"}); err == nil || !strings.Contains(err.Error(), "cycle") {
		t.Errorf("err = %v, want a cycle error", err)
	}
}

func TestReadModuleCompressed(t *testing.T) {
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write([]byte("\x7fELF module"))
	zw.Close()
	dir := fakeModules(t, map[string]string{
		"kernel/a.ko":     "\x7fELF plain",
		"kernel/b.ko.gz":  gz.String(),
		"kernel/c.ko.xz":  "\xfd7zXZ",
		"kernel/d.ko.zst": "\x28\xb5\x2f\xfd",
	})
	if data, err := readModule(dir, Module{Name: "a", Path: "kernel/a.ko"}); err != nil || string(data) != "\x7fELF plain" {
		t.Errorf("plain: %q, %v", data, err)
	}
	if data, err := readModule(dir, Module{Name: "b", Path: "kernel/b.ko.gz"}); err != nil || string(data) != "\x7fELF module" {
		t.Errorf("gzip: %q, %v", data, err)
	}
	for _, p := range []string{"kernel/c.ko.xz", "kernel/d.ko.zst"} {
		if _, err := readModule(dir, Module{Name: "c", Path: p}); !errors.Is(err, errdefs.ErrNotImplemented) || !strings.Contains(err.Error(), p) {
			t.Errorf("%s: err = %v, want a clear ErrNotImplemented", p, err)
		}
	}
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{
		"virtio-blk":                             "virtio_blk",
		"kernel/arch/x86/crypto/crc32c-intel.ko": "crc32c_intel",
		"kernel/fs/ext4/ext4.ko.xz":              "ext4",
		"evdev":                                  "evdev",
	} {
		if got := ModuleName(in); got != want {
			t.Errorf("ModuleName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestResolveInstalledKernel checks what this machine's kernel really needs.
func TestResolveInstalledKernel(t *testing.T) {
	k, err := FindKernel("/boot", "/lib/modules")
	if err != nil {
		t.Skipf("no kernel with modules installed (%v); install linux-image-amd64", err)
	}
	mods, err := Resolve(k.ModulesDir, DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	got := names(mods)
	t.Logf("kernel %s needs %v", k.Release, got)
	for _, m := range mods {
		if _, err := readModule(k.ModulesDir, m); err != nil {
			t.Errorf("module %s: %v", m.Name, err)
		}
	}
}
