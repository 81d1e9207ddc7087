// Package qcow2 recognizes QEMU's copy-on-write disk format by its magic,
// for the image store (is an upload a disk?) and the VM driver (is this
// path one?) alike, without either depending on the other, and writes the
// empty copy-on-write overlays the VM driver boots workloads on.
package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// Magic starts every qcow2 file.
const Magic = "QFI\xfb"

// Is reports whether head, the first bytes of a file or stream, is qcow2's.
func Is(head []byte) bool { return bytes.HasPrefix(head, []byte(Magic)) }

// IsFile reports whether the file at path is qcow2. A file too short to
// hold the magic is not; only a failure to read it is an error.
func IsFile(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	head := make([]byte, len(Magic))
	if _, err := io.ReadFull(f, head); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return false, nil
		}
		return false, err
	}
	return Is(head), nil
}

// Overlay geometry: 64 KiB clusters (qemu-img's default), 16-bit
// refcounts; the header, the refcount table, one refcount block and the
// L1 table each take a cluster of their own.
const (
	clusterBits  = 16
	clusterSize  = 1 << clusterBits
	l2Coverage   = clusterSize / 8 * clusterSize // bytes one L2 table maps
	headerLength = 112
	// Header extension types.
	extBackingFormat = 0xe2792aca
	extEnd           = 0
)

// CreateOverlay writes at path (which must not exist) an empty qcow2
// version 3 image of size bytes whose reads fall through to backing, an
// image in backingFormat ("raw", "qcow2") named by its absolute path:
// what `qemu-img create -f qcow2 -F FORMAT -b BACKING PATH SIZE` makes, in
// four clusters, without starting qemu-img.
func CreateOverlay(path, backing, backingFormat string, size int64) (err error) {
	if !filepath.IsAbs(backing) {
		return fmt.Errorf("qcow2: backing file %q is not an absolute path", backing)
	}
	if size <= 0 || size%512 != 0 {
		return fmt.Errorf("qcow2: virtual size %d is not a positive multiple of 512", size)
	}
	if backingFormat == "" || len(backingFormat) > 16 {
		return fmt.Errorf("qcow2: backing format %q", backingFormat)
	}
	l1Entries := (size + l2Coverage - 1) / l2Coverage
	l1Clusters := (l1Entries*8 + clusterSize - 1) / clusterSize
	const (
		refTableOff = 1 * clusterSize
		refBlockOff = 2 * clusterSize
		l1Off       = 3 * clusterSize
	)
	clusters := 3 + l1Clusters
	if clusters > clusterSize/2 { // one refcount block counts 32768 clusters
		return fmt.Errorf("qcow2: virtual size %d needs too large an L1 table", size)
	}

	hdr := make([]byte, clusterSize)
	be := binary.BigEndian
	copy(hdr, Magic)
	be.PutUint32(hdr[4:], 3) // version
	// backing_file_offset, _size: after the header and its extensions.
	ext := make([]byte, 0, 64)
	ext = be.AppendUint32(ext, extBackingFormat)
	ext = be.AppendUint32(ext, uint32(len(backingFormat)))
	ext = append(ext, backingFormat...)
	for len(ext)%8 != 0 {
		ext = append(ext, 0)
	}
	ext = be.AppendUint32(ext, extEnd)
	ext = be.AppendUint32(ext, 0)
	backingOff := headerLength + len(ext)
	if backingOff+len(backing) > clusterSize {
		return fmt.Errorf("qcow2: backing file name too long")
	}
	be.PutUint64(hdr[8:], uint64(backingOff))
	be.PutUint32(hdr[16:], uint32(len(backing)))
	be.PutUint32(hdr[20:], clusterBits)
	be.PutUint64(hdr[24:], uint64(size))
	be.PutUint32(hdr[32:], 0) // no encryption
	be.PutUint32(hdr[36:], uint32(l1Entries))
	be.PutUint64(hdr[40:], l1Off)
	be.PutUint64(hdr[48:], refTableOff)
	be.PutUint32(hdr[56:], 1) // refcount table clusters
	// nb_snapshots, snapshots_offset, incompatible, compatible and
	// autoclear features: all zero.
	be.PutUint32(hdr[96:], 4) // refcount_order: 16-bit refcounts
	be.PutUint32(hdr[100:], headerLength)
	hdr[104] = 0 // compression type: zlib
	copy(hdr[headerLength:], ext)
	copy(hdr[backingOff:], backing)

	refTable := make([]byte, clusterSize)
	be.PutUint64(refTable, refBlockOff)
	refBlock := make([]byte, clusterSize)
	for i := range clusters {
		be.PutUint16(refBlock[2*i:], 1)
	}

	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(path)
		}
	}()
	for _, c := range []struct {
		off  int64
		data []byte
	}{{0, hdr}, {refTableOff, refTable}, {refBlockOff, refBlock}} {
		if _, err := f.WriteAt(c.data, c.off); err != nil {
			return err
		}
	}
	// The L1 table is all zeros (nothing allocated): the file's length
	// makes it.
	return f.Truncate(l1Off + l1Clusters*clusterSize)
}

// VirtualSize reads the virtual size from a qcow2 image's header.
func VirtualSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	hdr := make([]byte, 32)
	if _, err := io.ReadFull(f, hdr); err != nil {
		return 0, fmt.Errorf("qcow2: read header of %s: %w", path, err)
	}
	if !Is(hdr) {
		return 0, fmt.Errorf("qcow2: %s is not a qcow2 image", path)
	}
	return int64(binary.BigEndian.Uint64(hdr[24:])), nil
}
