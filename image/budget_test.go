package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// assertEmptyStore checks a refused pull or import left nothing: no ref,
// no blob, no tree, nothing in tmp/.
func assertEmptyStore(t *testing.T, s *Store) {
	t.Helper()
	if l := s.List(); len(l) != 0 {
		t.Errorf("the store lists %+v", l)
	}
	for _, d := range []string{s.blobDir(), s.rootfsDir(), s.tmpDir()} {
		if entries, _ := os.ReadDir(d); len(entries) != 0 {
			t.Errorf("%s holds %d entries", d, len(entries))
		}
	}
}

// TestImageBudgets: an image over the unpacked-bytes or entries budget
// (a gzip bomb: 64 MiB of zeros weigh 64 KiB compressed) is refused at pull
// and at import, naming the key to change, and nothing of it is kept.
func TestImageBudgets(t *testing.T) {
	requireRoot(t)
	bomb := mkImage(t, []ociimage.File{{Name: "bomb", Body: string(make([]byte, 64<<20))}})
	var many []ociimage.File
	for i := range 300 {
		many = append(many, ociimage.File{Name: fmt.Sprintf("f%03d", i), Body: "x"})
	}
	crowd := mkImage(t, many)
	host := testimage.StartRegistry(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		img    v1.Image
		limits Limits
		key    string
	}{
		{"gzip bomb", bomb, Limits{MaxUnpackedBytes: 16 << 20, MaxEntries: 1000}, "images.max_unpacked_bytes"},
		{"too many entries", crowd, Limits{MaxUnpackedBytes: 16 << 20, MaxEntries: 100}, "images.max_entries"},
	} {
		ref, err := testimage.Push(ctx, host, "test/"+strings.ReplaceAll(tc.name, " ", "-"), tc.img)
		if err != nil {
			t.Fatal(err)
		}
		if l, err := tc.img.Layers(); err == nil {
			size, _ := l[0].Size()
			t.Logf("%s: compressed layer of %d bytes", tc.name, size)
		}
		t.Run(tc.name+"/pull", func(t *testing.T) {
			s := newStore(t, t.TempDir(), insecure(host), WithLimits(tc.limits))
			_, err := s.Pull(ctx, ref)
			checkBudgetError(t, err, tc.key)
			assertEmptyStore(t, s)
		})
		t.Run(tc.name+"/import", func(t *testing.T) {
			s := newStore(t, t.TempDir(), WithLimits(tc.limits))
			var buf bytes.Buffer
			if err := ociimage.WriteOCIArchive(&buf, tc.img, "berth.local/test/budget:1"); err != nil {
				t.Fatal(err)
			}
			_, err := s.Import(ctx, &buf, "")
			checkBudgetError(t, err, tc.key)
			assertEmptyStore(t, s)
		})
		t.Run(tc.name+"/within the budget", func(t *testing.T) {
			s := newStore(t, t.TempDir(), insecure(host), WithLimits(Limits{MaxUnpackedBytes: 128 << 20, MaxEntries: 1000}))
			img, err := s.Pull(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Rootfs(ctx, img); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func checkBudgetError(t *testing.T, err error, key string) {
	t.Helper()
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), key) {
		t.Fatalf("got %v, want ErrResourceExhausted naming %s", err, key)
	}
	t.Log(err)
}

// TestUnpackWritesHoles: zeros (a sparse entry, as the tar reader expands
// it, or a file of zeros) take no disk space, yet read back the same; the
// apparent size is what counts against the budget.
func TestUnpackWritesHoles(t *testing.T) {
	const size = 256 << 20
	data := []byte("head")
	tail := []byte("tail")
	r := tarStream(t, func(tw *tar.Writer) {
		writeEntry(t, tw, "sparse", size, io.MultiReader(bytes.NewReader(data), io.LimitReader(zeros{}, size-int64(len(data)+len(tail))), bytes.NewReader(tail)))
		writeEntry(t, tw, "hole", 1<<20, io.LimitReader(zeros{}, 1<<20))
	})
	s := newStore(t, t.TempDir())
	dir := t.TempDir()
	b := &budget{s: s}
	if err := extractTar(context.Background(), r, dir, b); err != nil {
		t.Fatal(err)
	}
	if b.bytes != size+1<<20 || b.entries != 2 {
		t.Errorf("budget counted %d bytes in %d entries, want %d in 2", b.bytes, b.entries, size+1<<20)
	}
	for name, want := range map[string]int64{"sparse": size, "hole": 1 << 20} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		used := fi.Sys().(*syscall.Stat_t).Blocks * 512
		if fi.Size() != want || used > 1<<20 {
			t.Errorf("%s: %d bytes using %d on disk, want %d using almost nothing", name, fi.Size(), used, want)
		}
	}
	f, err := os.Open(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 4)
	if _, err := f.ReadAt(got, 0); err != nil || string(got) != "head" {
		t.Errorf("start %q, %v", got, err)
	}
	if _, err := f.ReadAt(got, size-4); err != nil || string(got) != "tail" {
		t.Errorf("end %q, %v", got, err)
	}
	if _, err := f.ReadAt(got, size/2); err != nil || !bytes.Equal(got, make([]byte, 4)) {
		t.Errorf("middle %q, %v", got, err)
	}

	// The same stream over a budget is refused before the file is written.
	small := newStore(t, t.TempDir(), WithLimits(Limits{MaxUnpackedBytes: 64 << 20}))
	r = tarStream(t, func(tw *tar.Writer) {
		writeEntry(t, tw, "sparse", size, io.LimitReader(zeros{}, size))
	})
	dir = t.TempDir()
	if err := extractTar(context.Background(), r, dir, &budget{s: small}); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("extract over the budget = %v, want ErrResourceExhausted", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "sparse")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused entry was written: %v", err)
	}
}

// TestDiskPressure: below the free-space floor, pulls, imports, disk
// imports and unpacks are refused naming storage.min_free_bytes, and a
// write that crosses the floor midway stops.
func TestDiskPressure(t *testing.T) {
	requireRoot(t)
	var free atomic.Int64
	free.Store(100 << 20)
	s := newStore(t, t.TempDir(), WithLimits(Limits{MinFreeBytes: 1 << 30}))
	s.statfs = func(string) (int64, error) { return free.Load(), nil }
	ctx := context.Background()

	err := s.DiskPressure()
	if !errors.Is(err, errdefs.ErrResourceExhausted) || !strings.Contains(err.Error(), "storage.min_free_bytes") {
		t.Fatalf("DiskPressure at 100 MiB free = %v, want ErrResourceExhausted naming storage.min_free_bytes", err)
	}
	t.Log(err)
	img := mkImage(t, []ociimage.File{{Name: "a", Body: "a"}})
	var buf bytes.Buffer
	if err := ociimage.WriteOCIArchive(&buf, img, "berth.local/test/a:1"); err != nil {
		t.Fatal(err)
	}
	archive := buf.Bytes()
	if _, err := s.Import(ctx, bytes.NewReader(archive), ""); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("Import under pressure = %v", err)
	}
	if _, err := s.ImportDisk(ctx, strings.NewReader("QFI\xfb"), "x/disk:1"); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("ImportDisk under pressure = %v", err)
	}
	host := testimage.StartRegistry(t)
	ref, err := testimage.Push(ctx, host, "test/a", img)
	if err != nil {
		t.Fatal(err)
	}
	ps := newStore(t, t.TempDir(), insecure(host), WithLimits(Limits{MinFreeBytes: 1 << 30}))
	ps.statfs = s.statfs
	if _, err := ps.Pull(ctx, ref); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("Pull under pressure = %v", err)
	}
	assertEmptyStore(t, s)
	assertEmptyStore(t, ps)

	free.Store(10 << 30)
	if err := s.DiskPressure(); err != nil {
		t.Fatalf("DiskPressure at 10 GiB free = %v", err)
	}
	stored, err := s.Import(ctx, bytes.NewReader(archive), "")
	if err != nil {
		t.Fatal(err)
	}
	// An image stored before the pressure (by an older berth, unpacked at
	// first use) is not unpacked under it.
	if err := os.RemoveAll(filepath.Join(s.rootfsDir(), mustHex(t, stored[0].Digest))); err != nil {
		t.Fatal(err)
	}
	free.Store(100 << 20)
	if _, err := s.Rootfs(ctx, stored[0]); !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Errorf("Rootfs under pressure = %v", err)
	}

	// The floor is crossed while a file is written: the write stops.
	var checks atomic.Int64
	s.statfs = func(string) (int64, error) {
		if checks.Add(1) > 1 {
			return 100 << 20, nil
		}
		return 10 << 30, nil
	}
	const size = 200 << 20
	r := tarStream(t, func(tw *tar.Writer) {
		writeEntry(t, tw, "big", size, io.LimitReader(ones{}, size))
	})
	dir := t.TempDir()
	err = extractTar(ctx, r, dir, &budget{s: s})
	if !errors.Is(err, errdefs.ErrResourceExhausted) {
		t.Fatalf("extract crossing the floor = %v, want ErrResourceExhausted", err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "big")); err == nil && fi.Size() >= size {
		t.Errorf("the whole file was written: %d bytes", fi.Size())
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

type ones struct{}

func (ones) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 1
	}
	return len(p), nil
}

// tarStream streams the tar archive write makes, without holding it.
func tarStream(t *testing.T, write func(tw *tar.Writer)) io.Reader {
	t.Helper()
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		write(tw)
		pw.CloseWithError(tw.Close())
	}()
	t.Cleanup(func() { pr.Close() })
	return pr
}

func writeEntry(t *testing.T, tw *tar.Writer, name string, size int64, r io.Reader) {
	if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, Format: tar.FormatPAX}); err != nil {
		return
	}
	io.Copy(tw, r)
}
