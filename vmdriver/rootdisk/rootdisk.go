// Package rootdisk makes the block devices that carry a workload's root
// filesystem into its VM: one ext4 base image per OCI image, built once
// from the unpacked rootfs and shared read-only, and a qcow2 copy-on-write
// overlay per workload on top of it.
//
// A block device rather than a 9p/virtiofs share: the guest then talks to
// the host only through virtio-blk, the host never exposes a live directory
// tree to the guest kernel, and there is no host-side daemon to run.
package rootdisk

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/fileutil"
	"github.com/berthd/berth/internal/qcow2"
)

// formatVersion is part of every base image's cache name: bump it when the
// mkfs invocation changes so old bases are not reused.
const formatVersion = "berth-rootdisk/2"

// DefaultHeadroom is the free space added to a base image beyond what the
// tree needs, so workloads can write to their root filesystem. It costs
// nothing until used: the image is sparse and writes go to the overlay.
const DefaultHeadroom int64 = 512 << 20

const (
	blockSize = 4096
	inodeSize = 256
	// bytesPerInode matches mke2fs's default ratio for ext4, so the
	// headroom can hold as many new files as on any ext4 filesystem.
	bytesPerInode = 16384
	// fixedOverhead covers the journal (at most 64 MiB for images up to
	// 16 GiB with mke2fs's defaults), superblock copies, group descriptors
	// and bitmaps.
	fixedOverhead = 80 << 20
)

// Option tunes Base.
type Option func(*options)

type options struct {
	headroom int64
}

// WithHeadroom sets the free space added beyond the tree's size (default
// DefaultHeadroom).
func WithHeadroom(bytes int64) Option { return func(o *options) { o.headroom = bytes } }

// Base returns an ext4 image (raw, sparse) of rootfsDir, built once per key
// in cacheDir. key identifies the tree's content — the image digest — and
// is trusted: a second call with the same key (and headroom) returns the
// existing image without looking at rootfsDir again. The image is built in
// a temporary file and renamed into place, so readers never see a partial
// one, and concurrent callers (in one process or several) build it once:
// an existing base is never replaced, since overlays refer to it by path.
func Base(ctx context.Context, rootfsDir, key, cacheDir string, opts ...Option) (string, error) {
	o := options{headroom: DefaultHeadroom}
	for _, opt := range opts {
		opt(&o)
	}
	if key == "" || rootfsDir == "" || cacheDir == "" {
		return "", fmt.Errorf("rootdisk: rootfs dir, key and cache dir are required: %w", errdefs.ErrInvalidArgument)
	}
	if o.headroom < 0 {
		return "", fmt.Errorf("rootdisk: negative headroom %d: %w", o.headroom, errdefs.ErrInvalidArgument)
	}
	final := filepath.Join(cacheDir, baseName(key, o.headroom))
	if _, err := os.Stat(final); err == nil {
		return final, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("rootdisk: create cache dir: %w", err)
	}
	unlock, err := fileutil.Lock(ctx, final+".lock")
	if err != nil {
		return "", fmt.Errorf("rootdisk: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final, nil // built by whoever held the lock before us
	}
	if err := buildBase(ctx, rootfsDir, final, o); err != nil {
		return "", fmt.Errorf("rootdisk: base for %s: %w", key, err)
	}
	return final, nil
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9._-]+`)

// baseName is the cache file name for key: readable (the digest shows) and
// unique (a hash of everything that shapes the image).
func baseName(key string, headroom int64) string {
	h := sha256.Sum256([]byte(formatVersion + "\x00" + key + "\x00" + strconv.FormatInt(headroom, 10)))
	readable := unsafeChars.ReplaceAllString(key, "_")
	if len(readable) > 80 {
		readable = readable[:80]
	}
	return "base-" + readable + "-" + hex.EncodeToString(h[:6]) + ".ext4"
}

// treeUsage is what a directory tree needs on ext4.
type treeUsage struct {
	bytes  int64 // data blocks, rounded to the block size
	inodes int64
}

// measureTree sums the blocks and inodes rootfsDir needs. Hard links count
// once; symlinks short enough to live in the inode take no block.
func measureTree(root string) (treeUsage, error) {
	var u treeUsage
	seen := map[[2]uint64]bool{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && !fi.IsDir() && st.Nlink > 1 {
			id := [2]uint64{st.Dev, st.Ino}
			if seen[id] {
				return nil
			}
			seen[id] = true
		}
		u.inodes++
		switch {
		case fi.Mode().IsRegular():
			u.bytes += roundUp(fi.Size(), blockSize)
		case fi.IsDir():
			u.bytes += blockSize // most directories fit one block; big ones are rare
		case fi.Mode()&fs.ModeSymlink != 0 && fi.Size() >= 60:
			u.bytes += blockSize
		}
		return nil
	})
	if err != nil {
		return u, fmt.Errorf("measure %s: %w", root, err)
	}
	return u, nil
}

// imageSize returns the image size and inode count for a tree plus
// headroom: data, indirect/extent blocks (~2%), inode tables, fixed
// metadata, rounded to whole MiB.
func imageSize(u treeUsage, headroom int64) (size, inodes int64) {
	data := u.bytes + u.bytes/50
	size = roundUp(data+headroom+fixedOverhead, 1<<20)
	inodes = size/bytesPerInode + u.inodes
	size = roundUp(size+inodes*inodeSize, 1<<20)
	return size, inodes
}

func roundUp(n, unit int64) int64 { return (n + unit - 1) / unit * unit }

func buildBase(ctx context.Context, rootfsDir, final string, o options) (err error) {
	fi, err := os.Stat(rootfsDir)
	if err != nil {
		return fmt.Errorf("rootfs: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("rootfs %s is not a directory: %w", rootfsDir, errdefs.ErrInvalidArgument)
	}
	u, err := measureTree(rootfsDir)
	if err != nil {
		return err
	}
	size, inodes := imageSize(u, o.headroom)

	tmp, err := os.CreateTemp(filepath.Dir(final), ".base-*.tmp")
	if err != nil {
		return fmt.Errorf("create image: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	// Truncate makes a sparse file: only what mkfs writes takes space.
	if err := tmp.Truncate(size); err != nil {
		return fmt.Errorf("size image: %w", err)
	}
	cmd := exec.CommandContext(ctx, "mkfs.ext4",
		"-q", "-F",
		"-T", "default", // not "small": keep 4 KiB blocks and 256-byte inodes on small trees
		"-b", strconv.Itoa(blockSize),
		"-I", strconv.Itoa(inodeSize),
		"-N", strconv.FormatInt(inodes, 10),
		"-m", "0", // no blocks reserved for root: the guest's workload is the only user
		"-L", "berth-root",
		// Initialize inode tables and journal now (cheap: the file is
		// sparse) instead of in the guest, where ext4lazyinit would write
		// them into every workload's overlay.
		"-E", "lazy_itable_init=0,lazy_journal_init=0",
		"-d", rootfsDir,
		tmp.Name())
	if out, err := cmd.CombinedOutput(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("mkfs.ext4 not found (install e2fsprogs): %w", errdefs.ErrUnavailable)
		}
		return fmt.Errorf("mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := fitFree(ctx, tmp.Name(), o.headroom); err != nil {
		return err
	}
	// Bases are shared by every workload of the image and written by none:
	// read-only says so, and lets a non-root QEMU read them.
	if err := tmp.Chmod(0o444); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write image: %w", err)
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return fmt.Errorf("install image: %w", err)
	}
	return nil
}

// Overlay creates a qcow2 copy-on-write overlay at path over the raw base
// image, for one workload: the guest writes into the overlay, never into
// the shared base. It fails with errdefs.ErrAlreadyExists if path exists,
// rather than replacing a disk a VM may be using; a half-created overlay
// never appears at path.
func Overlay(ctx context.Context, base, path string) error {
	return OverlayOf(ctx, base, "raw", path)
}

// OverlayOf is Overlay over a base in the given format ("raw", "qcow2"),
// e.g. a whole-disk VM image.
func OverlayOf(ctx context.Context, base, baseFormat, path string) (err error) {
	absBase, err := filepath.Abs(base)
	if err != nil {
		return fmt.Errorf("rootdisk: overlay: %w", err)
	}
	if _, err := os.Stat(absBase); err != nil {
		return fmt.Errorf("rootdisk: overlay base: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("rootdisk: overlay %s: %w", path, errdefs.ErrAlreadyExists)
	}
	var size int64
	switch baseFormat {
	case "raw":
		fi, err := os.Stat(absBase)
		if err != nil {
			return fmt.Errorf("rootdisk: overlay base: %w", err)
		}
		size = fi.Size()
	case "qcow2":
		if size, err = qcow2.VirtualSize(absBase); err != nil {
			return fmt.Errorf("rootdisk: overlay base: %w", err)
		}
	default:
		return fmt.Errorf("rootdisk: overlay base format %q: %w", baseFormat, errdefs.ErrInvalidArgument)
	}
	tmp := fmt.Sprintf("%s.%d-%d.tmp", path, os.Getpid(), time.Now().UnixNano())
	defer os.Remove(tmp) // after the link below, path keeps the file
	// The backing path is stored absolute so the overlay works wherever it
	// is opened from; the format is given so QEMU never probes it. Written
	// here rather than by qemu-img: four clusters, without starting a
	// process for each workload.
	if err := qcow2.CreateOverlay(tmp, absBase, baseFormat, size); err != nil {
		return fmt.Errorf("rootdisk: overlay %s: %w", path, err)
	}
	// link(2) fails if path exists: no race can replace someone's disk.
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("rootdisk: overlay %s: %w", path, errdefs.ErrAlreadyExists)
		}
		return fmt.Errorf("rootdisk: overlay %s: %w", path, err)
	}
	return nil
}

// fitFree shrinks the ext4 filesystem in img until its free space is the
// headroom, give or take a MiB. The size estimate that made it allows for
// the most metadata an image can need; on small images mkfs needs less,
// and what is left over would be room past the workload's disk budget.
func fitFree(ctx context.Context, img string, headroom int64) error {
	for range 4 {
		sb, err := readSuperblock(img)
		if err != nil {
			return err
		}
		excess := sb.freeBlocks*sb.blockSize - headroom
		if excess < 1<<20 {
			return nil
		}
		blocks := sb.blocks - excess/sb.blockSize
		cmd := exec.CommandContext(ctx, "resize2fs", "-f", img, strconv.FormatInt(blocks, 10))
		if out, err := cmd.CombinedOutput(); err != nil {
			if errors.Is(err, exec.ErrNotFound) {
				return fmt.Errorf("resize2fs not found (install e2fsprogs): %w", errdefs.ErrUnavailable)
			}
			return fmt.Errorf("resize2fs: %w: %s", err, strings.TrimSpace(string(out)))
		}
		if err := os.Truncate(img, blocks*sb.blockSize); err != nil {
			return fmt.Errorf("size image: %w", err)
		}
	}
	return nil
}

// superblock is what fitFree reads of an ext4 superblock.
type superblock struct {
	blocks, freeBlocks, blockSize int64
}

// readSuperblock reads the primary superblock of the ext4 filesystem in img.
func readSuperblock(img string) (superblock, error) {
	f, err := os.Open(img)
	if err != nil {
		return superblock{}, err
	}
	defer f.Close()
	b := make([]byte, 1024)
	if _, err := f.ReadAt(b, 1024); err != nil {
		return superblock{}, fmt.Errorf("read superblock of %s: %w", img, err)
	}
	le := binary.LittleEndian
	if le.Uint16(b[0x38:]) != 0xEF53 {
		return superblock{}, fmt.Errorf("%s holds no ext4 filesystem", img)
	}
	sb := superblock{
		blocks:     int64(le.Uint32(b[0x04:])),
		freeBlocks: int64(le.Uint32(b[0x0C:])),
		blockSize:  1024 << le.Uint32(b[0x18:]),
	}
	const incompat64bit = 0x80
	if le.Uint32(b[0x60:])&incompat64bit != 0 {
		sb.blocks |= int64(le.Uint32(b[0x150:])) << 32
		sb.freeBlocks |= int64(le.Uint32(b[0x158:])) << 32
	}
	return sb, nil
}
