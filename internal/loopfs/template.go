package loopfs

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// Templates makes filesystems by copying an empty one of the same size and
// owner, made once with Create: an empty ext4 of 1 GiB is some 600 KiB of
// metadata in a sparse file, and copying those extents costs a workload's
// start far less than running mkfs.ext4 for it. The templates live in dir,
// one per size and owner, and are never changed once made.
type Templates struct {
	dir string
	mu  sync.Mutex // serializes making a template
}

// NewTemplates keeps templates in dir (made 0700 if missing).
func NewTemplates(dir string) (*Templates, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("loopfs: templates: %w", err)
	}
	return &Templates{dir: dir}, nil
}

// Create makes img as Create does, from a template.
func (t *Templates) Create(img string, size int64, uid, gid int) error {
	tpl, err := t.template(size, uid, gid)
	if err != nil {
		return err
	}
	if err := copySparse(tpl, img); err != nil {
		os.Remove(img)
		return fmt.Errorf("loopfs: copy template to %s: %w", img, err)
	}
	return nil
}

// template returns the template of size and owner, making it first if
// there is none yet.
func (t *Templates) template(size int64, uid, gid int) (string, error) {
	if size < MinBytes {
		return "", fmt.Errorf("loopfs: %d bytes is below the smallest filesystem, %d: %w", size, MinBytes, errdefs.ErrInvalidArgument)
	}
	name := filepath.Join(t.dir, "ext4-"+strconv.FormatInt(size, 10)+"-"+strconv.Itoa(uid)+"-"+strconv.Itoa(gid)+".img")
	if _, err := os.Stat(name); err == nil {
		return name, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, err := os.Stat(name); err == nil {
		return name, nil
	}
	tmp := name + ".tmp"
	os.Remove(tmp) // a crash's leftover
	if err := Create(tmp, size, uid, gid); err != nil {
		return "", err
	}
	// Whole before it has its name: a crash never leaves half a template.
	if f, err := os.Open(tmp); err == nil {
		err = f.Sync()
		f.Close()
		if err != nil {
			os.Remove(tmp)
			return "", fmt.Errorf("loopfs: template: %w", err)
		}
	}
	if err := os.Rename(tmp, name); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("loopfs: template: %w", err)
	}
	return name, nil
}

// copySparse copies src to a new file dst of the same size, extent by
// extent: holes stay holes.
func copySparse(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(fi.Size()); err != nil {
		return err
	}
	size := fi.Size()
	for off := int64(0); off < size; {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // nothing but a hole to the end
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if err := copyRange(in, out, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return out.Close()
}

// copyRange copies n bytes at off from in to out, in the kernel.
func copyRange(in, out *os.File, off, n int64) error {
	roff, woff := off, off
	for n > 0 {
		c, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil {
			return err
		}
		if c == 0 {
			return io.ErrUnexpectedEOF
		}
		n -= int64(c)
	}
	return nil
}
