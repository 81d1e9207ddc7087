package initramfs

import (
	"bufio"
	"bytes"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"

	"github.com/berthd/berth/internal/fileutil"
)

// vmlinuxVersion is part of the extracted kernel's cache key: bump it when
// extraction changes, so a kernel extracted (or refused) by older code is
// extracted again.
const vmlinuxVersion = "berth-vmlinux/2"

// ErrNoPVH says that a kernel cannot be booted through its PVH entry point:
// its payload could not be extracted, or the ELF it holds has no PVH note.
// The error's text says which; the bzImage itself still boots.
var ErrNoPVH = errors.New("no PVH entry point")

// Compression is how a bzImage's payload (the kernel's vmlinux) is
// compressed, as the kernel's CONFIG_KERNEL_* chose.
type Compression string

const (
	CompressionGzip  Compression = "gzip"
	CompressionXZ    Compression = "xz"
	CompressionZstd  Compression = "zstd"
	CompressionLZ4   Compression = "lz4"
	CompressionBzip2 Compression = "bzip2"
	CompressionLZMA  Compression = "lzma"
	CompressionLZO   Compression = "lzo"
)

// bzImage setup header offsets (Documentation/arch/x86/boot.rst).
const (
	hdrSetupSects    = 0x1f1
	hdrMagic         = 0x202
	hdrVersion       = 0x206
	hdrPayloadOffset = 0x248
	hdrPayloadLength = 0x24c
	hdrEnd           = 0x250
	// payload_offset and payload_length exist from boot protocol 2.08 on.
	minPayloadProtocol = 0x0208
)

// Vmlinux is a kernel extracted from its bzImage.
type Vmlinux struct {
	// Path is the uncompressed kernel, an ELF that QEMU boots through its
	// PVH entry point.
	Path string
	// Compression is how the bzImage carried it.
	Compression Compression
	// Entry is the PVH entry point (a physical address).
	Entry uint64
}

// ExtractVmlinux returns the uncompressed, PVH-bootable kernel of the
// bzImage at kernelPath, extracted into cacheDir once per kernel content:
// the cache key is a hash of the bzImage, so a new kernel at the same path
// is extracted again and an unchanged one never is. A kernel that cannot
// be booted through PVH (its compression has no decoder here, its payload
// is corrupt, its ELF has no PVH note) is an ErrNoPVH error whose text
// says why; that verdict is cached as well. Concurrent calls, in one
// process or several, extract at most once and never expose a partial
// file.
func ExtractVmlinux(ctx context.Context, kernelPath, cacheDir string) (Vmlinux, error) {
	key, err := kernelKey(kernelPath)
	if err != nil {
		return Vmlinux{}, err
	}
	final := filepath.Join(cacheDir, "vmlinux-"+key)
	refused := final + ".nopvh"

	if v, ok, err := cachedVmlinux(kernelPath, final, refused); ok || err != nil {
		return v, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return Vmlinux{}, fmt.Errorf("vmlinux: create cache dir: %w", err)
	}
	unlock, err := fileutil.Lock(ctx, final+".lock")
	if err != nil {
		return Vmlinux{}, fmt.Errorf("vmlinux: %w", err)
	}
	defer unlock()
	if v, ok, err := cachedVmlinux(kernelPath, final, refused); ok || err != nil {
		return v, err // decided by whoever held the lock before us
	}
	v, err := extractTo(ctx, kernelPath, final)
	// Decompressing holds a dictionary of tens of MiB; hand it back to the
	// OS now instead of keeping the agent's RSS up for minutes.
	debug.FreeOSMemory()
	if errors.Is(err, ErrNoPVH) {
		if werr := fileutil.WriteFile(refused, []byte(err.Error()+"\n"), 0o644); werr != nil {
			return Vmlinux{}, fmt.Errorf("vmlinux: %w (and recording it: %v)", err, werr)
		}
	}
	if err != nil {
		return Vmlinux{}, fmt.Errorf("vmlinux: %w", err)
	}
	return v, nil
}

// cachedVmlinux returns what the cache holds for the kernel: the
// extracted kernel (ok), a recorded refusal (an ErrNoPVH error), or
// nothing.
func cachedVmlinux(kernelPath, final, refused string) (Vmlinux, bool, error) {
	if f, err := os.Open(final); err == nil {
		entry, perr := PVHEntry(f)
		f.Close()
		if perr == nil {
			comp, _ := kernelCompression(kernelPath)
			return Vmlinux{Path: final, Compression: comp, Entry: entry}, true, nil
		}
		// Only complete, checked files are renamed into place: this one
		// was damaged since. Extract it again.
		os.Remove(final)
	}
	if b, err := os.ReadFile(refused); err == nil {
		reason := strings.TrimSpace(string(b))
		reason = strings.TrimSuffix(reason, ": "+ErrNoPVH.Error())
		return Vmlinux{}, false, fmt.Errorf("vmlinux: %s: %w", reason, ErrNoPVH)
	}
	return Vmlinux{}, false, nil
}

// kernelKey is the cache key of a kernel: a hash of its content and of
// the extraction code's version.
func kernelKey(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("vmlinux: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	hashField(h, []byte(vmlinuxVersion))
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("vmlinux: read kernel: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil))[:32], nil
}

// extractTo decompresses the kernel into a temporary file next to final,
// checks its PVH note and renames it into place.
func extractTo(ctx context.Context, kernelPath, final string) (v Vmlinux, err error) {
	tmp, err := os.CreateTemp(filepath.Dir(final), ".vmlinux-*.tmp")
	if err != nil {
		return Vmlinux{}, fmt.Errorf("create: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	comp, err := Extract(ctx, kernelPath, bw)
	if err != nil {
		return Vmlinux{}, err
	}
	if err := bw.Flush(); err != nil {
		return Vmlinux{}, fmt.Errorf("write: %w", err)
	}
	entry, err := PVHEntry(tmp)
	if err != nil {
		return Vmlinux{}, fmt.Errorf("%s (%s): %w", kernelPath, comp, err)
	}
	if err := trimZeroTails(tmp); err != nil {
		return Vmlinux{}, fmt.Errorf("%s (%s): %w", kernelPath, comp, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return Vmlinux{}, fmt.Errorf("write: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return Vmlinux{}, fmt.Errorf("write: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return Vmlinux{}, fmt.Errorf("write: %w", err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return Vmlinux{}, fmt.Errorf("install: %w", err)
	}
	return Vmlinux{Path: final, Compression: comp, Entry: entry}, nil
}

// trimZeroTails makes the zeros that end each loadable segment of the
// ELF64 kernel f part of the segment's zero-filled remainder (p_filesz
// short of p_memsz), which a loader writes as zeros without reading them:
// the guest's memory is the same, but QEMU, which maps the kernel file and
// keeps what it read resident for the VM's life, no longer reads the
// kernel's bss (some 23 MiB of Debian's 66 MiB vmlinux, issue 17).
func trimZeroTails(f *os.File) error {
	ef, err := elf.NewFile(f)
	if err != nil {
		return fmt.Errorf("read ELF: %w", err)
	}
	if ef.Class != elf.ELFCLASS64 {
		return nil
	}
	var phoff [8]byte
	if _, err := f.ReadAt(phoff[:], 32); err != nil {
		return fmt.Errorf("read ELF header: %w", err)
	}
	const phentsize, fileszAt = 56, 32 // Elf64_Phdr and its p_filesz
	for i, p := range ef.Progs {
		if p.Type != elf.PT_LOAD || p.Filesz == 0 {
			continue
		}
		zeros, err := trailingZeros(f, int64(p.Off), int64(p.Filesz))
		if err != nil {
			return err
		}
		if zeros == 0 {
			continue
		}
		var b [8]byte
		ef.ByteOrder.PutUint64(b[:], p.Filesz-uint64(zeros))
		at := int64(ef.ByteOrder.Uint64(phoff[:])) + int64(i)*phentsize + fileszAt
		if _, err := f.WriteAt(b[:], at); err != nil {
			return fmt.Errorf("write program header: %w", err)
		}
	}
	return nil
}

// trailingZeros counts the zero bytes that end f[off:off+n].
func trailingZeros(f io.ReaderAt, off, n int64) (int64, error) {
	buf := make([]byte, 1<<20)
	var zeros int64
	for end := off + n; end > off; {
		k := min(int64(len(buf)), end-off)
		if _, err := f.ReadAt(buf[:k], end-k); err != nil {
			return 0, fmt.Errorf("read segment: %w", err)
		}
		nz := len(bytes.TrimRight(buf[:k], "\x00"))
		zeros += k - int64(nz)
		if nz > 0 {
			break
		}
		end -= k
	}
	return zeros, nil
}

// Extract writes the uncompressed kernel (vmlinux, an ELF) carried by the
// bzImage at path to w. Errors about the image's content (not a bzImage,
// a compression with no decoder here, a corrupt payload, not an ELF) are
// ErrNoPVH errors.
func Extract(ctx context.Context, path string, w io.Writer) (Compression, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	off, n, err := bzPayload(f)
	if err != nil {
		return "", fmt.Errorf("%s: %w: %w", path, err, ErrNoPVH)
	}
	comp, err := detectCompression(io.NewSectionReader(f, off, n))
	if err != nil {
		return "", fmt.Errorf("%s: %w: %w", path, err, ErrNoPVH)
	}
	if n < 4 {
		return comp, fmt.Errorf("%s: payload of %d bytes: %w", path, n, ErrNoPVH)
	}
	// Every payload ends with the uncompressed size, little-endian: gzip's
	// own ISIZE, or the kernel build's size_append after the other
	// formats (which is no part of their stream).
	var tail [4]byte
	if _, err := f.ReadAt(tail[:], off+n-4); err != nil {
		return comp, fmt.Errorf("%s: read payload: %w", path, err)
	}
	want := binary.LittleEndian.Uint32(tail[:])
	streamLen := n - 4
	if comp == CompressionGzip {
		streamLen = n
	}
	src := &ctxReader{ctx: ctx, r: bufio.NewReaderSize(io.NewSectionReader(f, off, streamLen), 1<<16)}
	// A payload that decodes to more than the image says is corrupt; the
	// limit also keeps it from filling the disk.
	cw := &countWriter{w: w, limit: int64(want)}
	head := &headWriter{}
	if err := decompress(comp, src, io.MultiWriter(cw, head)); err != nil {
		if ctx.Err() != nil {
			return comp, ctx.Err()
		}
		var we *writeError
		if errors.As(err, &we) && !errors.Is(err, errTooLong) {
			return comp, fmt.Errorf("write vmlinux: %w", we.err)
		}
		return comp, fmt.Errorf("%s: %s payload: %v: %w", path, comp, err, ErrNoPVH)
	}
	if uint32(cw.n) != want {
		return comp, fmt.Errorf("%s: %s payload holds %d bytes, the image says %d: %w", path, comp, cw.n, want, ErrNoPVH)
	}
	if !bytes.HasPrefix(head.b, []byte("\x7fELF")) {
		return comp, fmt.Errorf("%s: the %s payload is not an ELF: %w", path, comp, ErrNoPVH)
	}
	return comp, nil
}

// bzPayload returns where the compressed kernel lies in a bzImage.
func bzPayload(f io.ReaderAt) (off, n int64, err error) {
	var h [hdrEnd]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		return 0, 0, fmt.Errorf("not a bzImage (too short)")
	}
	if string(h[hdrMagic:hdrMagic+4]) != "HdrS" {
		return 0, 0, fmt.Errorf("not a bzImage (no HdrS setup header)")
	}
	if v := binary.LittleEndian.Uint16(h[hdrVersion:]); v < minPayloadProtocol {
		return 0, 0, fmt.Errorf("boot protocol %d.%02d gives no payload location (2.08 does)", v>>8, v&0xff)
	}
	sects := int64(h[hdrSetupSects])
	if sects == 0 {
		sects = 4
	}
	off = (sects+1)*512 + int64(binary.LittleEndian.Uint32(h[hdrPayloadOffset:]))
	n = int64(binary.LittleEndian.Uint32(h[hdrPayloadLength:]))
	if n == 0 {
		return 0, 0, fmt.Errorf("the setup header gives an empty payload")
	}
	var last [1]byte
	if _, err := f.ReadAt(last[:], off+n-1); err != nil {
		return 0, 0, fmt.Errorf("the payload (%d bytes at %d) lies beyond the file's end", n, off)
	}
	return off, n, nil
}

// kernelCompression reads how the bzImage at path is compressed.
func kernelCompression(path string) (Compression, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	off, n, err := bzPayload(f)
	if err != nil {
		return "", err
	}
	return detectCompression(io.NewSectionReader(f, off, n))
}

// detectCompression tells the payload's format by its magic number, as
// the kernel's own extract-vmlinux does.
func detectCompression(r io.Reader) (Compression, error) {
	var m [6]byte
	n, _ := io.ReadFull(r, m[:])
	b := m[:n]
	switch {
	case bytes.HasPrefix(b, []byte{0x1f, 0x8b}):
		return CompressionGzip, nil
	case bytes.HasPrefix(b, xzMagic):
		return CompressionXZ, nil
	case bytes.HasPrefix(b, []byte{0x28, 0xb5, 0x2f, 0xfd}):
		return CompressionZstd, nil
	case bytes.HasPrefix(b, []byte{0x02, 0x21, 0x4c, 0x18}):
		return CompressionLZ4, nil
	case bytes.HasPrefix(b, []byte("BZh")):
		return CompressionBzip2, nil
	case bytes.HasPrefix(b, []byte{0x5d, 0x00, 0x00}):
		return CompressionLZMA, nil
	case bytes.HasPrefix(b, []byte{0x89, 'L', 'Z', 'O'}):
		return CompressionLZO, errors.New("lzo-compressed payload: berth has no LZO decoder")
	}
	return "", fmt.Errorf("payload of unknown compression (magic % x)", b)
}

// decompress writes the content of the compressed stream r to w. Errors
// of w come back as *writeError.
func decompress(comp Compression, r io.Reader, w io.Writer) error {
	w = writeErrors{w}
	switch comp {
	case CompressionGzip:
		zr, err := gzip.NewReader(r)
		if err != nil {
			return err
		}
		zr.Multistream(false)
		_, err = io.Copy(w, zr)
		return err
	case CompressionXZ:
		return decodeXZ(r, w)
	case CompressionZstd:
		// zstd -22 --ultra, as the kernel build runs it, uses a 128 MiB
		// window.
		zr, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(256<<20))
		if err != nil {
			return err
		}
		defer zr.Close()
		_, err = io.Copy(w, zr)
		return err
	case CompressionLZ4:
		// The kernel's lz4 is the legacy frame format, which the reader
		// recognises by its magic.
		_, err := io.Copy(w, lz4.NewReader(r))
		return err
	case CompressionBzip2:
		_, err := io.Copy(w, bzip2.NewReader(r))
		return err
	case CompressionLZMA:
		zr, err := lzma.NewReader(r)
		if err != nil {
			return err
		}
		_, err = io.Copy(w, zr)
		return err
	}
	return fmt.Errorf("%s-compressed payload: no decoder", comp)
}

// writeError tells a failed write of the output from a bad input.
type writeError struct{ err error }

func (e *writeError) Error() string { return e.err.Error() }
func (e *writeError) Unwrap() error { return e.err }

type writeErrors struct{ w io.Writer }

func (w writeErrors) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	if err != nil {
		err = &writeError{err}
	}
	return n, err
}

// ctxReader ends a long decompression when its context ends. It is a
// ByteReader too, which the LZMA decoders read byte by byte.
type ctxReader struct {
	ctx   context.Context
	r     *bufio.Reader
	bytes int
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

func (c *ctxReader) ReadByte() (byte, error) {
	if c.bytes++; c.bytes%(1<<16) == 0 {
		if err := c.ctx.Err(); err != nil {
			return 0, err
		}
	}
	return c.r.ReadByte()
}

// errTooLong is a payload decoding to more than its image says.
var errTooLong = errors.New("decodes to more than the image's recorded size")

// countWriter counts what is written and refuses to go past limit.
type countWriter struct {
	w     io.Writer
	n     int64
	limit int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.n+int64(len(p)) > c.limit {
		return 0, errTooLong
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// headWriter keeps the first bytes written, to check the ELF magic.
type headWriter struct{ b []byte }

func (h *headWriter) Write(p []byte) (int, error) {
	if k := 4 - len(h.b); k > 0 {
		h.b = append(h.b, p[:min(k, len(p))]...)
	}
	return len(p), nil
}
