package agent

import (
	"context"
	"sync"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// healthTTL is how long a driver's fingerprint is trusted. Requests never
// fingerprint a driver themselves more often than this: runc --version and
// libvirt round trips are not free, and thousands of pollers must cost
// little.
const healthTTL = 10 * time.Second

// healthCache holds each driver's last fingerprint.
type healthCache struct {
	mu    sync.Mutex
	fps   map[api.Isolation]driver.Fingerprint
	taken map[api.Isolation]time.Time
}

// fingerprint returns the driver's cached fingerprint, refreshing it when
// stale. Concurrent callers of a stale entry may refresh it together; the
// result is the same.
func (a *Agent) fingerprint(ctx context.Context, iso api.Isolation) (driver.Fingerprint, bool) {
	d, ok := a.drivers[iso]
	if !ok {
		return driver.Fingerprint{}, false
	}
	h := &a.health
	h.mu.Lock()
	fp, have := h.fps[iso]
	fresh := have && time.Since(h.taken[iso]) < healthTTL
	h.mu.Unlock()
	if fresh {
		return fp, true
	}
	fp = d.Fingerprint(ctx)
	h.mu.Lock()
	if h.fps == nil {
		h.fps = map[api.Isolation]driver.Fingerprint{}
		h.taken = map[api.Isolation]time.Time{}
	}
	h.fps[iso], h.taken[iso] = fp, time.Now()
	h.mu.Unlock()
	return fp, true
}
