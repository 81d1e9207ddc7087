// Package qcow2 recognizes QEMU's copy-on-write disk format by its magic,
// for the image store (is an upload a disk?) and the VM driver (is this
// path one?) alike, without either depending on the other.
package qcow2

import (
	"bytes"
	"errors"
	"io"
	"os"
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
