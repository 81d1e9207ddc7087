package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
)

// sentinel is a directory outside every extraction target; no test entry
// may change it.
func sentinel(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "secret"), []byte("host data"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir
}

func checkSentinel(t *testing.T, dir string, before []string) {
	t.Helper()
	if after := snapshot(t, dir); strings.Join(after, "\n") != strings.Join(before, "\n") {
		t.Errorf("the sentinel directory changed:\nbefore %q\nafter  %q", before, after)
	}
	fi, err := os.Stat(filepath.Join(dir, "secret"))
	if err != nil {
		t.Fatal(err)
	}
	if n := fi.Sys().(*syscall.Stat_t).Nlink; n != 1 {
		t.Errorf("the sentinel file gained a hardlink (%d links)", n)
	}
}

// hostileCases are layers that try to write outside the rootfs. outcome
// "error" means the unpack must fail with ErrInvalidArgument; "skip" means it
// may succeed as long as nothing escapes.
func hostileCases(sentinel string) []struct {
	name  string
	files []ociimage.File
} {
	climb := strings.Repeat("../", 16) + strings.TrimPrefix(sentinel, "/")
	return []struct {
		name  string
		files []ociimage.File
	}{
		{"dotdot name", []ociimage.File{{Name: "../escape", Body: "x"}}},
		{"dotdot inside name", []ociimage.File{{Name: "a/../../escape", Body: "x"}}},
		{"deep dotdot name", []ociimage.File{{Name: climb + "/escape", Body: "x"}}},
		{"absolute name", []ociimage.File{{Name: sentinel + "/abs", Body: "x"}}},
		{"file through absolute symlink", []ociimage.File{
			{Name: "evil", Type: tar.TypeSymlink, Linkname: sentinel},
			{Name: "evil/pwned", Body: "x"},
		}},
		{"file through climbing symlink", []ociimage.File{
			{Name: "rel", Type: tar.TypeSymlink, Linkname: climb},
			{Name: "rel/pwned", Body: "x"},
		}},
		{"dir through symlink", []ociimage.File{
			{Name: "evil", Type: tar.TypeSymlink, Linkname: sentinel},
			{Name: "evil/newdir", Type: tar.TypeDir, Mode: 0o755},
		}},
		{"hardlink to climbing name", []ociimage.File{{Name: "h", Type: tar.TypeLink, Linkname: climb + "/secret"}}},
		{"hardlink to absolute name", []ociimage.File{{Name: "h", Type: tar.TypeLink, Linkname: sentinel + "/secret"}}},
		{"hardlink through symlink", []ociimage.File{
			{Name: "lnk", Type: tar.TypeSymlink, Linkname: sentinel},
			{Name: "h", Type: tar.TypeLink, Linkname: "lnk/secret"},
		}},
		{"symlink replaced by file write", []ociimage.File{
			{Name: "etc", Type: tar.TypeSymlink, Linkname: sentinel},
			{Name: "etc/secret", Body: "overwritten"},
		}},
	}
}

// TestExtractTarRefusesEscapes feeds hostile tar streams straight to the
// extractor, without go-containerregistry's own filtering in front.
func TestExtractTarRefusesEscapes(t *testing.T) {
	requireRoot(t)
	sent := sentinel(t)
	before := snapshot(t, sent)
	for _, tc := range hostileCases(sent) {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			target := filepath.Join(parent, "rootfs")
			if err := os.Mkdir(target, 0o755); err != nil {
				t.Fatal(err)
			}
			err := extractTar(context.Background(), rawTar(t, tc.files), target, nil)
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("extract = %v, want ErrInvalidArgument", err)
			} else {
				t.Log(err)
			}
			checkSentinel(t, sent, before)
			if entries, _ := os.ReadDir(parent); len(entries) != 1 {
				t.Errorf("something was written next to the target: %v", entries)
			}
		})
	}
}

// TestRootfsRefusesEscapes runs the same layers through a whole image,
// which an import unpacks: the import fails and stores nothing, or the
// entry is dropped, and nothing outside the store changes.
func TestRootfsRefusesEscapes(t *testing.T) {
	requireRoot(t)
	sent := sentinel(t)
	before := snapshot(t, sent)
	for _, tc := range hostileCases(sent) {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, filepath.Join(t.TempDir(), "store"))
			storeBefore := snapshot(t, s.Root())
			var buf bytes.Buffer
			if err := ociimage.WriteOCIArchive(&buf, mkImage(t, tc.files), "berth.local/test/hostile:1"); err != nil {
				t.Fatal(err)
			}
			imgs, err := s.Import(context.Background(), &buf, "")
			switch {
			case err != nil && !errors.Is(err, errdefs.ErrInvalidArgument):
				t.Errorf("Import = %v, want success or ErrInvalidArgument", err)
			case err != nil:
				t.Log("refused:", err)
				if after := snapshot(t, s.Root()); strings.Join(after, "\n") != strings.Join(storeBefore, "\n") {
					t.Errorf("a refused import changed the store:\nbefore %q\nafter  %q", storeBefore, after)
				}
				if l := s.List(); len(l) != 0 {
					t.Errorf("a refused import stored %+v", l)
				}
			default:
				// go-containerregistry's flattening dropped the entry (a file
				// under a symlink an upper entry made, a relative link that
				// climbs out); the sentinel check below proves nothing escaped.
				dir, err := s.Rootfs(context.Background(), imgs[0])
				t.Log("entry dropped; unpacked to", dir, err)
			}
			checkSentinel(t, sent, before)
			if entries, _ := os.ReadDir(filepath.Dir(s.Root())); len(entries) != 1 {
				t.Errorf("something was written next to the store: %v", entries)
			}
			if entries, _ := os.ReadDir(filepath.Join(s.Root(), "tmp")); len(entries) != 0 {
				t.Errorf("tmp/ holds leftovers: %v", entries)
			}
		})
	}
}

func TestExtractTarXattrs(t *testing.T) {
	requireRoot(t)
	target := t.TempDir()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	body := "data"
	if err := tw.WriteHeader(&tar.Header{
		Name: "f", Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body)),
		PAXRecords: map[string]string{"SCHILY.xattr.user.berth": "kept"},
	}); err != nil {
		t.Fatal(err)
	}
	tw.Write([]byte(body))
	tw.Close()
	if err := extractTar(context.Background(), &buf, target, nil); err != nil {
		t.Fatal(err)
	}
	val := make([]byte, 16)
	n, err := unix.Getxattr(filepath.Join(target, "f"), "user.berth", val)
	if errors.Is(err, unix.ENOTSUP) {
		t.Skipf("%s does not support user xattrs", target)
	}
	if err != nil || string(val[:n]) != "kept" {
		t.Errorf("xattr user.berth = %q, %v; want kept", val[:n], err)
	}
}

func rawTar(t *testing.T, files []ociimage.File) *bytes.Buffer {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		typ := f.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		hdr := &tar.Header{Name: f.Name, Typeflag: typ, Mode: 0o644, Linkname: f.Linkname, Format: tar.FormatPAX}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(f.Body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			if _, err := tw.Write([]byte(f.Body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return &buf
}
