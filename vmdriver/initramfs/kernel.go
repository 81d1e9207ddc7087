package initramfs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/berthd/berth/errdefs"
)

// Kernel is a guest kernel and the modules built for it.
type Kernel struct {
	// Path is the kernel image to boot directly (/boot/vmlinuz-<release>).
	Path string
	// Release is the kernel release (uname -r), e.g. "6.1.0-56-amd64".
	Release string
	// ModulesDir holds the release's modules and depmod's indexes
	// (/lib/modules/<release>).
	ModulesDir string
}

// FindKernel returns the newest kernel in bootDir (vmlinuz-<release>) whose
// modules are installed in modulesDir/<release>. A kernel without modules
// is skipped rather than chosen: berth's guest needs its virtio drivers, and
// a half-removed kernel package leaves exactly that behind.
func FindKernel(bootDir, modulesDir string) (Kernel, error) {
	matches, err := filepath.Glob(filepath.Join(bootDir, "vmlinuz-*"))
	if err != nil {
		return Kernel{}, fmt.Errorf("find kernel: %w", err)
	}
	var best Kernel
	for _, m := range matches {
		release := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		if release == "" {
			continue
		}
		if fi, err := os.Stat(m); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		mods := filepath.Join(modulesDir, release)
		if _, err := os.Stat(filepath.Join(mods, "modules.dep")); err != nil {
			continue
		}
		if best.Release == "" || compareReleases(release, best.Release) > 0 {
			best = Kernel{Path: m, Release: release, ModulesDir: mods}
		}
	}
	if best.Release == "" {
		return Kernel{}, fmt.Errorf("no kernel in %s with modules in %s (install linux-image-amd64): %w",
			bootDir, modulesDir, errdefs.ErrNotFound)
	}
	return best, nil
}

// compareReleases orders kernel releases the way their versions order:
// runs of digits compare as numbers ("6.10" > "6.9", "-56-" > "-9-"),
// anything else byte by byte.
func compareReleases(a, b string) int {
	for a != "" && b != "" {
		ta, ra := nextToken(a)
		tb, rb := nextToken(b)
		a, b = ra, rb
		na, errA := strconv.ParseUint(ta, 10, 64)
		nb, errB := strconv.ParseUint(tb, 10, 64)
		switch {
		case errA == nil && errB == nil:
			if na != nb {
				if na < nb {
					return -1
				}
				return 1
			}
		case errA == nil:
			return 1 // a number outranks a suffix: "6.1.1" > "6.1.rc"
		case errB == nil:
			return -1
		default:
			if c := strings.Compare(ta, tb); c != 0 {
				return c
			}
		}
	}
	return strings.Compare(a, b) // the longer remainder is newer
}

// nextToken splits s into its first run of digits or of non-digits and the
// rest.
func nextToken(s string) (tok, rest string) {
	digit := s[0] >= '0' && s[0] <= '9'
	i := 1
	for i < len(s) && (s[i] >= '0' && s[i] <= '9') == digit {
		i++
	}
	return s[:i], s[i:]
}
