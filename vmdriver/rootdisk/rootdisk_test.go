package rootdisk

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/berthd/berth/errdefs"
)

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (e2fsprogs, qemu-utils)", tool)
		}
	}
}

// sampleTree is a small rootfs with the kinds of entries images have.
func sampleTree(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(dir, "bin"), 0o755))
	must(os.MkdirAll(filepath.Join(dir, "etc"), 0o755))
	must(os.MkdirAll(filepath.Join(dir, "home/app"), 0o750))
	must(os.WriteFile(filepath.Join(dir, "bin/tool"), []byte("#!/bin/sh\necho tool\n"), 0o755))
	must(os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0::/root:/bin/sh\n"), 0o644))
	must(os.WriteFile(filepath.Join(dir, "home/app/secret"), []byte("s"), 0o600))
	must(os.Chown(filepath.Join(dir, "home/app"), 1000, 1000))
	must(os.Chown(filepath.Join(dir, "home/app/secret"), 1000, 1000))
	must(os.Symlink("tool", filepath.Join(dir, "bin/alias")))
	must(os.Link(filepath.Join(dir, "bin/tool"), filepath.Join(dir, "bin/hardlink")))
	big := make([]byte, 3<<20)
	big[0] = 1
	must(os.WriteFile(filepath.Join(dir, "bin/big"), big, 0o644))
	return dir
}

func debugfs(t *testing.T, image, request string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", request, image).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs %q: %v\n%s", request, err, out)
	}
	return string(out)
}

func TestBase(t *testing.T) {
	need(t, "mkfs.ext4", "debugfs", "dumpe2fs")
	if os.Geteuid() != 0 {
		t.Skip("needs root to give the sample tree foreign owners")
	}
	tree := sampleTree(t)
	cache := t.TempDir()
	const headroom = 64 << 20
	p, err := Base(context.Background(), tree, "sha256:0123abcd", cache, WithHeadroom(headroom))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(filepath.Base(p), "base-sha256_0123abcd-") {
		t.Errorf("base name %q does not show the key", filepath.Base(p))
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o444 {
		t.Errorf("base mode %v, want read-only", fi.Mode())
	}
	// Sparse: the headroom costs nothing on disk.
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used >= fi.Size()/2 {
		t.Errorf("base uses %d of %d bytes; want a sparse image", used, fi.Size())
	}
	if fi.Size() < headroom+3<<20 {
		t.Errorf("base is %d bytes, less than tree plus headroom", fi.Size())
	}

	hdr, err := exec.Command("dumpe2fs", "-h", p).CombinedOutput()
	if err != nil {
		t.Fatalf("dumpe2fs: %v\n%s", err, hdr)
	}
	for _, want := range []string{"Filesystem volume name:   berth-root", "Block size:               4096", "Reserved block count:     0", "Filesystem features:", "extent"} {
		if !strings.Contains(string(hdr), want) {
			t.Errorf("dumpe2fs -h lacks %q", want)
		}
	}

	// The free space is the headroom: a workload's disk budget, no more.
	sb, err := readSuperblock(p)
	if err != nil {
		t.Fatal(err)
	}
	if free := sb.freeBlocks * sb.blockSize; free < headroom || free > headroom+2<<20 {
		t.Errorf("base has %d bytes free, want the headroom %d (+ at most 2 MiB)", free, int64(headroom))
	}
	if !strings.Contains(string(hdr), fmt.Sprintf("Free blocks:              %d\n", sb.freeBlocks)) {
		t.Errorf("dumpe2fs -h disagrees on the free blocks (%d):\n%s", sb.freeBlocks, hdr)
	}

	if out := debugfs(t, p, "cat /bin/tool"); !strings.Contains(out, "echo tool") {
		t.Errorf("/bin/tool content: %q", out)
	}
	if out := debugfs(t, p, "stat /home/app/secret"); !strings.Contains(out, "User:  1000") || !strings.Contains(out, "Mode:  0600") {
		t.Errorf("ownership or mode lost:\n%s", out)
	}
	if out := debugfs(t, p, "stat /bin/alias"); !strings.Contains(out, "Type: symlink") || !strings.Contains(out, `Fast link dest: "tool"`) {
		t.Errorf("symlink lost:\n%s", out)
	}
	if out := debugfs(t, p, "stat /bin/tool"); !strings.Contains(out, "Links: 2") {
		t.Errorf("hard link lost:\n%s", out)
	}
	if out := debugfs(t, p, "stat /"); !strings.Contains(out, "Mode:  0755") {
		t.Errorf("root directory mode:\n%s", out)
	}

	// Cached: same file, tree not even looked at.
	os.RemoveAll(tree)
	p2, err := Base(context.Background(), tree, "sha256:0123abcd", cache, WithHeadroom(headroom))
	if err != nil || p2 != p {
		t.Fatalf("second Base = %q, %v; want cached %q", p2, err, p)
	}
	fi2, _ := os.Stat(p2)
	if !os.SameFile(fi, fi2) {
		t.Error("second Base rebuilt the image")
	}
	// A different headroom is a different image.
	if _, err := Base(context.Background(), tree, "sha256:0123abcd", cache, WithHeadroom(headroom*2)); err == nil {
		t.Error("different headroom reused the cached image (or built from a missing tree)")
	}
}

func TestBaseConcurrent(t *testing.T) {
	need(t, "mkfs.ext4")
	tree := t.TempDir()
	os.WriteFile(filepath.Join(tree, "hello"), []byte("hi"), 0o644)
	cache := t.TempDir()
	const n = 4
	paths := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = Base(context.Background(), tree, "k", cache, WithHeadroom(16<<20))
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil || paths[i] != paths[0] {
			t.Fatalf("Base %d = %q, %v", i, paths[i], errs[i])
		}
	}
	entries, _ := os.ReadDir(cache)
	var images []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".lock") {
			images = append(images, e.Name())
		}
	}
	if len(images) != 1 {
		t.Errorf("cache holds %v; want one image and no temporary files", images)
	}
}

func TestBaseErrors(t *testing.T) {
	need(t, "mkfs.ext4")
	ctx := context.Background()
	if _, err := Base(ctx, filepath.Join(t.TempDir(), "missing"), "k", t.TempDir()); err == nil {
		t.Error("missing tree accepted")
	}
	if _, err := Base(ctx, t.TempDir(), "", t.TempDir()); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("empty key: %v", err)
	}
	if _, err := Base(ctx, t.TempDir(), "k", t.TempDir(), WithHeadroom(-1)); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("negative headroom: %v", err)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	cache := t.TempDir()
	if _, err := Base(canceled, t.TempDir(), "k", cache); err == nil {
		t.Error("canceled context: build went ahead")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(cache, ".base-*")); len(leftovers) != 0 {
		t.Errorf("temporary files left: %v", leftovers)
	}
}

func TestImageSize(t *testing.T) {
	size, inodes := imageSize(treeUsage{bytes: 100 << 20, inodes: 50000}, DefaultHeadroom)
	if size < 100<<20+DefaultHeadroom || size%(1<<20) != 0 {
		t.Errorf("size = %d", size)
	}
	if inodes < 50000+DefaultHeadroom/bytesPerInode {
		t.Errorf("inodes = %d: no room for new files", inodes)
	}
}

func TestOverlay(t *testing.T) {
	need(t, "mkfs.ext4", "qemu-img")
	tree := t.TempDir()
	os.WriteFile(filepath.Join(tree, "hello"), []byte("hi"), 0o644)
	base, err := Base(context.Background(), tree, "k", t.TempDir(), WithHeadroom(16<<20))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ov := filepath.Join(dir, "disk.qcow2")
	if err := Overlay(context.Background(), base, ov); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("qemu-img", "info", "--output=json", "-U", ov).Output()
	if err != nil {
		t.Fatalf("qemu-img info: %v", err)
	}
	var info struct {
		Format          string `json:"format"`
		VirtualSize     int64  `json:"virtual-size"`
		BackingFilename string `json:"backing-filename"`
		BackingFormat   string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatal(err)
	}
	bi, _ := os.Stat(base)
	if info.Format != "qcow2" || info.BackingFilename != base || info.BackingFormat != "raw" || info.VirtualSize != bi.Size() {
		t.Errorf("overlay info = %+v; want qcow2 over raw %s of %d bytes", info, base, bi.Size())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("overlay dir holds %d entries, want only the overlay", len(entries))
	}

	// Never replace a disk that may be in use.
	if err := Overlay(context.Background(), base, ov); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Errorf("second Overlay: %v, want ErrAlreadyExists", err)
	}
	if err := Overlay(context.Background(), filepath.Join(dir, "nobase"), filepath.Join(dir, "x.qcow2")); err == nil {
		t.Error("missing base accepted")
	}
}
