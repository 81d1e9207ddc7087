package initramfs

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"hash/crc64"
	"io"

	"github.com/ulikunitz/xz/lzma"
)

// The xz container (https://tukaani.org/xz/xz-file-format.txt) is parsed
// here rather than by github.com/ulikunitz/xz's reader, which accepts
// LZMA2 as the only filter: the kernel's xz_wrap.sh compresses x86
// kernels with the x86 BCJ filter in front of LZMA2. ulikunitz decodes
// the LZMA2 data; the BCJ filter is undone by bcjX86 below.

var xzMagic = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}

// xz filter ids (xz-file-format.txt, 5.3).
const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21
)

// maxDictCap bounds the memory an xz stream may ask for: the kernel's
// xz_wrap.sh uses 32 MiB.
const maxDictCap = 64 << 20

// errXZ marks a malformed or unsupported xz stream.
var errXZ = errors.New("xz")

// countingReader counts what was read through it, so the parser knows
// where a block's compressed data ended (LZMA2 carries no length of its
// own here, and block padding aligns to it).
type countingReader struct {
	r *bufio.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

func (c *countingReader) ReadByte() (byte, error) {
	b, err := c.r.ReadByte()
	if err == nil {
		c.n++
	}
	return b, err
}

func (c *countingReader) full(n int) ([]byte, error) {
	b := make([]byte, n)
	_, err := io.ReadFull(c, b)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return b, err
}

// decodeXZ writes the uncompressed content of the xz stream r to w. Only
// the first stream is read (the kernel's payload has one), up to its
// index: every block's check verifies its data, and the caller compares
// the total with the size the kernel image records.
func decodeXZ(r io.Reader, w io.Writer) error {
	cr := &countingReader{r: bufio.NewReaderSize(r, 1<<16)}
	hdr, err := cr.full(12)
	if err != nil {
		return fmt.Errorf("%w: stream header: %w", errXZ, err)
	}
	if !bytes.Equal(hdr[:6], xzMagic) {
		return fmt.Errorf("%w: not an xz stream", errXZ)
	}
	if crc32.ChecksumIEEE(hdr[6:8]) != binary.LittleEndian.Uint32(hdr[8:12]) {
		return fmt.Errorf("%w: stream header CRC mismatch", errXZ)
	}
	if hdr[6] != 0 || hdr[7]&0xf0 != 0 {
		return fmt.Errorf("%w: unsupported stream flags %#x%02x", errXZ, hdr[6], hdr[7])
	}
	newCheck, checkSize, err := xzCheck(hdr[7] & 0x0f)
	if err != nil {
		return err
	}
	for {
		size, err := cr.ReadByte()
		if err != nil {
			return fmt.Errorf("%w: block header: %w", errXZ, io.ErrUnexpectedEOF)
		}
		if size == 0 {
			return nil // the index: no more blocks
		}
		if err := decodeXZBlock(cr, int(size)*4+4, newCheck, checkSize, w); err != nil {
			return err
		}
	}
}

// xzCheck returns a hash for the stream's check type and its size.
func xzCheck(id byte) (func() hash.Hash, int, error) {
	switch id {
	case 0x00:
		return nil, 0, nil
	case 0x01:
		return func() hash.Hash { return crc32.NewIEEE() }, 4, nil
	case 0x04:
		return func() hash.Hash { return crc64.New(crc64.MakeTable(crc64.ECMA)) }, 8, nil
	case 0x0a:
		return sha256.New, 32, nil
	}
	return nil, 0, fmt.Errorf("%w: unsupported check type %#x", errXZ, id)
}

// decodeXZBlock decodes one block whose header (hdrSize bytes, the size
// byte already read) starts the reader.
func decodeXZBlock(cr *countingReader, hdrSize int, newCheck func() hash.Hash, checkSize int, w io.Writer) error {
	rest, err := cr.full(hdrSize - 1)
	if err != nil {
		return fmt.Errorf("%w: block header: %w", errXZ, err)
	}
	hdr := append([]byte{byte((hdrSize - 4) / 4)}, rest...)
	body, sum := hdr[:len(hdr)-4], binary.LittleEndian.Uint32(hdr[len(hdr)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return fmt.Errorf("%w: block header CRC mismatch", errXZ)
	}
	flags := body[1]
	if flags&0x3c != 0 {
		return fmt.Errorf("%w: reserved block flags %#x", errXZ, flags)
	}
	p := body[2:]
	uvarint := func() (uint64, error) {
		v, n := binary.Uvarint(p)
		if n <= 0 {
			return 0, fmt.Errorf("%w: bad block header", errXZ)
		}
		p = p[n:]
		return v, nil
	}
	compressedSize, uncompressedSize := int64(-1), int64(-1)
	if flags&0x40 != 0 {
		v, err := uvarint()
		if err != nil {
			return err
		}
		compressedSize = int64(v)
	}
	if flags&0x80 != 0 {
		v, err := uvarint()
		if err != nil {
			return err
		}
		uncompressedSize = int64(v)
	}
	var (
		bcj     bool
		bcjBase uint32
		dictCap = -1
	)
	nfilters := int(flags&0x03) + 1
	for i := 0; i < nfilters; i++ {
		id, err := uvarint()
		if err != nil {
			return err
		}
		psize, err := uvarint()
		if err != nil {
			return err
		}
		if uint64(len(p)) < psize {
			return fmt.Errorf("%w: bad block header", errXZ)
		}
		props := p[:psize]
		p = p[psize:]
		last := i == nfilters-1
		switch {
		case id == xzFilterX86 && !last && !bcj:
			switch len(props) {
			case 0:
			case 4:
				bcjBase = binary.LittleEndian.Uint32(props)
			default:
				return fmt.Errorf("%w: x86 BCJ filter properties of %d bytes", errXZ, len(props))
			}
			bcj = true
		case id == xzFilterLZMA2 && last:
			if len(props) != 1 || props[0] > 40 {
				return fmt.Errorf("%w: bad LZMA2 properties", errXZ)
			}
			dictCap = lzma2DictSize(props[0])
		default:
			return fmt.Errorf("%w: unsupported filter chain (filter %#x at %d of %d; supported: x86 BCJ, LZMA2)", errXZ, id, i+1, nfilters)
		}
	}
	for _, b := range p {
		if b != 0 {
			return fmt.Errorf("%w: block header padding is not zero", errXZ)
		}
	}
	if dictCap < 0 {
		return fmt.Errorf("%w: block without LZMA2", errXZ)
	}
	if dictCap > maxDictCap {
		return fmt.Errorf("%w: LZMA2 dictionary of %d MiB (at most %d MiB is accepted)", errXZ, dictCap>>20, maxDictCap>>20)
	}
	// LZMA2 decoders need a dictionary of at least 4 KiB.
	dictCap = max(dictCap, lzma.MinDictCap)

	start := cr.n
	lr, err := lzma.Reader2Config{DictCap: dictCap}.NewReader2(cr)
	if err != nil {
		return fmt.Errorf("%w: LZMA2: %w", errXZ, err)
	}
	var check hash.Hash
	out := w
	if newCheck != nil {
		check = newCheck()
		out = io.MultiWriter(w, check)
	}
	var dst io.Writer = out
	var bw *bcjWriter
	if bcj {
		bw = &bcjWriter{w: out, pos: bcjBase}
		dst = bw
	}
	n, err := io.Copy(dst, lr)
	if err != nil {
		return fmt.Errorf("%w: LZMA2: %w", errXZ, err)
	}
	if bw != nil {
		if err := bw.Close(); err != nil {
			return err
		}
	}
	if uncompressedSize >= 0 && n != uncompressedSize {
		return fmt.Errorf("%w: block holds %d bytes, its header says %d", errXZ, n, uncompressedSize)
	}
	csize := cr.n - start
	if compressedSize >= 0 && csize != compressedSize {
		return fmt.Errorf("%w: block's compressed data is %d bytes, its header says %d", errXZ, csize, compressedSize)
	}
	if pad := (4 - csize%4) % 4; pad > 0 {
		b, err := cr.full(int(pad))
		if err != nil {
			return fmt.Errorf("%w: block padding: %w", errXZ, err)
		}
		for _, c := range b {
			if c != 0 {
				return fmt.Errorf("%w: block padding is not zero", errXZ)
			}
		}
	}
	want, err := cr.full(checkSize)
	if err != nil {
		return fmt.Errorf("%w: block check: %w", errXZ, err)
	}
	if check != nil {
		got := check.Sum(nil)
		if checkSize != 32 { // CRC32 and CRC64 are stored little-endian
			slicesReverse(got)
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%w: block check mismatch: the data is corrupt", errXZ)
		}
	}
	return nil
}

// lzma2DictSize decodes LZMA2's one-byte dictionary size (40 is 4 GiB - 1).
func lzma2DictSize(b byte) int {
	if b == 40 {
		return 1<<32 - 1
	}
	return (2 | int(b)&1) << (b/2 + 11)
}

func slicesReverse(b []byte) {
	for i, j := 0, len(b)-1; i < j; i, j = i+1, j-1 {
		b[i], b[j] = b[j], b[i]
	}
}

// bcjWriter undoes the x86 BCJ filter on what is written through it. The
// filter turned the relative targets of CALL (E8) and JMP (E9) into
// absolute ones, so that repeated calls to one function compress well;
// decoding turns them back. An instruction may straddle two writes: up to
// four bytes wait for the next write, and Close flushes them as they are
// (the filter leaves a stream's last four bytes alone).
type bcjWriter struct {
	w        io.Writer
	pos      uint32 // stream position of buf[0]
	prevMask uint32
	buf      []byte
}

func (b *bcjWriter) Write(p []byte) (int, error) {
	b.buf = append(b.buf, p...)
	n := bcjX86(b.buf, b.pos, &b.prevMask)
	if n > 0 {
		if _, err := b.w.Write(b.buf[:n]); err != nil {
			return 0, err
		}
		b.pos += uint32(n)
		b.buf = append(b.buf[:0], b.buf[n:]...)
	}
	return len(p), nil
}

// Close writes the bytes the filter never changes (fewer than five at the
// end).
func (b *bcjWriter) Close() error {
	_, err := b.w.Write(b.buf)
	b.buf = nil
	return err
}

// bcjX86 decodes buf in place, buf[0] being at stream position pos, and
// returns how many bytes are final; the rest (at most four) must be
// passed again with what follows. prevMask carries the filter's state
// between calls. This is the decoder of xz-embedded's xz_dec_bcj.c.
func bcjX86(buf []byte, pos uint32, prevMask *uint32) int {
	maskToAllowed := [8]bool{true, true, true, false, true, false, false, false}
	maskToBitNum := [8]uint32{0, 1, 2, 2, 3, 3, 3, 3}
	msbyte := func(b byte) bool { return b == 0x00 || b == 0xff }

	if len(buf) <= 4 {
		return 0
	}
	size := len(buf) - 4
	prevPos := -1
	mask := *prevMask
	i := 0
	for ; i < size; i++ {
		if buf[i]&0xfe != 0xe8 {
			continue
		}
		d := i - prevPos
		if d > 3 {
			mask = 0
		} else {
			mask = (mask << (d - 1)) & 7
			if mask != 0 {
				b := buf[i+4-int(maskToBitNum[mask])]
				if !maskToAllowed[mask] || msbyte(b) {
					prevPos = i
					mask = mask<<1 | 1
					continue
				}
			}
		}
		prevPos = i
		if !msbyte(buf[i+4]) {
			mask = mask<<1 | 1
			continue
		}
		src := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = src - (pos + uint32(i) + 5)
			if mask == 0 {
				break
			}
			j := maskToBitNum[mask] * 8
			if !msbyte(byte(dest >> (24 - j))) {
				break
			}
			src = dest ^ (1<<(32-j) - 1)
		}
		dest &= 0x01ffffff
		dest |= -(dest & 0x01000000)
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 4
	}
	if d := i - prevPos; d > 3 {
		*prevMask = 0
	} else {
		*prevMask = mask << (d - 1)
	}
	return i
}
