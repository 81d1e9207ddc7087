package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// extract writes the flattened filesystem of img into the empty directory
// dir. mutate.Extract applies whiteouts and opaque directories and yields
// each path once, upper layers first.
func extract(ctx context.Context, img v1.Image, dir string, b *budget) error {
	rc := mutate.Extract(img)
	// Closing the pipe early stops mutate.Extract's goroutine.
	defer rc.Close()
	return extractTar(ctx, rc, dir, b)
}

// extractTar writes the entries of a flattened tar stream into dir through
// an os.Root, so nothing can land outside dir whatever the stream holds.
// Every entry is counted against b before anything of it is written.
func extractTar(ctx context.Context, r io.Reader, dir string, b *budget) error {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	x := &extractor{root: root, budget: b}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return context.Cause(ctx)
		}
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return classify("", err)
		}
		if err := x.entry(hdr, tr); err != nil {
			return err
		}
	}
	// mutate.Extract writes the tar trailer even when a layer fails (a bad
	// digest, a broken tar), and reports the failure only after it: read on
	// to the end of the stream, or a corrupt image would unpack "fine".
	if _, err := io.Copy(io.Discard, r); err != nil {
		return classify("", err)
	}
	if err := x.linkAll(); err != nil {
		return err
	}
	// Directory mtimes last: creating entries inside a directory bumps it.
	for _, d := range x.dirs {
		if err := root.Chtimes(d.name, d.mtime, d.mtime); err != nil {
			return classify(d.name, err)
		}
	}
	return nil
}

type extractor struct {
	root   *os.Root
	budget *budget
	dirs   []dirTime
	links  []hardlink
}

type dirTime struct {
	name  string
	mtime time.Time
}

type hardlink struct{ name, target string }

// permBits are the mode bits a rootfs keeps.
const permBits = fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky

func (x *extractor) entry(hdr *tar.Header, r io.Reader) error {
	name, err := cleanEntryName(hdr.Name)
	if err != nil {
		return err
	}
	perm := hdr.FileInfo().Mode() & permBits
	if x.budget != nil {
		var size int64
		if hdr.Typeflag == tar.TypeReg || hdr.Typeflag == tar.TypeGNUSparse {
			size = hdr.Size
		}
		if err := x.budget.entry(size); err != nil {
			return err
		}
	}

	// The stream is upper layers first and holds each path once, so an
	// existing path was made by an upper layer, or is a directory implied by
	// one of its entries. It wins, except that a directory entry supplies the
	// metadata of a directory we had to create without it.
	existing, err := x.root.Lstat(name)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return classify(name, err)
	}
	exists := err == nil
	if exists && !(hdr.Typeflag == tar.TypeDir && existing.IsDir()) {
		return nil
	}
	if name != "." {
		if err := x.root.MkdirAll(path.Dir(name), 0o755); err != nil {
			return classify(name, err)
		}
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		if !exists {
			if err := x.root.Mkdir(name, 0o700); err != nil {
				return classify(name, err)
			}
		}
		if err := x.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return classify(name, err)
		}
		if err := x.root.Chmod(name, perm); err != nil {
			return classify(name, err)
		}
		x.dirs = append(x.dirs, dirTime{name, hdr.ModTime})

	case tar.TypeReg, tar.TypeGNUSparse: // the tar reader expands sparse files
		f, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return classify(name, err)
		}
		err = writeFile(f, hdr, r, perm, x.budget)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return classify(name, err)
		}
		if err := x.root.Chtimes(name, hdr.ModTime, hdr.ModTime); err != nil {
			return classify(name, err)
		}

	case tar.TypeSymlink:
		// The target is not checked: it is resolved inside the container,
		// and os.Root refuses to follow it out of dir while extracting.
		if err := x.root.Symlink(hdr.Linkname, name); err != nil {
			return classify(name, err)
		}
		if err := x.root.Lchown(name, hdr.Uid, hdr.Gid); err != nil {
			return classify(name, err)
		}

	case tar.TypeLink:
		target, err := cleanEntryName(hdr.Linkname)
		if err != nil {
			return fmt.Errorf("hardlink %q: %w", name, err)
		}
		// The target may come later in the stream (from a lower layer).
		x.links = append(x.links, hardlink{name, target})

	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		// Skipped on purpose: the runtime and the guest init provide /dev,
		// and an image must not plant device nodes on the host.
	default:
		// Nothing else describes filesystem content.
	}
	return nil
}

// writeFile fills a new regular file and sets its owner, mode and extended
// attributes, in the order that keeps them: chown clears setuid bits and
// file capabilities, so those come after it.
func writeFile(f *os.File, hdr *tar.Header, r io.Reader, perm fs.FileMode, b *budget) error {
	var floor func() error
	if b != nil {
		floor = b.s.DiskPressure
	}
	if err := copySparse(f, io.LimitReader(r, hdr.Size), hdr.Size, floor); err != nil {
		return err
	}
	if err := f.Chown(hdr.Uid, hdr.Gid); err != nil {
		return err
	}
	if err := f.Chmod(perm); err != nil {
		return err
	}
	for key, value := range hdr.PAXRecords {
		attr, ok := strings.CutPrefix(key, "SCHILY.xattr.")
		if !ok {
			continue
		}
		err := unix.Fsetxattr(int(f.Fd()), attr, []byte(value), 0)
		if err != nil && !errors.Is(err, unix.ENOTSUP) {
			return fmt.Errorf("set extended attribute %s: %w", attr, err)
		}
	}
	return nil
}

// linkAll creates the hardlinks once every regular file exists. A link may
// point at another link, so retry until nothing more can be made.
func (x *extractor) linkAll() error {
	pending := x.links
	for len(pending) > 0 {
		var next []hardlink
		var lastErr error
		for _, l := range pending {
			if _, err := x.root.Lstat(l.name); err == nil {
				continue // an upper layer's entry wins
			}
			fi, err := x.root.Lstat(l.target)
			if errors.Is(err, fs.ErrNotExist) {
				next = append(next, l)
				lastErr = fmt.Errorf("%w: hardlink %q points to %q, which the image does not contain", errdefs.ErrInvalidArgument, l.name, l.target)
				continue
			}
			if err != nil {
				return classify(l.name, err)
			}
			if fi.IsDir() {
				return fmt.Errorf("%w: hardlink %q points to directory %q", errdefs.ErrInvalidArgument, l.name, l.target)
			}
			if err := x.root.Link(l.target, l.name); err != nil {
				return classify(l.name, err)
			}
		}
		if len(next) == len(pending) {
			return lastErr
		}
		pending = next
	}
	return nil
}

// cleanEntryName returns the path of an entry relative to the rootfs,
// refusing absolute names and names that climb out with "..".
func cleanEntryName(name string) (string, error) {
	if path.IsAbs(name) {
		return "", fmt.Errorf("%w: layer entry %q has an absolute name; image layers use relative names", errdefs.ErrInvalidArgument, name)
	}
	clean := path.Clean(name)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("%w: layer entry %q points outside the image's root filesystem", errdefs.ErrInvalidArgument, name)
	}
	return clean, nil
}

// classify tells a hostile or broken layer (ErrInvalidArgument) from a
// failing host. Host failures carry an errno (ENOSPC, EIO, ...); os.Root's
// refusal to leave the tree and errors from decoding the layers do not.
func classify(name string, err error) error {
	if errors.Is(err, errdefs.ErrResourceExhausted) {
		return err // a budget or the free-space floor
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: the data directory is full: %w", errdefs.ErrResourceExhausted, err)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		if name == "" {
			return err
		}
		return fmt.Errorf("%s: %w", name, err)
	}
	if errors.Is(err, errdefs.ErrInvalidArgument) {
		return err
	}
	var pathErr *fs.PathError
	var linkErr *os.LinkError
	if errors.As(err, &pathErr) || errors.As(err, &linkErr) {
		return fmt.Errorf("%w: layer entry %q resolves outside the image's root filesystem (through a symlink): %w", errdefs.ErrInvalidArgument, name, err)
	}
	return fmt.Errorf("%w: image layers are corrupt or unsafe: %w", errdefs.ErrInvalidArgument, err)
}

// syncFS flushes the filesystem holding dir, so a rename that publishes a
// freshly unpacked tree cannot outlive its contents in a crash.
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// sparseChunk is the unit copySparse writes or skips: runs of zeros this
// long (aligned to it) become holes.
const sparseChunk = 64 << 10

// copySparse copies size bytes from r to the new, empty file f, leaving
// holes where whole chunks are zero: a sparse entry (or any file of zeros)
// takes the disk space of its data, not of its apparent size. floor, when
// set, is checked every floorCheckBytes actually written.
func copySparse(f *os.File, r io.Reader, size int64, floor func() error) error {
	buf := make([]byte, sparseChunk)
	var off, since int64
	for off < size {
		n, err := io.ReadFull(r, buf[:min(int64(len(buf)), size-off)])
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if !allZero(buf[:n]) {
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				return err
			}
			since += int64(n)
			if floor != nil && since >= floorCheckBytes {
				since = 0
				if err := floor(); err != nil {
					return err
				}
			}
		}
		off += int64(n)
	}
	// A trailing hole: the size comes from truncate, not from a write.
	return f.Truncate(size)
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
