package initramfs

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"

	"github.com/berthd/berth/vmdriver/initramfs/initramfstest"
)

const testEntry = initramfstest.PVHEntry

func testELF(pvh bool, seed uint64) []byte { return initramfstest.ELF(pvh, seed) }

func testBzImage(payload []byte, size int, sizeTrailer bool) []byte {
	return initramfstest.BzImage(payload, size, sizeTrailer)
}

func compressGzip(t *testing.T, data []byte) []byte {
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestCompression)
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func compressZstd(t *testing.T, data []byte) []byte {
	zw, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression))
	if err != nil {
		t.Fatal(err)
	}
	defer zw.Close()
	return zw.EncodeAll(data, nil)
}

func compressLZ4Legacy(t *testing.T, data []byte) []byte {
	var buf bytes.Buffer
	zw := lz4.NewWriter(&buf)
	if err := zw.Apply(lz4.LegacyOption(true), lz4.CompressionLevelOption(lz4.Level9)); err != nil {
		t.Fatal(err)
	}
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(buf.Bytes(), []byte{0x02, 0x21, 0x4c, 0x18}) {
		t.Fatalf("not a legacy lz4 frame: % x", buf.Bytes()[:4])
	}
	return buf.Bytes()
}

func compressLZMA(t *testing.T, data []byte) []byte {
	var buf bytes.Buffer
	zw, err := lzma.WriterConfig{EOSMarker: true, Size: -1}.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(data)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// compressTool runs a compressor of the build host (xz, bzip2) as the
// kernel build does.
func compressTool(t *testing.T, data []byte, tool string, args ...string) []byte {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		t.Skipf("%s is not installed (Debian: xz-utils, bzip2): cannot make a %s payload", tool, tool)
	}
	cmd := exec.Command(tool, args...)
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v", tool, err)
	}
	return out
}

// xzKernelArgs are scripts/xz_wrap.sh's options for x86.
var xzKernelArgs = []string{"--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c"}

func writeKernel(t *testing.T, dir string, img []byte) string {
	t.Helper()
	p := filepath.Join(dir, "vmlinuz-6.1.0-1-amd64")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// sameKernel checks that the extracted kernel got loads as the ELF want
// does, and that the zeros ending its segments are no longer read from the
// file.
func sameKernel(t *testing.T, got, want []byte) {
	t.Helper()
	g, err := initramfstest.Loaded(got)
	if err != nil {
		t.Fatalf("extracted kernel: %v", err)
	}
	w, err := initramfstest.Loaded(want)
	if err != nil {
		t.Fatal(err)
	}
	if len(g) != len(w) {
		t.Fatalf("extracted kernel has %d loadable segments, want %d", len(g), len(w))
	}
	for addr, seg := range w {
		if !bytes.Equal(g[addr], seg) {
			t.Fatalf("segment at %#x loads differently (%d bytes, want %d)", addr, len(g[addr]), len(seg))
		}
	}
	ef, err := elf.NewFile(bytes.NewReader(got))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ef.Progs {
		if p.Type != elf.PT_LOAD || p.Filesz == 0 {
			continue
		}
		last := make([]byte, 1)
		p.ReadAt(last, int64(p.Filesz)-1)
		if last[0] == 0 {
			t.Errorf("segment at %#x still ends with zeros read from the file", p.Paddr)
		}
	}
}

func TestExtractVmlinuxFormats(t *testing.T) {
	elfData := testELF(true, 1)
	for _, tc := range []struct {
		comp     Compression
		compress func(t *testing.T, data []byte) []byte
	}{
		{CompressionGzip, compressGzip},
		{CompressionXZ, func(t *testing.T, d []byte) []byte { return compressTool(t, d, "xz", xzKernelArgs...) }},
		{CompressionXZ + "-golden", func(t *testing.T, d []byte) []byte { return readGolden(t, d) }},
		{CompressionXZ + "-lzma2-only", func(t *testing.T, d []byte) []byte {
			return compressTool(t, d, "xz", "--check=crc64", "--lzma2=dict=1MiB", "-c")
		}},
		{CompressionXZ + "-sha256-blocks", func(t *testing.T, d []byte) []byte {
			return compressTool(t, d, "xz", "--check=sha256", "--x86", "--lzma2", "--block-size=50000", "-c")
		}},
		{CompressionZstd, compressZstd},
		{CompressionLZ4, compressLZ4Legacy},
		{CompressionBzip2, func(t *testing.T, d []byte) []byte { return compressTool(t, d, "bzip2", "-9", "-c") }},
		{CompressionLZMA, compressLZMA},
	} {
		t.Run(string(tc.comp), func(t *testing.T) {
			payload := tc.compress(t, elfData)
			dir := t.TempDir()
			kernel := writeKernel(t, dir, testBzImage(payload, len(elfData), tc.comp != CompressionGzip))
			v, err := ExtractVmlinux(context.Background(), kernel, filepath.Join(dir, "cache"))
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(v.Path)
			if err != nil {
				t.Fatal(err)
			}
			sameKernel(t, got, elfData)
			if want := Compression(strings.SplitN(string(tc.comp), "-", 2)[0]); v.Compression != want {
				t.Errorf("compression %q, want %q", v.Compression, want)
			}
			if v.Entry != testEntry {
				t.Errorf("entry %#x, want %#x", v.Entry, testEntry)
			}
		})
	}
}

// goldenXZ is testELF(true, 1) compressed by `xz --check=crc32 --x86
// --lzma2=dict=32MiB`, so the BCJ path is tested where xz is missing.
const goldenXZ = "testdata/pvh-elf.xz"

func readGolden(t *testing.T, elfData []byte) []byte {
	if os.Getenv("BERTH_UPDATE_GOLDEN") == "1" {
		b := compressTool(t, elfData, "xz", xzKernelArgs...)
		if err := os.WriteFile(goldenXZ, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(goldenXZ)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestExtractVmlinuxRefusals(t *testing.T) {
	elfData := testELF(true, 2)
	xz := func(t *testing.T) []byte { return readGolden(t, testELF(true, 1)) }
	for _, tc := range []struct {
		name  string
		image func(t *testing.T) []byte
		want  string
	}{
		{"no PVH note", func(t *testing.T) []byte {
			e := testELF(false, 2)
			return testBzImage(compressGzip(t, e), len(e), false)
		}, "no PVH entry note"},
		{"not an ELF", func(t *testing.T) []byte {
			d := bytes.Repeat([]byte("not a kernel "), 1000)
			return testBzImage(compressGzip(t, d), len(d), false)
		}, "not an ELF"},
		{"lzo", func(t *testing.T) []byte {
			return testBzImage([]byte("\x89LZO\x00\r\n\x1a\n"+strings.Repeat("x", 100)), 1000, true)
		}, "no LZO decoder"},
		{"unknown compression", func(t *testing.T) []byte {
			return testBzImage([]byte(strings.Repeat("?", 100)), 1000, true)
		}, "unknown compression"},
		{"not a bzImage", func(t *testing.T) []byte { return elfData }, "not a bzImage"},
		{"old boot protocol", func(t *testing.T) []byte {
			b := testBzImage(compressGzip(t, elfData), len(elfData), false)
			binary.LittleEndian.PutUint16(b[hdrVersion:], 0x0206)
			return b
		}, "boot protocol 2.06"},
		{"payload beyond the end", func(t *testing.T) []byte {
			b := testBzImage(compressGzip(t, elfData), len(elfData), false)
			binary.LittleEndian.PutUint32(b[hdrPayloadLength:], uint32(len(b)))
			return b
		}, "beyond the file's end"},
		{"corrupt xz", func(t *testing.T) []byte {
			p := xz(t)
			p[len(p)/2] ^= 0x55
			return testBzImage(p, len(elfData), true)
		}, "xz payload"},
		{"wrong size", func(t *testing.T) []byte {
			return testBzImage(xz(t), 1<<20, true)
		}, "the image says 1048576"},
		{"longer than its size", func(t *testing.T) []byte {
			return testBzImage(xz(t), 12345, true)
		}, "more than the image's recorded size"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cache := filepath.Join(dir, "cache")
			kernel := writeKernel(t, dir, tc.image(t))
			_, err := ExtractVmlinux(context.Background(), kernel, cache)
			if !errors.Is(err, ErrNoPVH) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrNoPVH saying %q", err, tc.want)
			}
			// The verdict is cached: a second call says the same without
			// extracting again, and no extracted kernel is left.
			_, err2 := ExtractVmlinux(context.Background(), kernel, cache)
			if !errors.Is(err2, ErrNoPVH) || err2.Error() != err.Error() {
				t.Fatalf("second call: %v, want %v", err2, err)
			}
			left, _ := filepath.Glob(filepath.Join(cache, "vmlinux-*"))
			for _, l := range left {
				if !strings.HasSuffix(l, ".nopvh") && !strings.HasSuffix(l, ".lock") {
					t.Errorf("left behind: %s", l)
				}
			}
		})
	}
}

func TestExtractVmlinuxCache(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	e1 := testELF(true, 3)
	kernel := writeKernel(t, dir, testBzImage(compressZstd(t, e1), len(e1), true))
	ctx := context.Background()
	v1, err := ExtractVmlinux(ctx, kernel, cache)
	if err != nil {
		t.Fatal(err)
	}
	fi1, _ := os.Stat(v1.Path)

	// Reuse: the same kernel is not extracted again.
	again, err := ExtractVmlinux(ctx, kernel, cache)
	if err != nil {
		t.Fatal(err)
	}
	fi2, _ := os.Stat(again.Path)
	if again != v1 || !os.SameFile(fi1, fi2) {
		t.Fatalf("second call %+v (same file %v), want the cached %+v", again, os.SameFile(fi1, fi2), v1)
	}

	// Invalidation: a new kernel at the same path is extracted anew.
	e2 := testELF(true, 4)
	writeKernel(t, dir, testBzImage(compressGzip(t, e2), len(e2), false))
	v2, err := ExtractVmlinux(ctx, kernel, cache)
	if err != nil {
		t.Fatal(err)
	}
	if v2.Path == v1.Path || v2.Compression != CompressionGzip {
		t.Fatalf("changed kernel: %+v, want a new gzip extraction (old %+v)", v2, v1)
	}
	got, _ := os.ReadFile(v2.Path)
	sameKernel(t, got, e2)

	// And a kernel without the note, swapped in at the same path, is
	// refused although a PVH kernel was cached before.
	e3 := testELF(false, 5)
	writeKernel(t, dir, testBzImage(compressGzip(t, e3), len(e3), false))
	if _, err := ExtractVmlinux(ctx, kernel, cache); !errors.Is(err, ErrNoPVH) {
		t.Fatalf("kernel without the note: %v, want ErrNoPVH", err)
	}

	// A damaged cache entry is extracted again, not booted.
	writeKernel(t, dir, testBzImage(compressZstd(t, e1), len(e1), true))
	if err := os.WriteFile(v1.Path, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	v4, err := ExtractVmlinux(ctx, kernel, cache)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(v4.Path)
	sameKernel(t, got, e1)
}

func TestExtractVmlinuxConcurrent(t *testing.T) {
	dir := t.TempDir()
	cache := filepath.Join(dir, "cache")
	e := testELF(true, 6)
	kernel := writeKernel(t, dir, testBzImage(compressLZMA(t, e), len(e), true))
	errs := make(chan error, 4)
	paths := make(chan string, 4)
	for i := 0; i < 4; i++ {
		go func() {
			v, err := ExtractVmlinux(context.Background(), kernel, cache)
			errs <- err
			paths <- v.Path
		}()
	}
	first := ""
	for i := 0; i < 4; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		p := <-paths
		if first == "" {
			first = p
		} else if p != first {
			t.Fatalf("paths %s and %s", first, p)
		}
	}
	if tmps, _ := filepath.Glob(filepath.Join(cache, ".vmlinux-*")); len(tmps) != 0 {
		t.Fatalf("temporary files left: %v", tmps)
	}
}

func TestExtractVmlinuxCanceled(t *testing.T) {
	dir := t.TempDir()
	e := testELF(true, 7)
	kernel := writeKernel(t, dir, testBzImage(compressGzip(t, e), len(e), false))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := ExtractVmlinux(ctx, kernel, filepath.Join(dir, "cache"))
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrNoPVH) {
		t.Fatalf("err = %v, want context.Canceled (and no verdict)", err)
	}
	if _, err := ExtractVmlinux(context.Background(), kernel, filepath.Join(dir, "cache")); err != nil {
		t.Fatalf("after a canceled call: %v", err)
	}
}

// TestExtractVmlinuxNodeKernel extracts the node's own kernel where there
// is one, and compares it with xz's own decoding.
func TestExtractVmlinuxNodeKernel(t *testing.T) {
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(kernels) == 0 {
		t.Skip("no kernel in /boot (install linux-image-amd64)")
	}
	if testing.Short() {
		t.Skip("extracts a real kernel (seconds)")
	}
	kernel := kernels[len(kernels)-1]
	v, err := ExtractVmlinux(context.Background(), kernel, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %s payload, PVH entry %#x", kernel, v.Compression, v.Entry)
	if v.Compression != CompressionXZ {
		return
	}
	if _, err := exec.LookPath("xz"); err != nil {
		return
	}
	f, _ := os.Open(kernel)
	defer f.Close()
	off, n, err := bzPayload(f)
	if err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, n-4)
	f.ReadAt(payload, off)
	cmd := exec.Command("xz", "-dc")
	cmd.Stdin = bytes.NewReader(payload)
	want, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(v.Path)
	sameKernel(t, got, want)
}

// TestBCJChunking checks that the BCJ decoder gives the same bytes however
// the stream is cut into writes (an instruction may straddle two).
func TestBCJChunking(t *testing.T) {
	data := testELF(true, 8)
	whole := append([]byte(nil), data...)
	var mask uint32
	n := bcjX86(whole, 0, &mask)
	if n < len(whole)-4 {
		t.Fatalf("processed %d of %d", n, len(whole))
	}
	r := rand.New(rand.NewPCG(9, 9))
	for round := 0; round < 20; round++ {
		var out bytes.Buffer
		w := &bcjWriter{w: &out}
		for rest := data; len(rest) > 0; {
			k := min(len(rest), 1+r.IntN(13))
			w.Write(rest[:k])
			rest = rest[k:]
		}
		w.Close()
		if !bytes.Equal(out.Bytes(), whole) {
			t.Fatalf("round %d: chunked decoding differs", round)
		}
	}
}

func TestPVHEntry(t *testing.T) {
	if e, err := PVHEntry(bytes.NewReader(testELF(true, 10))); err != nil || e != testEntry {
		t.Fatalf("PVHEntry = %#x, %v", e, err)
	}
	if _, err := PVHEntry(bytes.NewReader(testELF(false, 10))); !errors.Is(err, ErrNoPVH) {
		t.Fatalf("no note: %v", err)
	}
	bad := testELF(true, 10)
	binary.LittleEndian.PutUint16(bad[18:], 40) // EM_ARM
	if _, err := PVHEntry(bytes.NewReader(bad)); !errors.Is(err, ErrNoPVH) {
		t.Fatalf("ARM ELF: %v", err)
	}
	if _, err := PVHEntry(bytes.NewReader([]byte("MZ not an elf at all"))); !errors.Is(err, ErrNoPVH) {
		t.Fatalf("not an ELF: %v", err)
	}
}

func FuzzPVHNotes(f *testing.F) {
	e := testELF(true, 11)
	f.Add(e[len(e)-100:])
	f.Fuzz(func(t *testing.T, data []byte) {
		findPVHNote(data, binary.LittleEndian)
	})
}

// TestDecodeXZMutations feeds the xz parser damaged copies of a valid
// stream: each must end, with an error or not, and never panic.
func TestDecodeXZMutations(t *testing.T) {
	b, err := os.ReadFile(goldenXZ)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(12, 12))
	for i := 0; i < 200; i++ {
		c := append([]byte(nil), b[:512+r.IntN(len(b)-512)]...)
		for k := 0; k < 1+r.IntN(4); k++ {
			if r.IntN(8) == 0 {
				c[r.IntN(min(len(c), 32))] = byte(r.IntN(256)) // the headers
			} else {
				c[r.IntN(len(c))] = byte(r.IntN(256))
			}
		}
		decodeXZ(bytes.NewReader(c), &countWriter{w: io.Discard, limit: 1 << 20})
	}
}
