package initramfs

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/pierrec/lz4/v4"
)

type cpioEntry struct {
	name         string
	mode         uint32
	rmajor, rmin uint32
	data         []byte
}

// readCPIO parses a newc archive independently of the writer.
func readCPIO(t *testing.T, data []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off+110 > len(data) {
			t.Fatalf("truncated header at %d", off)
		}
		hdr := string(data[off : off+110])
		if hdr[:6] != "070701" {
			t.Fatalf("bad magic %q at %d", hdr[:6], off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(hdr[6+8*i:14+8*i], 16, 32)
			if err != nil {
				t.Fatalf("bad header field %d at %d: %v", i, off, err)
			}
			return uint32(v)
		}
		mode, size, rmaj, rmin, nameSize := field(1), int(field(6)), field(9), field(10), int(field(11))
		name := string(data[off+110 : off+110+nameSize-1])
		off = align(off + 110 + nameSize)
		body := data[off : off+size]
		off = align(off + size)
		if name == "TRAILER!!!" {
			if off != len(data) {
				t.Fatalf("%d bytes after trailer", len(data)-off)
			}
			return out
		}
		out = append(out, cpioEntry{name, mode, rmaj, rmin, body})
	}
}

func TestCPIOWriter(t *testing.T) {
	var buf bytes.Buffer
	w := newCPIOWriter(&buf)
	w.Dir("/dev", 0o755)
	w.CharDev("/dev/console", 0o600, 5, 1)
	w.File("/init", 0o755, []byte("odd length"))
	w.Symlink("/sh", "init")
	w.File("/empty", 0o644, nil)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Errorf("archive length %d is not 4-aligned", buf.Len())
	}
	got := readCPIO(t, buf.Bytes())
	want := []cpioEntry{
		{"dev", sIFDIR | 0o755, 0, 0, nil},
		{"dev/console", sIFCHR | 0o600, 5, 1, nil},
		{"init", sIFREG | 0o755, 0, 0, []byte("odd length")},
		{"sh", sIFLNK | 0o777, 0, 0, []byte("init")},
		{"empty", sIFREG | 0o644, 0, 0, nil},
	}
	if len(got) != len(want) {
		t.Fatalf("entries = %+v", got)
	}
	for i := range want {
		if got[i].name != want[i].name || got[i].mode != want[i].mode || got[i].rmajor != want[i].rmajor ||
			got[i].rmin != want[i].rmin || !bytes.Equal(got[i].data, want[i].data) {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}

	// GNU cpio, when present, must agree that the archive is well formed.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-t", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -t: %v", err)
		}
		if got := strings.Fields(string(out)); strings.Join(got, " ") != "dev dev/console init sh empty" {
			t.Errorf("cpio -t lists %q", got)
		}
	}
}

func TestCPIOWriterRejectsBadNames(t *testing.T) {
	w := newCPIOWriter(io.Discard)
	w.File("/", 0o644, nil)
	if err := w.Close(); err == nil {
		t.Error("empty name accepted")
	}
}

// fakeKernel makes a modules dir with a few tiny "modules".
func fakeKernel(t *testing.T) Kernel {
	dir := fakeModules(t, map[string]string{
		"modules.dep":       "kernel/a.ko: kernel/b.ko\nkernel/b.ko:\nkernel/c.ko:\n",
		"kernel/a.ko":       "module a",
		"kernel/b.ko":       "module b",
		"kernel/c.ko":       "module c",
		"modules.builtin":   "",
		"modules.softdep":   "",
		"modules.alias":     "alias cpu:type:x86,ven*fam*mod*:feature:*0094* a\n",
		"modules.order":     "",
		"modules.dep.bin":   "",
		"modules.alias.bin": "",
	})
	return Kernel{Path: "/nonexistent/vmlinuz", Release: "9.9.9-test", ModulesDir: dir}
}

func readArchive(t *testing.T, path string) map[string]cpioEntry {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]cpioEntry{}
	for _, e := range readCPIO(t, data) {
		m[e.name] = e
	}
	return m
}

func TestBuild(t *testing.T) {
	k := fakeKernel(t)
	cache := t.TempDir()
	initPath := filepath.Join(t.TempDir(), "berth-init")
	os.WriteFile(initPath, []byte("\x7fELF init v1"), 0o755)
	opts := Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: cache}

	p, err := Build(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	files := readArchive(t, p)
	if e := files["init"]; string(e.data) != "\x7fELF init v1" || e.mode != sIFREG|0o755 {
		t.Errorf("/init = %+v", e)
	}
	if e := files["dev/console"]; e.mode != sIFCHR|0o600 || e.rmajor != 5 || e.rmin != 1 {
		t.Errorf("/dev/console = %+v", e)
	}
	for _, d := range []string{"dev", "proc", "sys", "newroot", "berth", "lib", "lib/modules", "lib/modules/9.9.9-test/kernel"} {
		if files[d].mode != sIFDIR|0o755 {
			t.Errorf("directory /%s missing: %+v", d, files[d])
		}
	}
	// a is for CPUs with feature 0094: berth-init loads it only there.
	wantList := "/lib/modules/9.9.9-test/kernel/b.ko\n/lib/modules/9.9.9-test/kernel/a.ko cpu:type:x86,ven*fam*mod*:feature:*0094*\n"
	if got := string(files["berth/modules"].data); got != wantList {
		t.Errorf("/berth/modules = %q, want %q", got, wantList)
	}
	if string(files["lib/modules/9.9.9-test/kernel/a.ko"].data) != "module a" {
		t.Error("module a missing or wrong")
	}
	if _, ok := files["lib/modules/9.9.9-test/kernel/c.ko"]; ok {
		t.Error("unrequested module c included")
	}

	// Same inputs: the cached file, untouched.
	before, _ := os.Stat(p)
	p2, err := Build(context.Background(), opts)
	if err != nil || p2 != p {
		t.Fatalf("second Build = %q, %v; want cached %q", p2, err, p)
	}
	after, _ := os.Stat(p2)
	if !os.SameFile(before, after) || !before.ModTime().Equal(after.ModTime()) {
		t.Error("second Build rewrote the archive")
	}

	// Any changed input: a new archive.
	os.WriteFile(initPath, []byte("\x7fELF init v2"), 0o755)
	p3, err := Build(context.Background(), opts)
	if err != nil || p3 == p {
		t.Fatalf("changed init: Build = %q, %v; want a new path", p3, err)
	}
	os.WriteFile(filepath.Join(k.ModulesDir, "kernel/b.ko"), []byte("module b, rebuilt"), 0o644)
	p4, err := Build(context.Background(), opts)
	if err != nil || p4 == p3 {
		t.Fatalf("changed module: Build = %q, %v; want a new path", p4, err)
	}
	opts.Modules = []string{"a", "c"}
	p5, err := Build(context.Background(), opts)
	if err != nil || p5 == p4 {
		t.Fatalf("changed module list: Build = %q, %v; want a new path", p5, err)
	}
	if leftovers, _ := filepath.Glob(filepath.Join(cache, ".initramfs-*")); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

// A kernel built to read lz4 initramfs archives gets one, in the legacy
// frame format its unpacker reads; the same files as the gzip archive of
// a kernel whose configuration does not say so (or cannot be read).
func TestBuildLZ4(t *testing.T) {
	initPath := filepath.Join(t.TempDir(), "berth-init")
	os.WriteFile(initPath, []byte("\x7fELF init"), 0o755)
	boot := t.TempDir()
	k := fakeKernel(t)
	k.Path = filepath.Join(boot, "vmlinuz-"+k.Release)
	gzPath, err := Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(gzPath, ".cpio.gz") {
		t.Fatalf("no kernel config: %s, want gzip", gzPath)
	}
	os.WriteFile(filepath.Join(boot, "config-"+k.Release), []byte("CONFIG_RD_GZIP=y\n# CONFIG_RD_LZ4 is not set\n"), 0o644)
	if p, err := Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: t.TempDir()}); err != nil || !strings.HasSuffix(p, ".cpio.gz") {
		t.Fatalf("kernel without lz4: %s, %v; want gzip", p, err)
	}
	os.WriteFile(filepath.Join(boot, "config-"+k.Release), []byte("CONFIG_RD_GZIP=y\nCONFIG_RD_LZ4=y\n"), 0o644)
	p, err := Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: t.TempDir()})
	if err != nil || !strings.HasSuffix(p, ".cpio.lz4") {
		t.Fatalf("kernel with lz4: %s, %v; want lz4", p, err)
	}
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) < 8 || !bytes.Equal(data[:4], []byte{0x02, 0x21, 0x4c, 0x18}) {
		t.Fatalf("archive starts % x, want the legacy lz4 magic 0x184C2102", data[:min(8, len(data))])
	}
	// The legacy format as the kernel reads it: blocks of a little-endian
	// compressed length and data, each decompressing to at most 8 MiB.
	var raw []byte
	for rest := data[4:]; len(rest) > 0; {
		n := int(rest[0]) | int(rest[1])<<8 | int(rest[2])<<16 | int(rest[3])<<24
		if n <= 0 || n > len(rest)-4 {
			t.Fatalf("block of %d bytes with %d left", n, len(rest)-4)
		}
		out := make([]byte, 8<<20)
		m, err := lz4.UncompressBlock(rest[4:4+n], out)
		if err != nil {
			t.Fatalf("block: %v", err)
		}
		raw = append(raw, out[:m]...)
		rest = rest[4+n:]
	}
	got := map[string]cpioEntry{}
	for _, e := range readCPIO(t, raw) {
		got[e.name] = e
	}
	want := readArchive(t, gzPath)
	if len(got) != len(want) {
		t.Errorf("lz4 archive has %d entries, the gzip one %d", len(got), len(want))
	}
	for name, e := range want {
		if g, ok := got[name]; !ok || !bytes.Equal(g.data, e.data) || g.mode != e.mode {
			t.Errorf("%s: lz4 %+v, gzip %+v", name, g, e)
		}
	}
}

func TestBuildDeterministic(t *testing.T) {
	k := fakeKernel(t)
	initPath := filepath.Join(t.TempDir(), "berth-init")
	os.WriteFile(initPath, []byte("init"), 0o755)
	var sums []string
	for range 2 {
		p, err := Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		data, _ := os.ReadFile(p)
		sums = append(sums, fmt.Sprintf("%s %x", filepath.Base(p), data))
	}
	if sums[0] != sums[1] {
		t.Error("two builds of the same inputs differ")
	}
}

func TestBuildConcurrent(t *testing.T) {
	k := fakeKernel(t)
	cache := t.TempDir()
	initPath := filepath.Join(t.TempDir(), "berth-init")
	os.WriteFile(initPath, bytes.Repeat([]byte("init"), 1<<18), 0o755)
	const n = 8
	paths := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: cache})
		}()
	}
	wg.Wait()
	var ino uint64
	for i := range n {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Fatalf("Build %d = %q, %v; want %q", i, paths[i], errs[i], paths[0])
		}
	}
	fi, err := os.Stat(paths[0])
	if err != nil {
		t.Fatal(err)
	}
	ino = fi.Sys().(*syscall.Stat_t).Ino
	readArchive(t, paths[0]) // complete and well formed
	if leftovers, _ := filepath.Glob(filepath.Join(cache, ".initramfs-*")); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
	// A rebuild would have renamed a new inode into place.
	if _, err := Build(context.Background(), Options{Kernel: k, InitPath: initPath, Modules: []string{"a"}, CacheDir: cache}); err != nil {
		t.Fatal(err)
	}
	fi, _ = os.Stat(paths[0])
	if fi.Sys().(*syscall.Stat_t).Ino != ino {
		t.Error("archive replaced after it was built")
	}
}

func TestBuildErrors(t *testing.T) {
	k := fakeKernel(t)
	if _, err := Build(context.Background(), Options{Kernel: k, InitPath: "/nonexistent", CacheDir: t.TempDir(), Modules: []string{"a"}}); err == nil {
		t.Error("missing init accepted")
	}
	if _, err := Build(context.Background(), Options{Kernel: k, InitPath: "/bin/sh", CacheDir: t.TempDir(), Modules: []string{"zz"}}); err == nil {
		t.Error("unknown module accepted")
	}
	if _, err := Build(context.Background(), Options{InitPath: "/bin/sh", CacheDir: t.TempDir()}); err == nil {
		t.Error("missing kernel accepted")
	}
}
