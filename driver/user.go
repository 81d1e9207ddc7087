package driver

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// MaxImageFileSize bounds an image file berth reads on the host
// (etc/passwd, etc/group): even large directories of users fit in it.
const MaxImageFileSize = 4 << 20

// ResolveUser turns an image's user ("name", "uid", "name:group",
// "uid:gid") into numeric ids, looking names up in the image's own
// /etc/passwd and /etc/group (never the host's). Empty means root.
//
// The files are read through a handle confined to rootfs (see
// ReadImageFile): an image's symlinks resolve inside the image, and a
// FIFO, a device or an oversized file is refused, never opened for reading
// or read whole.
func ResolveUser(rootfs, user string) (uid, gid uint32, err error) {
	if user == "" {
		return 0, 0, nil
	}
	u, g, hasGroup := strings.Cut(user, ":")
	uid, pwGID, err := lookup(rootfs, "etc/passwd", u, true)
	if err != nil {
		return 0, 0, err
	}
	gid = pwGID
	if hasGroup {
		gid, _, err = lookup(rootfs, "etc/group", g, false)
		if err != nil {
			return 0, 0, err
		}
	}
	return uid, gid, nil
}

// lookup finds name (or a number) in a passwd- or group-format file of the
// image. For a number in passwd the primary group comes from the file when
// listed, else equals the uid's group 0 as runc does.
func lookup(rootfs, file, name string, passwd bool) (id, primaryGID uint32, err error) {
	if n, perr := strconv.ParseUint(name, 10, 32); perr == nil {
		id = uint32(n)
		if !passwd {
			return id, 0, nil
		}
	}
	data, ferr := ReadImageFile(rootfs, file, MaxImageFileSize)
	if errors.Is(ferr, fs.ErrNotExist) {
		if id != 0 || name == "0" {
			return id, 0, nil
		}
		return 0, 0, fmt.Errorf("user %q: image has no /%s: %w", name, file, errdefs.ErrInvalidArgument)
	}
	if ferr != nil {
		return 0, 0, ferr
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), MaxImageFileSize)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 {
			continue
		}
		if fields[0] != name && fields[2] != name {
			continue
		}
		n, perr := strconv.ParseUint(fields[2], 10, 32)
		if perr != nil {
			continue
		}
		if passwd && len(fields) >= 4 {
			g, gerr := strconv.ParseUint(fields[3], 10, 32)
			if gerr == nil {
				primaryGID = uint32(g)
			}
		}
		return uint32(n), primaryGID, nil
	}
	if _, perr := strconv.ParseUint(name, 10, 32); perr == nil {
		return id, 0, nil
	}
	return 0, 0, fmt.Errorf("user or group %q not found in the image's /%s: %w", name, file, errdefs.ErrInvalidArgument)
}

// ReadImageFile reads the regular file name (a path relative to the
// image's root) of the image unpacked at rootfs, as the image itself would
// see it: every symlink on the way, absolute ones included, resolves
// inside rootfs (openat2 RESOLVE_IN_ROOT, or os.Root where the kernel has
// no openat2), so an image cannot make berth read a host file. Anything
// but a regular file (a FIFO that would block, a device, a socket, a
// directory) and a file larger than limit bytes are refused with an
// ErrInvalidArgument naming the file; a missing file is an fs.ErrNotExist.
func ReadImageFile(rootfs, name string, limit int64) ([]byte, error) {
	f, err := openInRoot(rootfs, name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if errors.Is(err, unix.ENOTDIR) { // a path component is a file: there is no such file
			return nil, fmt.Errorf("image file /%s: %w", name, fs.ErrNotExist)
		}
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) || errors.Is(err, unix.ENXIO) || isEscape(err) {
			return nil, fmt.Errorf("image file /%s cannot be read safely (%v): %w", name, err, errdefs.ErrInvalidArgument)
		}
		return nil, fmt.Errorf("image file /%s: %w", name, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("image file /%s: %w", name, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("image file /%s is %s, not a regular file: %w", name, fileType(fi.Mode()), errdefs.ErrInvalidArgument)
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("image file /%s is %d bytes, more than the %d berth reads: %w", name, fi.Size(), limit, errdefs.ErrInvalidArgument)
	}
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("image file /%s: %w", name, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("image file /%s is more than the %d bytes berth reads: %w", name, limit, errdefs.ErrInvalidArgument)
	}
	return data, nil
}

// openInRoot opens name under rootfs for reading without blocking (a FIFO
// opens at once and is then refused), following symlinks only within
// rootfs and never across a mount.
func openInRoot(rootfs, name string) (*os.File, error) {
	dir, err := unix.Open(rootfs, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: rootfs, Err: err}
	}
	defer unix.Close(dir)
	how := &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOCTTY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV,
	}
	fd, err := unix.Openat2(dir, name, how)
	// EAGAIN: a rename raced the lookup; EINTR: a signal did.
	for try := 0; try < 8 && (errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR)); try++ {
		fd, err = unix.Openat2(dir, name, how)
	}
	switch {
	case err == nil:
		return os.NewFile(uintptr(fd), rootfs+"/"+name), nil
	case errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM):
		// No openat2 (Linux before 5.6, or a seccomp filter): os.Root also
		// stays in the tree; it refuses absolute symlinks instead of
		// resolving them in the root.
		root, rerr := os.OpenRoot(rootfs)
		if rerr != nil {
			return nil, rerr
		}
		defer root.Close()
		return root.OpenFile(name, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	default:
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
}

// isEscape reports os.Root's refusal to leave the tree.
func isEscape(err error) bool {
	return strings.Contains(err.Error(), "escapes from parent")
}

func fileType(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeDevice != 0:
		return "a device"
	}
	return "special (" + m.Type().String() + ")"
}
