package image

import (
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// Limits bound what images may put on the node's disk. A zero field means
// no limit.
type Limits struct {
	// MaxUnpackedBytes bounds the apparent size of one image's unpacked
	// root filesystem: the sum of its regular files' sizes, holes of sparse
	// files included (images.max_unpacked_bytes).
	MaxUnpackedBytes int64
	// MaxEntries bounds the files, directories and links of one image's
	// unpacked root filesystem (images.max_entries).
	MaxEntries int64
	// MinFreeBytes is the free space pulls, imports and unpacks leave on
	// the store's filesystem: below it they are refused, and DiskPressure
	// says so (storage.min_free_bytes).
	MinFreeBytes int64
}

// DefaultLimits are the limits of a Store made without WithLimits.
var DefaultLimits = Limits{MaxUnpackedBytes: 16 << 30, MaxEntries: 1 << 20, MinFreeBytes: 1 << 30}

// WithLimits sets the store's budgets.
func WithLimits(l Limits) Option {
	return func(s *Store) { s.limits = l }
}

// floorCheckBytes is how much a write may add between two checks of the
// free-space floor: a statfs per 64 MiB costs nothing next to the I/O.
const floorCheckBytes = 64 << 20

// DiskPressure reports, as an ErrResourceExhausted error, that the
// filesystem holding the store (the data directory's) has less free space
// than the floor (storage.min_free_bytes); nil when it has enough or no
// floor is set. Pulls, imports and unpacks check it themselves; the agent
// calls it to refuse submits and to report a DiskPressure node condition.
func (s *Store) DiskPressure() error {
	if s.limits.MinFreeBytes <= 0 {
		return nil
	}
	free, err := s.freeBytes()
	if err != nil {
		return fmt.Errorf("free space of %s: %w", s.root, err)
	}
	if free < s.limits.MinFreeBytes {
		return fmt.Errorf("%w: the data directory's filesystem (%s) has %s free, below the floor of %s (storage.min_free_bytes): free space on it (remove images and workloads) or lower the floor",
			errdefs.ErrResourceExhausted, s.root, humanBytes(free), humanBytes(s.limits.MinFreeBytes))
	}
	return nil
}

// freeBytes is the space available to unprivileged writers on the store's
// filesystem: root's reserve is left as a margin for the state database.
func (s *Store) freeBytes() (int64, error) {
	if s.statfs != nil {
		return s.statfs(s.root)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * st.Bsize, nil
}

// floorWriter checks the free-space floor as it writes.
type floorWriter struct {
	w     io.Writer
	s     *Store
	since int64
}

func (f *floorWriter) Write(p []byte) (int, error) {
	f.since += int64(len(p))
	if f.since >= floorCheckBytes {
		f.since = 0
		if err := f.s.DiskPressure(); err != nil {
			return 0, err
		}
	}
	return f.w.Write(p)
}

// budget counts what an unpack writes against the limits.
type budget struct {
	s       *Store
	bytes   int64
	entries int64
}

// entry accounts for one more entry of size bytes (apparent) before it is
// written.
func (b *budget) entry(size int64) error {
	l := b.s.limits
	b.entries++
	if l.MaxEntries > 0 && b.entries > l.MaxEntries {
		return fmt.Errorf("%w: the image has more than %d files, directories and links, the limit of images.max_entries on this node; nothing of it was kept", errdefs.ErrResourceExhausted, l.MaxEntries)
	}
	if size <= 0 {
		return nil
	}
	b.bytes += size
	if l.MaxUnpackedBytes > 0 && b.bytes > l.MaxUnpackedBytes {
		return fmt.Errorf("%w: the image unpacks to more than %s (%d bytes), the limit of images.max_unpacked_bytes on this node; nothing of it was kept", errdefs.ErrResourceExhausted, humanBytes(l.MaxUnpackedBytes), l.MaxUnpackedBytes)
	}
	return nil
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
