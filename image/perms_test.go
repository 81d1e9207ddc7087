package image

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func checkPerm(t *testing.T, path string, perm os.FileMode, gid int) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Error(err)
		return
	}
	if fi.Mode().Perm() != perm {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), perm)
	}
	if st := fi.Sys().(*syscall.Stat_t); gid >= 0 && int(st.Gid) != gid {
		t.Errorf("%s: group %d, want %d", path, st.Gid, gid)
	}
}

// TestStoreIsPrivate: image trees, blobs and in-flight writes are root's
// alone; with a disk group, that group may search the root and disks/ and
// read disk files, and nothing else. A store an older berth made (0711
// root and rootfs/, disks readable by all) is tightened on open.
func TestStoreIsPrivate(t *testing.T) {
	requireRoot(t)
	t.Run("root only", func(t *testing.T) {
		root := t.TempDir()
		s := newStore(t, root)
		img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")
		for _, d := range []string{root, filepath.Join(root, "blobs"), s.blobDir(), s.rootfsDir(), s.tmpDir(), s.diskDir()} {
			checkPerm(t, d, 0o700, -1)
		}
		// The tree itself keeps the image's modes: the workload needs them.
		dir, err := s.Rootfs(context.Background(), img)
		if err != nil {
			t.Fatal(err)
		}
		checkPerm(t, dir, 0o755, -1)
	})

	t.Run("disk group", func(t *testing.T) {
		const gid = 64123
		root := t.TempDir()
		s := newStore(t, root, WithDiskGroup("64123"))
		disk, err := s.ImportDisk(context.Background(), bytes.NewReader(newQcow2(t)), "vms/a:1")
		if err != nil {
			t.Fatal(err)
		}
		path, _ := s.DiskPath(disk)
		checkPerm(t, root, 0o710, gid)
		checkPerm(t, s.diskDir(), 0o710, gid)
		checkPerm(t, path, 0o440, gid)
		for _, d := range []string{s.blobDir(), s.rootfsDir(), s.tmpDir()} {
			checkPerm(t, d, 0o700, -1)
		}
	})

	t.Run("an older store is tightened", func(t *testing.T) {
		root := t.TempDir()
		for _, d := range []string{"blobs/sha256", "rootfs/abc", "disks", "tmp"} {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for _, d := range []string{".", "rootfs", "disks"} {
			os.Chmod(filepath.Join(root, d), 0o711)
		}
		disk := filepath.Join(root, "disks", "0123")
		if err := os.WriteFile(disk, []byte("disk"), 0o444); err != nil {
			t.Fatal(err)
		}
		s := newStore(t, root, WithInUse(func(string) bool { return true }))
		for _, d := range []string{root, s.rootfsDir(), s.diskDir()} {
			checkPerm(t, d, 0o700, -1)
		}
		checkPerm(t, disk, 0o400, -1)
	})

	t.Run("a missing group", func(t *testing.T) {
		root := t.TempDir()
		newStore(t, root, WithDiskGroup("berth-no-such-group"))
		checkPerm(t, root, 0o700, -1)
	})
}
