package image

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berthd/berth/internal/ociimage"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: unpacking keeps file ownership")
	}
}

func newStore(t *testing.T, root string, opts ...Option) *Store {
	t.Helper()
	// Failed pulls are logged; the tests check the errors themselves.
	s, err := New(root, append([]Option{WithLogger(slog.New(slog.DiscardHandler))}, opts...)...)
	if err != nil {
		t.Fatalf("New(%s): %v", root, err)
	}
	// A dead registry should fail a test fast, not after the production backoff.
	s.retry = remote.Backoff{Duration: 10 * time.Millisecond, Factor: 1, Steps: 1}
	return s
}

func busybox(t *testing.T) v1.Image {
	t.Helper()
	if _, err := os.Stat(ociimage.BusyboxPath); err != nil {
		t.Skipf("%s missing (apt-get install -y busybox-static): %v", ociimage.BusyboxPath, err)
	}
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func digestOf(t *testing.T, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// mkImage builds an image from layers given as file lists.
func mkImage(t *testing.T, layers ...[]ociimage.File) v1.Image {
	t.Helper()
	var ls []v1.Layer
	for _, files := range layers {
		l, err := ociimage.Layer(files...)
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	img, err := ociimage.Image(v1.Config{Cmd: []string{"sh"}}, ls...)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// importImage stores img under ref through an OCI archive.
func importImage(t *testing.T, s *Store, img v1.Image, ref string) *Image {
	t.Helper()
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, ref); err != nil {
		t.Fatal(err)
	}
	imgs, err := s.Import(context.Background(), &buf, "")
	if err != nil {
		t.Fatalf("Import(%s): %v", ref, err)
	}
	if len(imgs) != 1 {
		t.Fatalf("Import(%s) stored %d images, want 1", ref, len(imgs))
	}
	return imgs[0]
}

// snapshot lists every path under dir with its type and size, so a test can
// prove an operation left nothing behind.
func snapshot(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		size := fi.Size()
		if d.IsDir() {
			size = 0 // directory sizes change as entries come and go
		}
		out = append(out, rel+" "+fi.Mode().String()+" "+strconv.FormatInt(size, 10))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func pushIndex(ref string, idx v1.ImageIndex) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return err
	}
	return remote.WriteIndex(r, idx)
}

// insecure lets a store pull from the given loopback test registries over
// plain HTTP, as images.insecure_registries does.
func insecure(hosts ...string) Option {
	return WithRegistries(Registries{Allowed: []string{"*"}, Insecure: hosts})
}
