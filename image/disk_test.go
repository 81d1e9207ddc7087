package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/berthd/berth/errdefs"
)

// newQcow2 makes a 1 MiB qcow2 disk with qemu-img create ARGS.
func newQcow2(t *testing.T, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img is not installed; `make test` installs qemu-utils")
	}
	path := filepath.Join(t.TempDir(), "d.qcow2")
	cmd := append([]string{"create", "-q", "-f", "qcow2"}, args...)
	cmd = append(cmd, path, "1M")
	if out, err := exec.Command("qemu-img", cmd...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v %s", cmd, err, out)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestDiskImages(t *testing.T) {
	s, err := New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	disk := newQcow2(t)
	if !IsDiskImage(disk) {
		t.Fatal("a qcow2 file is not recognized")
	}
	img, err := s.ImportDisk(ctx, bytes.NewReader(disk), "vms/appliance:1")
	if err != nil {
		t.Fatal(err)
	}
	if img.Kind != KindDisk || img.Ref != "docker.io/vms/appliance:1" || img.Size != int64(len(disk)) || !strings.HasPrefix(img.Digest, "sha256:") {
		t.Errorf("imported %+v", img)
	}
	path, err := s.DiskPath(img)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o400 {
		t.Errorf("stored disk %s: %v %v", path, fi, err)
	}
	if got, err := s.Get("vms/appliance:1"); err != nil || got.Kind != KindDisk {
		t.Errorf("Get: %+v %v", got, err)
	}
	if _, err := s.Rootfs(ctx, img); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("Rootfs of a disk: %v", err)
	}

	// Refused: no ref, not qcow2, a backing file (it would read the host's
	// files), and nothing of them is kept.
	backing := filepath.Join(t.TempDir(), "host-secret.raw")
	os.WriteFile(backing, make([]byte, 1<<20), 0o600)
	for name, tc := range map[string]struct {
		data []byte
		ref  string
	}{
		"no ref":       {disk, ""},
		"not qcow2":    {[]byte("QFI\xfbgarbage that is not a disk"), "x/y:1"},
		"backing file": {newQcow2(t, "-F", "raw", "-b", backing), "x/y:2"},
	} {
		if _, err := s.ImportDisk(ctx, bytes.NewReader(tc.data), tc.ref); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("%s: %v, want invalid argument", name, err)
		}
	}
	if n := len(s.List()); n != 1 {
		t.Errorf("%d images after refused imports, want 1", n)
	}
	entries, _ := os.ReadDir(s.diskDir())
	if len(entries) != 1 {
		t.Errorf("%d files in disks/, want 1", len(entries))
	}

	// Removing the ref removes the disk.
	if err := s.Remove("vms/appliance:1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("disk still stored after remove: %v", err)
	}
}
