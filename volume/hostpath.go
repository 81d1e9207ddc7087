package volume

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// neverShared are host directories no workload gets, whatever the
// allowlist says: the whole host, and the kernel's and devices' views.
var neverShared = []string{"/proc", "/sys", "/dev"}

// within reports whether p is dir or below it (both clean and absolute).
func within(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

// refused says why the clean, absolute host path p may never be shared,
// or "" when it may be.
func refused(p, dataDir string) string {
	if p == "/" {
		return "/ is the whole host"
	}
	for _, d := range neverShared {
		if within(p, d) {
			return d + " is never shared with a workload"
		}
	}
	if dataDir != "" && (within(p, dataDir) || within(dataDir, p)) {
		return "it holds berth's data directory " + dataDir
	}
	return ""
}

// checkAllowlist validates volumes.host_paths against the canonical
// data directory: by name, and each directory that exists by what it is.
func checkAllowlist(dirs []string, g *guard) error {
	dataDir := g.dataDir
	for i, d := range dirs {
		key := fmt.Sprintf("volumes.host_paths[%d]", i)
		if !filepath.IsAbs(d) || filepath.Clean(d) != d {
			return fmt.Errorf("%s: %q is not a clean absolute path", key, d)
		}
		if why := refused(d, dataDir); why != "" {
			return fmt.Errorf("%s: %q cannot be allowed: %s", key, d, why)
		}
		if real, err := filepath.EvalSymlinks(d); err == nil {
			if why := refused(real, dataDir); why != "" {
				return fmt.Errorf("%s: %q (%s) cannot be allowed: %s", key, d, real, why)
			}
		}
		f, err := os.OpenFile(d, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // checked again, as it is then, at every submit
		}
		why, err := g.check(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %q: %w", key, d, err)
		}
		if why != "" {
			return fmt.Errorf("%s: %q cannot be allowed: %s", key, d, why)
		}
	}
	return nil
}

// CheckHostPath says why a workload may not mount the host directory p
// (an ErrInvalidArgument naming the reason), or nil: p must be under one
// of volumes.host_paths, reached from it without a symlink leading out,
// never /, /proc, /sys, /dev, a pseudo filesystem or the data directory
// (by name or by identity), and a directory; one the workload may write
// (readOnly false) must be on a nosuid (or noexec) mount, and nodev too
// where the workload's side makes device nodes (devices: a VM's
// virtiofsd).
func (s *Store) CheckHostPath(p string, readOnly, devices bool) error {
	f, err := s.openHostPath(p, readOnly, devices)
	if err != nil {
		return err
	}
	return f.Close()
}

// openHostPath opens the host directory p (O_PATH) as CheckHostPath
// checks it. The file is what gets mounted (through /proc/self/fd), so a
// path swapped for a symlink after the check changes nothing.
func (s *Store) openHostPath(p string, readOnly, devices bool) (*os.File, error) {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return nil, fmt.Errorf("host path %q is not a clean absolute path: %w", p, errdefs.ErrInvalidArgument)
	}
	if why := refused(p, s.guard.dataDir); why != "" {
		return nil, fmt.Errorf("host path %s is refused: %s: %w", p, why, errdefs.ErrInvalidArgument)
	}
	var root string
	for _, d := range s.opts.HostPaths {
		if within(p, d) && len(d) > len(root) {
			root = d
		}
	}
	if root == "" {
		allowed := "none are (the list is empty)"
		if len(s.opts.HostPaths) > 0 {
			allowed = "allowed: " + strings.Join(s.opts.HostPaths, ", ")
		}
		return nil, fmt.Errorf("host path %s is not under the operator's volumes.host_paths (%s): %w", p, allowed, errdefs.ErrInvalidArgument)
	}
	rel, err := filepath.Rel(root, p)
	if err != nil {
		return nil, fmt.Errorf("host path %s: %w: %w", p, err, errdefs.ErrInvalidArgument)
	}
	f, err := openBeneath(root, rel)
	switch {
	case errors.Is(err, unix.EXDEV), errors.Is(err, unix.ELOOP):
		return nil, fmt.Errorf("host path %s leads out of the allowed directory %s through a symlink: %w", p, root, errdefs.ErrInvalidArgument)
	case errors.Is(err, unix.ENOENT):
		return nil, fmt.Errorf("host path %s does not exist: %w", p, errdefs.ErrInvalidArgument)
	case errors.Is(err, unix.ENOTDIR):
		return nil, fmt.Errorf("host path %s is not a directory: %w", p, errdefs.ErrInvalidArgument)
	case err != nil:
		return nil, fmt.Errorf("host path %s: %w: %w", p, err, errdefs.ErrInvalidArgument)
	}
	// What the path resolved to, through symlinks that stayed inside the
	// allowed directory, is held to the same rules.
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
	if err == nil {
		if why := refused(real, s.guard.dataDir); why != "" {
			f.Close()
			return nil, fmt.Errorf("host path %s (%s) is refused: %s: %w", p, real, why, errdefs.ErrInvalidArgument)
		}
	}
	// Names can lie (bind mounts); what was opened cannot.
	why, err := s.guard.check(f)
	if err == nil && why == "" && !readOnly {
		why, err = checkWritable(f, p, devices)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("host path %s: %w", p, err)
	}
	if why != "" {
		f.Close()
		return nil, fmt.Errorf("host path %s is refused: %s: %w", p, why, errdefs.ErrInvalidArgument)
	}
	return f, nil
}

// openBeneath opens the directory rel below root without leaving root:
// openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS), where an absolute
// symlink or a '..' climbing out fails with EXDEV. Where the kernel has
// no openat2 an os.Root does the same.
func openBeneath(root, rel string) (*os.File, error) {
	dirfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(dirfd)
	fd, err := unix.Openat2(dirfd, rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_MAGICLINKS,
	})
	if errors.Is(err, unix.ENOSYS) {
		r, err := os.OpenRoot(root)
		if err != nil {
			return nil, err
		}
		defer r.Close()
		f, err := r.OpenFile(rel, os.O_RDONLY|unix.O_DIRECTORY, 0)
		if err != nil && strings.Contains(err.Error(), "escapes") {
			return nil, unix.EXDEV
		}
		return f, err
	}
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), filepath.Join(root, rel)), nil
}
