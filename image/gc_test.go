package image

import (
	"testing"
	"time"

	"github.com/berthd/berth/internal/ociimage"
)

// Past the high watermark, unused images go least recently used first
// until the low watermark; an image a workload uses, or an operation in
// flight holds, stays; below the high watermark nothing goes.
func TestCollectLRUBetweenWatermarks(t *testing.T) {
	var s *Store
	inUse := map[string]bool{}
	// Each image is ten percent of the disk.
	usage := func(string) (int64, int64, error) { return int64(10 * len(s.List())), 100, nil }
	s = newStore(t, t.TempDir(), WithGC(GCPolicy{HighPercent: 35, LowPercent: 25}), WithDiskUsage(usage),
		WithInUse(func(d string) bool { return inUse[d] }))
	var digests []string
	for _, name := range []string{"a", "b", "c", "d"} {
		img := importImage(t, s, mkImage(t, []ociimage.File{{Name: "f" + name, Body: name}}), "test/"+name+":1")
		digests = append(digests, img.Digest)
		s.Touch(img.Digest)
		time.Sleep(2 * time.Millisecond) // distinct use times, oldest first
	}
	inUse[digests[1]] = true // b

	// 40% > 35%: a goes (30%), b is used, c goes (20% <= 25%), d stays.
	removed, err := s.Collect()
	if err != nil || len(removed) != 2 || removed[0].Digest != digests[0] || removed[1].Digest != digests[2] || removed[0].Reason == "" {
		t.Fatalf("at 40%% (high 35%%, low 25%%): removed %+v, %v; want a then c", removed, err)
	}
	// 20%: below the high watermark nothing goes, and a prune to the low
	// one has nothing to do.
	if removed, err := s.Collect(); err != nil || len(removed) != 0 {
		t.Fatalf("at 20%%: collected %+v, %v", removed, err)
	}
	if removed, err := s.PruneImages(false); err != nil || len(removed) != 0 {
		t.Fatalf("at 20%%: pruned %+v, %v", removed, err)
	}
	// A pull in flight holds d: a full prune keeps it, and b (in use).
	release := s.lease(digests[3])
	if removed, err := s.PruneImages(true); err != nil || len(removed) != 0 {
		t.Fatalf("full prune with d held and b used: %+v, %v", removed, err)
	}
	release()
	if removed, err := s.PruneImages(true); err != nil || len(removed) != 1 || removed[0].Ref != "docker.io/test/d:1" {
		t.Fatalf("full prune: %+v, %v; want d", removed, err)
	}
	if _, err := s.Get(digests[1]); err != nil {
		t.Errorf("the image in use is gone: %v", err)
	}
}
