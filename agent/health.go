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
// little. The background loop refreshes fingerprints at this pace, so
// requests normally find them fresh.
const healthTTL = 10 * time.Second

// healthCache holds each driver's last fingerprint and last error.
type healthCache struct {
	mu      sync.Mutex
	fps     map[api.Isolation]driver.Fingerprint
	taken   map[api.Isolation]time.Time
	lastErr map[api.Isolation]string
	errAt   map[api.Isolation]time.Time
}

func (h *healthCache) init() {
	if h.fps == nil {
		h.fps = map[api.Isolation]driver.Fingerprint{}
		h.taken = map[api.Isolation]time.Time{}
		h.lastErr = map[api.Isolation]string{}
		h.errAt = map[api.Isolation]time.Time{}
	}
}

// fingerprint returns the driver's cached fingerprint, refreshing it when
// stale.
func (a *Agent) fingerprint(ctx context.Context, iso api.Isolation) (driver.Fingerprint, bool) {
	if _, ok := a.drivers[iso]; !ok {
		return driver.Fingerprint{}, false
	}
	h := &a.health
	h.mu.Lock()
	fp, have := h.fps[iso]
	fresh := have && time.Since(h.taken[iso]) < a.healthInterval()
	h.mu.Unlock()
	if fresh {
		return fp, true
	}
	return a.refreshHealth(ctx, iso), true
}

func (a *Agent) healthInterval() time.Duration {
	if a.opts.HealthInterval > 0 {
		return a.opts.HealthInterval
	}
	return healthTTL
}

// refreshHealth fingerprints the driver now. A change of health is an
// event and moves the state index, so node-status pollers see it.
func (a *Agent) refreshHealth(ctx context.Context, iso api.Isolation) driver.Fingerprint {
	fp := a.drivers[iso].Fingerprint(ctx)
	h := &a.health
	h.mu.Lock()
	h.init()
	prev, had := h.fps[iso]
	h.fps[iso], h.taken[iso] = fp, time.Now()
	h.mu.Unlock()
	if had && prev.Healthy == fp.Healthy && prev.Reason == fp.Reason && prev.Version == fp.Version &&
		prev.Details["accel"] == fp.Details["accel"] {
		return fp
	}
	// The first fingerprint is the driver's initial state, not a change:
	// it moves no index, and only an unhealthy start is worth an event.
	if had {
		a.bumpIndex()
	}
	if had || !fp.Healthy {
		typ, msg := api.EventDriverHealthy, string(iso)+" driver is healthy"
		if !fp.Healthy {
			typ, msg = api.EventDriverUnhealthy, string(iso)+" driver is unhealthy: "+fp.Reason
			a.log.Warn("driver unhealthy", "driver", iso, "reason", fp.Reason)
		} else {
			a.log.Info("driver healthy", "driver", iso, "version", fp.Version)
		}
		a.events.publish(api.Event{Type: typ, Message: msg, Attrs: map[string]string{"driver": string(iso)}})
	}
	return fp
}

// noteDriverError records the last error a driver returned, for node status.
func (a *Agent) noteDriverError(iso api.Isolation, err error) {
	if err == nil {
		return
	}
	h := &a.health
	h.mu.Lock()
	h.init()
	h.lastErr[iso], h.errAt[iso] = err.Error(), time.Now().UTC()
	h.mu.Unlock()
}

// driverStatus is the driver's cached health for node status.
func (a *Agent) driverStatus(ctx context.Context, iso api.Isolation) api.DriverStatus {
	fp, _ := a.fingerprint(ctx, iso)
	h := &a.health
	h.mu.Lock()
	defer h.mu.Unlock()
	st := api.DriverStatus{Healthy: fp.Healthy, Reason: fp.Reason, Version: fp.Version, Details: fp.Details, CheckedAt: h.taken[iso].UTC()}
	if e := h.lastErr[iso]; e != "" {
		at := h.errAt[iso]
		st.LastError, st.LastErrorAt = e, &at
	}
	return st
}

// healthLoop keeps the drivers' fingerprints fresh so requests never wait
// on a driver, and turns health changes into events promptly.
func (a *Agent) healthLoop() {
	defer a.wg.Done()
	t := time.NewTicker(a.healthInterval())
	defer t.Stop()
	for {
		for iso := range a.drivers {
			ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
			a.refreshHealth(ctx, iso)
			cancel()
		}
		select {
		case <-t.C:
		case <-a.ctx.Done():
			return
		}
	}
}
