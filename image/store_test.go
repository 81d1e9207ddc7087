package image

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

func TestPullGetReload(t *testing.T) {
	requireRoot(t)
	img := busybox(t)
	want := digestOf(t, img)
	root := t.TempDir()
	var ref string

	// The registry lives only for this subtest: everything after it proves
	// the store works without the network.
	t.Run("pull", func(t *testing.T) {
		host := testimage.StartRegistry(t)
		var err error
		if ref, err = testimage.Push(context.Background(), host, "test/busybox", img); err != nil {
			t.Fatal(err)
		}
		s := newStore(t, root, insecure(host))
		got, err := s.Pull(context.Background(), host+"/test/busybox") // tag defaults to latest
		if err != nil {
			t.Fatal(err)
		}
		if got.Ref != ref || got.Digest != want {
			t.Fatalf("Pull = %s %s, want %s %s", got.Ref, got.Digest, ref, want)
		}
		if got.Size <= 0 || got.CreatedAt.IsZero() {
			t.Errorf("Pull = %+v, want a size and a creation time", got)
		}
		if len(got.Config.Cmd) != 1 || got.Config.Cmd[0] != "sh" || len(got.Config.Env) != 1 {
			t.Errorf("Config = %+v, want the busybox image's Cmd and Env", got.Config)
		}
		// Every blob is on disk, as the layout promises.
		mf, err := img.Manifest()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range append([]v1.Hash{mf.Config.Digest}, mf.Layers[0].Digest) {
			if _, err := os.Stat(filepath.Join(root, "blobs", "sha256", d.Hex)); err != nil {
				t.Errorf("blob %s not stored: %v", d, err)
			}
		}

		// Pulling again keeps the image as it was.
		again, err := s.Pull(context.Background(), ref)
		if err != nil {
			t.Fatal(err)
		}
		if !again.CreatedAt.Equal(got.CreatedAt) {
			t.Errorf("re-pull changed CreatedAt from %v to %v", got.CreatedAt, again.CreatedAt)
		}
	})
	if t.Failed() {
		return
	}

	s := newStore(t, root) // a restarted agent
	for _, q := range []string{ref, ref[:len(ref)-len(":latest")], want, ref[:len(ref)-len(":latest")] + "@" + want} {
		got, err := s.Get(q)
		if err != nil {
			t.Errorf("Get(%q) after reload: %v", q, err)
			continue
		}
		if got.Ref != ref || got.Digest != want {
			t.Errorf("Get(%q) = %s %s", q, got.Ref, got.Digest)
		}
	}
	if l := s.List(); len(l) != 1 || l[0].Ref != ref {
		t.Errorf("List after reload = %+v", l)
	}
	got, _ := s.Get(ref)
	dir, err := s.Rootfs(context.Background(), got)
	if err != nil {
		t.Fatalf("Rootfs without the registry: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "bin", "busybox")); err != nil {
		t.Error(err)
	}
	if _, err := s.Get("docker.io/library/busybox:latest"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get(unknown) = %v, want ErrNotFound", err)
	}
}

func TestPullErrors(t *testing.T) {
	img := busybox(t)
	host := testimage.StartRegistry(t)
	if _, err := testimage.Push(context.Background(), host, "test/busybox", img); err != nil {
		t.Fatal(err)
	}
	// A loopback port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()

	s := newStore(t, t.TempDir(), insecure(host, dead))
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		ref  string
		want error
	}{
		{"unknown repository", context.Background(), host + "/test/nothing:latest", errdefs.ErrNotFound},
		{"unknown tag", context.Background(), host + "/test/busybox:nope", errdefs.ErrNotFound},
		{"unreachable registry", context.Background(), dead + "/test/busybox:latest", errdefs.ErrUnavailable},
		{"invalid reference", context.Background(), "Not A Ref", errdefs.ErrInvalidArgument},
		{"empty reference", context.Background(), "", errdefs.ErrInvalidArgument},
		{"cancelled", cancelled, host + "/test/busybox:latest", context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Pull(tc.ctx, tc.ref)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Pull(%q) = %v, want %v", tc.ref, err, tc.want)
			}
			t.Log(err)
		})
	}
	if l := s.List(); len(l) != 0 {
		t.Errorf("failed pulls stored %+v", l)
	}
}

func TestPullIndexPicksPlatform(t *testing.T) {
	img := busybox(t)
	other := "arm64"
	if runtime.GOARCH == "arm64" {
		other = "amd64"
	}
	foreign, err := mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: other})
	if err != nil {
		t.Fatal(err)
	}
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: foreign, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: other}}},
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}},
	)
	foreignOnly := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: foreign, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: other}}},
	)
	host := testimage.StartRegistry(t)
	if err := pushIndex(host+"/test/multi:latest", idx); err != nil {
		t.Fatal(err)
	}
	if err := pushIndex(host+"/test/foreign:latest", foreignOnly); err != nil {
		t.Fatal(err)
	}

	s := newStore(t, t.TempDir(), insecure(host))
	got, err := s.Pull(context.Background(), host+"/test/multi")
	if err != nil {
		t.Fatal(err)
	}
	if want := digestOf(t, img); got.Digest != want {
		t.Errorf("pulled %s, want the linux/%s manifest %s", got.Digest, runtime.GOARCH, want)
	}
	if _, err := s.Pull(context.Background(), host+"/test/foreign"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Pull(index without linux/%s) = %v, want ErrNotFound", runtime.GOARCH, err)
	}
}

func TestRemoveCollectsUnusedContent(t *testing.T) {
	requireRoot(t)
	base := busybox(t)
	extraLayer, err := ociimage.Layer(ociimage.File{Name: "extra", Body: "only in the derived image"})
	if err != nil {
		t.Fatal(err)
	}
	derived, err := mutate.AppendLayers(base, extraLayer)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	s := newStore(t, root)
	a := importImage(t, s, base, "berth.local/test/base:1")
	b := importImage(t, s, derived, "berth.local/test/derived:1")
	importImage(t, s, derived, "berth.local/test/derived:alias")
	for _, img := range []*Image{a, b} {
		if _, err := s.Rootfs(context.Background(), img); err != nil {
			t.Fatal(err)
		}
	}
	blobPath := func(h v1.Hash) string { return filepath.Join(root, "blobs", "sha256", h.Hex) }
	baseLayers, _ := base.Layers()
	shared, _ := baseLayers[0].Digest()
	extra, _ := extraLayer.Digest()
	derivedDigest, _ := v1.NewHash(b.Digest)

	// Removing one of two refs of an image frees nothing.
	if err := s.Remove("berth.local/test/derived:alias"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "rootfs", derivedDigest.Hex)); err != nil {
		t.Fatalf("rootfs of a still-tagged image was removed: %v", err)
	}

	if err := s.Remove("berth.local/test/derived:1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("berth.local/test/derived:1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Get after Remove = %v, want ErrNotFound", err)
	}
	for path, wantExists := range map[string]bool{
		blobPath(extra):         false, // only the derived image used it
		blobPath(derivedDigest): false,
		filepath.Join(root, "rootfs", derivedDigest.Hex): false,
		blobPath(shared): true, // the base image still needs it
		filepath.Join(root, "rootfs", mustHex(t, a.Digest)): true,
	} {
		if _, err := os.Stat(path); (err == nil) != wantExists {
			t.Errorf("%s: exists=%v, want %v", path, err == nil, wantExists)
		}
	}
	if err := s.Remove("berth.local/test/derived:1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("second Remove = %v, want ErrNotFound", err)
	}

	// By digest: every ref of the image goes, then all its content.
	importImage(t, s, base, "berth.local/test/base:2")
	if err := s.Remove(a.Digest); err != nil {
		t.Fatal(err)
	}
	if l := s.List(); len(l) != 0 {
		t.Errorf("List after removing by digest = %+v", l)
	}
	for _, dir := range []string{"blobs/sha256", "rootfs", "tmp"} {
		entries, err := os.ReadDir(filepath.Join(root, dir))
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 0 {
			t.Errorf("%s still holds %d entries after every image was removed", dir, len(entries))
		}
	}
	// The removal survives a restart.
	if l := newStore(t, root).List(); len(l) != 0 {
		t.Errorf("List after restart = %+v", l)
	}
}

func TestNewCleansCrashLeftovers(t *testing.T) {
	requireRoot(t)
	root := t.TempDir()
	s := newStore(t, root)
	img := importImage(t, s, busybox(t), "berth.local/test/busybox:1")

	// What a crash mid-operation leaves: a half-written blob, a half-done
	// unpack, a blob and a rootfs nothing references, a temp index (as
	// fileutil.WriteFile names it, and as agents before it did).
	orphan := "0000000000000000000000000000000000000000000000000000000000000000"
	for _, p := range []string{"tmp/blob-123", "tmp/unpack-abc/bin/sh", "blobs/sha256/" + orphan, "rootfs/" + orphan + "/etc/passwd", ".refs.json.tmp41", "refs.json.tmp42"} {
		if err := os.MkdirAll(filepath.Join(root, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, p), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	s = newStore(t, root)
	for _, p := range []string{"tmp/blob-123", "tmp/unpack-abc", "blobs/sha256/" + orphan, "rootfs/" + orphan, ".refs.json.tmp41", "refs.json.tmp42"} {
		if _, err := os.Lstat(filepath.Join(root, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s survived New: %v", p, err)
		}
	}
	if _, err := s.Rootfs(context.Background(), img); err != nil {
		t.Errorf("the stored image broke: %v", err)
	}
}

func TestCorruptIndexIsNotDiscarded(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "refs.json"), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(root); err == nil {
		t.Fatal("New accepted a corrupt index; it would garbage-collect every image")
	}
}

func mustHex(t *testing.T, digest string) string {
	t.Helper()
	h, err := v1.NewHash(digest)
	if err != nil {
		t.Fatal(err)
	}
	return h.Hex
}

func TestRetagCollectsOldContent(t *testing.T) {
	requireRoot(t)
	s := newStore(t, t.TempDir())
	old := importImage(t, s, mkImage(t, []ociimage.File{{Name: "v", Body: "1"}}), "berth.local/app:latest")
	if _, err := s.Rootfs(context.Background(), old); err != nil {
		t.Fatal(err)
	}
	cur := importImage(t, s, mkImage(t, []ociimage.File{{Name: "v", Body: "2"}}), "berth.local/app:latest")
	if cur.Digest == old.Digest {
		t.Fatal("test images must differ")
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "rootfs", mustHex(t, old.Digest))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the rootfs of the image the tag left is still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "blobs", "sha256", mustHex(t, old.Digest))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the manifest of the image the tag left is still there: %v", err)
	}
}

func TestInUseKeepsContent(t *testing.T) {
	requireRoot(t)
	var mu sync.Mutex
	used := map[string]bool{}
	inUse := func(d string) bool { mu.Lock(); defer mu.Unlock(); return used[d] }
	setUsed := func(d string, v bool) { mu.Lock(); defer mu.Unlock(); used[d] = v }

	root := t.TempDir()
	s, err := New(root, WithInUse(inUse))
	if err != nil {
		t.Fatal(err)
	}
	v1img := mkImage(t, []ociimage.File{{Name: "v", Body: "1"}})
	old := importImage(t, s, v1img, "berth.local/app:latest")
	dir, err := s.Rootfs(context.Background(), old)
	if err != nil {
		t.Fatal(err)
	}
	setUsed(old.Digest, true) // a workload runs from it

	importImage(t, s, v1img, "berth.local/app:alias")
	if err := s.Remove("berth.local/app:alias"); err != nil {
		t.Errorf("removing one of two refs of a used image: %v", err)
	}
	if err := s.Remove("berth.local/app:latest"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Errorf("Remove(last ref of a used image) = %v, want ErrFailedPrecondition", err)
	}

	// The tag moves on; the workload's image stays, across a restart too.
	importImage(t, s, mkImage(t, []ociimage.File{{Name: "v", Body: "2"}}), "berth.local/app:latest")
	s, err = New(root, WithInUse(inUse))
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s.Rootfs(context.Background(), old); err != nil || got != dir {
		t.Fatalf("Rootfs(untagged image in use) = %s, %v; want %s", got, err, dir)
	}

	setUsed(old.Digest, false) // the workload is gone
	if err := s.Prune(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Prune kept the rootfs of an unused untagged image: %v", err)
	}
	if _, err := s.Rootfs(context.Background(), old); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("Rootfs(pruned image) = %v, want ErrNotFound", err)
	}
	if _, err := s.Get("berth.local/app:latest"); err != nil {
		t.Errorf("Prune removed a tagged image: %v", err)
	}
}
