package image

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
)

func TestRootfsBusybox(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")
	dir, err := s.Rootfs(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(s.Root(), "rootfs", mustHex(t, img.Digest)); dir != want {
		t.Errorf("Rootfs = %s, want %s", dir, want)
	}
	checkMode(t, dir, ".", os.ModeDir|0o755, 0, 0)
	checkMode(t, dir, "bin/busybox", 0o755, 0, 0)
	checkMode(t, dir, "tmp", os.ModeDir|os.ModeSticky|0o777, 0, 0)
	checkMode(t, dir, "root", os.ModeDir|0o700, 0, 0)
	checkMode(t, dir, "etc/passwd", 0o644, 0, 0)
	for _, applet := range []string{"bin/sh", "usr/bin/wget", "sbin/ifconfig"} {
		if target, err := os.Readlink(filepath.Join(dir, applet)); err != nil || target != "/bin/busybox" {
			t.Errorf("%s -> %q, %v; want a symlink to /bin/busybox", applet, target, err)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, "bin", "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	if !fi.ModTime().Equal(ociimage.Epoch) {
		t.Errorf("bin/busybox mtime = %v, want the layer's %v", fi.ModTime(), ociimage.Epoch)
	}
	// The unpacked binary is the host's, byte for byte.
	host, _ := os.ReadFile(ociimage.BusyboxPath)
	got, _ := os.ReadFile(filepath.Join(dir, "bin", "busybox"))
	if string(host) != string(got) {
		t.Error("bin/busybox differs from the host's busybox")
	}
}

func TestRootfsKeepsMetadata(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, mkImage(t,
		[]ociimage.File{
			{Name: "srv", Type: tar.TypeDir, Mode: 0o2775, UID: 33, GID: 33},
			{Name: "srv/suid", Mode: 0o4755, UID: 1000, GID: 2000, Body: "#!/bin/sh\n"},
			{Name: "srv/data", Mode: 0o640, UID: 1000, GID: 2000, Body: "shared"},
			{Name: "srv/link", Type: tar.TypeSymlink, Linkname: "data", UID: 7, GID: 8},
			{Name: "dev/null", Type: tar.TypeChar},
			{Name: "fifo", Type: tar.TypeFifo},
		},
		[]ociimage.File{
			// A hardlink in an upper layer to a file of a lower one.
			{Name: "srv/hard", Type: tar.TypeLink, Linkname: "srv/data"},
		},
	), "berth.local/test/meta:1")
	dir, err := s.Rootfs(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	checkMode(t, dir, "srv", os.ModeDir|os.ModeSetgid|0o775, 33, 33)
	checkMode(t, dir, "srv/suid", os.ModeSetuid|0o755, 1000, 2000)
	checkMode(t, dir, "srv/data", 0o640, 1000, 2000)
	checkMode(t, dir, "srv/link", os.ModeSymlink|0o777, 7, 8)
	data, _ := os.Stat(filepath.Join(dir, "srv/data"))
	hard, err := os.Stat(filepath.Join(dir, "srv/hard"))
	if err != nil || !os.SameFile(data, hard) {
		t.Errorf("srv/hard is not a hardlink of srv/data: %v", err)
	}
	for _, skipped := range []string{"dev/null", "fifo"} {
		if _, err := os.Lstat(filepath.Join(dir, skipped)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s was created (%v); device nodes and fifos are skipped", skipped, err)
		}
	}
}

func TestRootfsWhiteouts(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, mkImage(t,
		[]ociimage.File{
			{Name: "etc/keep", Body: "kept"},
			{Name: "etc/gone", Body: "deleted by the upper layer"},
			{Name: "data/old1", Body: "hidden by the opaque dir"},
			{Name: "data/sub/old2", Body: "hidden by the opaque dir"},
			{Name: "tree/a/b", Body: "the whole tree goes"},
		},
		[]ociimage.File{
			{Name: "etc/.wh.gone", Body: ""},
			{Name: "data", Type: tar.TypeDir, Mode: 0o755},
			{Name: "data/.wh..wh..opq", Body: ""},
			{Name: "data/new", Body: "upper"},
			{Name: ".wh.tree", Body: ""},
			{Name: "etc/keep2", Body: "added"},
		},
	), "berth.local/test/whiteout:1")
	dir, err := s.Rootfs(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]bool{
		"etc/keep":          true,
		"etc/keep2":         true,
		"etc/gone":          false,
		"etc/.wh.gone":      false,
		"data/new":          true,
		"data/old1":         false,
		"data/sub":          false,
		"data/.wh..wh..opq": false,
		"tree":              false,
		".wh.tree":          false,
	} {
		if _, err := os.Lstat(filepath.Join(dir, path)); (err == nil) != want {
			t.Errorf("%s: exists=%v, want %v", path, err == nil, want)
		}
	}
}

func TestRootfsUnpacksOnce(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")
	ctx := context.Background()

	first, err := s.Rootfs(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(filepath.Join(first, "bin", "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	// A re-extraction would replace the tree and lose this file.
	marker := filepath.Join(first, "marker")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	again, err := s.Get("berth.local/test/busybox:1")
	if err != nil {
		t.Fatal(err)
	}
	second, err := s.Rootfs(ctx, again)
	if err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(filepath.Join(second, "bin", "busybox"))
	if err != nil {
		t.Fatal(err)
	}
	if second != first || !os.SameFile(before, after) {
		t.Error("second Rootfs call produced a new tree")
	}
	if _, err := os.Stat(marker); err != nil {
		t.Errorf("marker gone after second call: %v", err)
	}
	if n := s.unpacks.Load(); n != 1 {
		t.Errorf("unpacked %d times, want 1", n)
	}
	// A restarted store finds the tree too.
	s2 := newStore(t, s.Root())
	if dir, err := s2.Rootfs(ctx, again); err != nil || dir != first || s2.unpacks.Load() != 0 {
		t.Errorf("after restart Rootfs = %s, %v with %d unpacks; want the existing tree", dir, err, s2.unpacks.Load())
	}
}

func TestRootfsConcurrentCallsUnpackOnce(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")

	const callers = 20
	dirs := make([]string, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range callers {
		wg.Go(func() {
			<-start
			dirs[i], errs[i] = s.Rootfs(context.Background(), img)
		})
	}
	close(start)
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || dirs[i] != dirs[0] {
			t.Errorf("caller %d: %s, %v; want %s", i, dirs[i], errs[i], dirs[0])
		}
	}
	if n := s.unpacks.Load(); n != 1 {
		t.Errorf("%d concurrent callers unpacked %d times, want 1", callers, n)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.Root(), "tmp")); len(entries) != 0 {
		t.Errorf("tmp/ holds %d leftovers", len(entries))
	}
}

// TestRootfsFailuresLeaveNothing unpacks an image whose tree is gone (an
// image stored by an older berth, which unpacked at first use).
func TestRootfsFailuresLeaveNothing(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")
	if err := os.RemoveAll(filepath.Join(s.Root(), "rootfs", mustHex(t, img.Digest))); err != nil {
		t.Fatal(err)
	}

	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := s.Rootfs(ctx, img); !errors.Is(err, context.Canceled) {
			t.Fatalf("Rootfs(cancelled) = %v, want context.Canceled", err)
		}
		assertNoRootfs(t, s, img)
	})

	t.Run("unknown image", func(t *testing.T) {
		ghost := *img
		ghost.Digest = "sha256:" + "ab" + img.Digest[9:]
		if _, err := s.Rootfs(context.Background(), &ghost); !errors.Is(err, errdefs.ErrNotFound) {
			t.Fatalf("Rootfs(unknown) = %v, want ErrNotFound", err)
		}
	})

	t.Run("corrupt layer on disk", func(t *testing.T) {
		mf := readManifest(t, s, img)
		layer := filepath.Join(s.Root(), "blobs", "sha256", mf.Layers[0].Digest.Hex)
		data, err := os.ReadFile(layer)
		if err != nil {
			t.Fatal(err)
		}
		data[len(data)/2] ^= 0xff
		if err := os.WriteFile(layer, data, 0o444); err != nil {
			t.Fatal(err)
		}
		_, err = s.Rootfs(context.Background(), img)
		if err == nil {
			t.Fatal("Rootfs unpacked a corrupt layer")
		}
		t.Log(err)
		assertNoRootfs(t, s, img)
	})
}

func assertNoRootfs(t *testing.T, s *Store, img *Image) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(s.Root(), "rootfs", mustHex(t, img.Digest))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a failed unpack left a rootfs: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.Root(), "tmp")); len(entries) != 0 {
		t.Errorf("a failed unpack left %d entries in tmp/", len(entries))
	}
}

func readManifest(t *testing.T, s *Store, img *Image) *v1.Manifest {
	t.Helper()
	h, err := v1.NewHash(img.Digest)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := s.image(h)
	if err != nil {
		t.Fatal(err)
	}
	mf, err := stored.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return mf
}

func checkMode(t *testing.T, dir, name string, mode os.FileMode, uid, gid uint32) {
	t.Helper()
	fi, err := os.Lstat(filepath.Join(dir, name))
	if err != nil {
		t.Error(err)
		return
	}
	if fi.Mode() != mode {
		t.Errorf("%s: mode %v, want %v", name, fi.Mode(), mode)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != uid || st.Gid != gid {
		t.Errorf("%s: owner %d:%d, want %d:%d", name, st.Uid, st.Gid, uid, gid)
	}
}
