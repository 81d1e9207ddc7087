package agent

import (
	"context"
	"strconv"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/image"
)

// admit holds digest for a submit in flight (UsesImage says it is used)
// and marks it used now; the returned func lets it go.
func (a *Agent) admit(digest string) (release func()) {
	a.mu.Lock()
	a.admitting[digest]++
	a.mu.Unlock()
	a.images.Touch(digest)
	return func() {
		a.mu.Lock()
		if a.admitting[digest]--; a.admitting[digest] <= 0 {
			delete(a.admitting, digest)
		}
		a.mu.Unlock()
	}
}

// collectImages runs the image store's collection (past the high
// watermark) and reports what it removed.
func (a *Agent) collectImages() {
	removed, err := a.images.Collect()
	a.reportRemoved(removed)
	if err != nil {
		a.log.Warn("image garbage collection", "err", err)
	}
}

// PruneImages removes images no workload uses: all of them with all, else
// down to the low watermark. Each removal is an event.
func (a *Agent) PruneImages(ctx context.Context, all bool) ([]api.RemovedImage, error) {
	removed, err := a.images.PruneImages(all)
	a.reportRemoved(removed)
	out := make([]api.RemovedImage, 0, len(removed))
	for _, r := range removed {
		out = append(out, api.RemovedImage{Ref: r.Ref, Digest: r.Digest, Size: r.Size, Reason: r.Reason})
	}
	return out, err
}

func (a *Agent) reportRemoved(removed []image.Removed) {
	for _, r := range removed {
		a.log.Info("image removed", "ref", r.Ref, "digest", r.Digest, "size", r.Size, "reason", r.Reason)
		a.events.publish(api.Event{Type: api.EventImageRemoved, Message: "removed image " + r.Ref + ": " + r.Reason,
			Attrs: map[string]string{"ref": r.Ref, "digest": r.Digest, "size": strconv.FormatInt(r.Size, 10), "reason": r.Reason}})
	}
}
