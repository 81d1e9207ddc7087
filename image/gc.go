package image

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// GCPolicy is when the store removes images no workload uses: once the
// data directory's filesystem is more than HighPercent used, least
// recently used images first, until it is at most LowPercent used. A zero
// HighPercent turns the background collection off (Prune still works).
type GCPolicy struct {
	HighPercent, LowPercent int
}

// WithGC sets the store's image garbage collection.
func WithGC(p GCPolicy) Option { return func(s *Store) { s.gcPolicy = p } }

// WithDiskUsage replaces statfs(2) for the data directory's use (tests).
func WithDiskUsage(fn func(path string) (used, total int64, err error)) Option {
	return func(s *Store) { s.usage = fn }
}

// Removed is an image the collector removed, and why.
type Removed struct {
	Ref, Digest string
	Size        int64
	Reason      string
}

// Touch records that a workload was just admitted with the image of this
// digest: collection removes the least recently used images first (an
// image never touched since the agent started counts from its creation).
func (s *Store) Touch(digest string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastUsed == nil {
		s.lastUsed = map[string]time.Time{}
	}
	s.lastUsed[digest] = time.Now()
}

// UsePercent is how full the data directory's filesystem is.
func (s *Store) UsePercent() (float64, error) {
	used, total, err := s.diskUsage()
	if err != nil || total <= 0 {
		return 0, err
	}
	return 100 * float64(used) / float64(total), nil
}

func (s *Store) diskUsage() (used, total int64, err error) {
	if s.usage != nil {
		return s.usage(s.root)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.root, &st); err != nil {
		return 0, 0, err
	}
	total = int64(st.Blocks) * st.Bsize
	return total - int64(st.Bavail)*st.Bsize, total, nil
}

// Collect removes unused images when the data directory is above the high
// watermark, down to the low one. It returns what it removed.
func (s *Store) Collect() ([]Removed, error) {
	p := s.gcPolicy
	if p.HighPercent <= 0 {
		return nil, nil
	}
	use, err := s.UsePercent()
	if err != nil || use <= float64(p.HighPercent) {
		return nil, err
	}
	return s.removeUnused(false, fmt.Sprintf("the data directory is %.0f%% used, above the high watermark of %d%% (images.gc_high_percent)", use, p.HighPercent))
}

// Prune removes images no workload uses, least recently used first: all
// of them with all, else down to the low watermark (the background
// collection's goal, without waiting for the high one).
func (s *Store) PruneImages(all bool) ([]Removed, error) {
	reason := "pruned: no workload uses it"
	if !all && s.gcPolicy.LowPercent <= 0 {
		all = true
	}
	return s.removeUnused(all, reason)
}

// removeUnused removes unused images LRU first, all of them or until the
// filesystem is at the low watermark. An image a workload uses, or that an
// operation in flight (a pull, a submit) holds, is never removed.
func (s *Store) removeUnused(all bool, reason string) ([]Removed, error) {
	type cand struct {
		digest string
		refs   []string
		size   int64
		last   time.Time
	}
	s.mu.Lock()
	byDigest := map[string]*cand{}
	for ref, rec := range s.refs {
		c := byDigest[rec.Digest]
		if c == nil {
			c = &cand{digest: rec.Digest, size: rec.Size, last: rec.CreatedAt}
			if t, ok := s.lastUsed[rec.Digest]; ok && t.After(c.last) {
				c.last = t
			}
			byDigest[rec.Digest] = c
		}
		c.refs = append(c.refs, ref)
	}
	var cands []*cand
	for d, c := range byDigest {
		if s.leases[d] > 0 || s.used(d) {
			continue
		}
		slices.Sort(c.refs)
		cands = append(cands, c)
	}
	s.mu.Unlock()
	slices.SortFunc(cands, func(a, b *cand) int { return a.last.Compare(b.last) })
	var out []Removed
	for _, c := range cands {
		if !all {
			use, err := s.UsePercent()
			if err != nil {
				return out, err
			}
			if use <= float64(s.gcPolicy.LowPercent) {
				break
			}
		}
		// Remove checks again, under the store's lock, that no workload
		// uses it: one admitted meanwhile keeps it.
		if err := s.Remove(c.digest); err != nil {
			if errors.Is(err, errdefs.ErrFailedPrecondition) || errors.Is(err, errdefs.ErrNotFound) {
				continue
			}
			return out, err
		}
		for _, ref := range c.refs {
			out = append(out, Removed{Ref: ref, Digest: c.digest, Size: c.size, Reason: reason})
		}
	}
	return out, nil
}
