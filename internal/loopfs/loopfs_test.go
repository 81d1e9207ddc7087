package loopfs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

func requireLoop(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("loop devices need root")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 not installed (e2fsprogs)")
	}
}

// loopsOf lists the loop devices whose backing file is img, once they
// have had up to five seconds to go: an autoclear device is released when
// its last opener closes it, and a short-lived opener elsewhere on the node
// (a blkid, another test's scan of /dev) may hold it a moment past the
// unmount. A device still attached after that is a leak.
func loopsOf(t *testing.T, img string) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
		var out []string
		for _, p := range paths {
			b, err := os.ReadFile(p)
			if err == nil && strings.TrimSpace(string(b)) == img {
				out = append(out, p)
			}
		}
		if len(out) == 0 || time.Now().After(deadline) {
			return out
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// makers are the two ways to make a filesystem: mkfs for each, or a copy
// of a template made once.
func makers(t *testing.T) map[string]func(img string, size int64, uid, gid int) error {
	tpl, err := NewTemplates(filepath.Join(t.TempDir(), "templates"))
	if err != nil {
		t.Fatal(err)
	}
	return map[string]func(string, int64, int, int) error{"mkfs": Create, "template": tpl.Create}
}

func TestFullFilesystemIsENOSPCAndFreesItsDevice(t *testing.T) {
	requireLoop(t)
	for name, create := range makers(t) {
		t.Run(name, func(t *testing.T) {
			// Twice: the second copy of a template is like the first.
			fullFilesystem(t, create)
			fullFilesystem(t, create)
		})
	}
}

func fullFilesystem(t *testing.T, create func(string, int64, int, int) error) {
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	const size = 8 << 20
	if err := create(img, size, 1234, 5678); err != nil {
		t.Fatal(err)
	}
	if err := Mount(img, mnt, unix.MS_NOSUID|unix.MS_NODEV); err != nil {
		t.Fatal(err)
	}
	mounted := true
	t.Cleanup(func() {
		if mounted {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Fatal(err)
	}
	if st.Uid != 1234 || st.Gid != 5678 {
		t.Errorf("root directory owned by %d:%d, want 1234:5678", st.Uid, st.Gid)
	}
	f, err := os.Create(filepath.Join(mnt, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte{'x'}, 1<<20)
	var werr error
	written := 0
	for written < 4*size && werr == nil {
		var n int
		n, werr = f.Write(chunk)
		written += n
	}
	if werr == nil {
		werr = f.Sync()
	}
	f.Close()
	if !errors.Is(werr, unix.ENOSPC) {
		t.Fatalf("writing %d bytes into an %d byte filesystem: %v, want ENOSPC", written, size, werr)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	mounted = false
	var ist unix.Stat_t
	if err := unix.Stat(img, &ist); err != nil {
		t.Fatal(err)
	}
	if used := ist.Blocks * 512; used > size {
		t.Errorf("the image takes %d bytes on the host, more than its size %d", used, size)
	}
	if l := loopsOf(t, img); len(l) != 0 {
		t.Errorf("loop devices still attached after the unmount: %v", l)
	}
}

func TestFailedMountLeavesNoDevice(t *testing.T) {
	requireLoop(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := Create(img, MinBytes, 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := Mount(img, filepath.Join(dir, "missing"), 0); err == nil {
		t.Fatal("mount on a missing directory succeeded")
	}
	if l := loopsOf(t, img); len(l) != 0 {
		t.Errorf("loop devices left attached after a failed mount: %v", l)
	}
}

func TestCreateRefusesTooSmallAndExisting(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := Create(img, MinBytes-1, 0, 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("too small: %v, want invalid argument", err)
	}
	if _, err := os.Stat(img); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused create left %s", img)
	}
	if err := os.WriteFile(img, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Create(img, MinBytes, 0, 0); err == nil {
		t.Error("create over an existing file succeeded")
	}
	if b, _ := os.ReadFile(img); string(b) != "data" {
		t.Errorf("create changed an existing file: %q", b)
	}
}

// A copy of a template is sparse (only the metadata takes space), and the
// template is made once per size and owner.
func TestTemplateCopiesAreSparseAndTemplatesReused(t *testing.T) {
	requireLoop(t)
	dir := t.TempDir()
	tpl, err := NewTemplates(filepath.Join(dir, "templates"))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		img := filepath.Join(dir, "fs"+string(rune('a'+i))+".img")
		if err := tpl.Create(img, 1<<30, 0, 0); err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Stat(img, &st); err != nil {
			t.Fatal(err)
		}
		if st.Size != 1<<30 || st.Blocks*512 > 8<<20 {
			t.Errorf("copy %d: %d bytes taking %d on disk; want 1 GiB taking under 8 MiB", i, st.Size, st.Blocks*512)
		}
	}
	tpls, _ := filepath.Glob(filepath.Join(dir, "templates", "*"))
	if len(tpls) != 1 {
		t.Errorf("templates after three copies of one size: %v, want one", tpls)
	}
	if err := tpl.Create(filepath.Join(dir, "small.img"), MinBytes-1, 0, 0); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("too small from a template: %v, want invalid argument", err)
	}
}
