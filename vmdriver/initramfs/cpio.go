package initramfs

import (
	"fmt"
	"io"
	"strings"
)

// cpioWriter writes the "newc" (SVR4, no checksum) cpio format, the only
// one the kernel's initramfs unpacker reads. Entries carry fixed owners
// (root) and times (zero) so the same inputs give the same bytes.
type cpioWriter struct {
	w   io.Writer
	ino uint32
	n   int64 // bytes written, for padding
	err error
}

const (
	cpioMagic   = "070701"
	cpioTrailer = "TRAILER!!!"
	sIFDIR      = 0o040000
	sIFREG      = 0o100000
	sIFLNK      = 0o120000
	sIFCHR      = 0o020000
)

func newCPIOWriter(w io.Writer) *cpioWriter { return &cpioWriter{w: w} }

// Dir adds a directory. The kernel does not create missing parents, so
// callers add parents first.
func (c *cpioWriter) Dir(name string, perm uint32) { c.entry(name, sIFDIR|perm, 2, 0, 0, nil) }

// File adds a regular file.
func (c *cpioWriter) File(name string, perm uint32, data []byte) {
	c.entry(name, sIFREG|perm, 1, 0, 0, data)
}

// Symlink adds a symbolic link to target.
func (c *cpioWriter) Symlink(name, target string) {
	c.entry(name, sIFLNK|0o777, 1, 0, 0, []byte(target))
}

// CharDev adds a character device node.
func (c *cpioWriter) CharDev(name string, perm, major, minor uint32) {
	c.entry(name, sIFCHR|perm, 1, major, minor, nil)
}

// Close writes the trailer and returns the first error of any write. It
// does not close the underlying writer.
func (c *cpioWriter) Close() error {
	c.ino = 0
	c.entry(cpioTrailer, 0, 1, 0, 0, nil)
	return c.err
}

func (c *cpioWriter) entry(name string, mode, nlink, rmajor, rminor uint32, data []byte) {
	if c.err != nil {
		return
	}
	name = strings.TrimPrefix(name, "/")
	if name == "" || strings.IndexByte(name, 0) >= 0 {
		c.err = fmt.Errorf("cpio: invalid entry name %q", name)
		return
	}
	if uint64(len(data)) > 0xffffffff {
		c.err = fmt.Errorf("cpio: %s is too large for newc (%d bytes)", name, len(data))
		return
	}
	ino := uint32(0)
	if name != cpioTrailer {
		c.ino++
		ino = c.ino
	}
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		cpioMagic,
		ino, mode, 0, 0, nlink, 0, // ino, mode, uid, gid, nlink, mtime
		len(data), 0, 0, rmajor, rminor, // filesize, devmajor, devminor, rdevmajor, rdevminor
		len(name)+1, 0) // namesize (with NUL), check
	c.write([]byte(hdr))
	c.write([]byte(name))
	c.write([]byte{0})
	c.pad()
	c.write(data)
	c.pad()
}

// pad aligns to 4 bytes: the header plus name, and the data, each end on a
// 4-byte boundary in newc.
func (c *cpioWriter) pad() {
	if r := c.n % 4; r != 0 {
		c.write(make([]byte, 4-r))
	}
}

func (c *cpioWriter) write(b []byte) {
	if c.err != nil || len(b) == 0 {
		return
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	if err != nil {
		c.err = fmt.Errorf("cpio: %w", err)
	}
}
