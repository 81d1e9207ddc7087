package agent

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
)

// Driver health is refreshed in the background only: one goroutine per
// driver fingerprints it every health interval, and requests (submits'
// placement, node status, metrics, readiness) read the cache. A driver
// that hangs (a frozen libvirtd) therefore delays nothing but its own
// next refresh, and shows as unhealthy within fingerprintWait.
const (
	// healthTTL is the default health interval: runc --version and
	// libvirt round trips are not free, and thousands of pollers must
	// cost little.
	healthTTL = 10 * time.Second
	// fingerprintWait is how long a fingerprint may take before its
	// driver is reported unhealthy; the answer, when it comes, replaces
	// that verdict.
	fingerprintWait = 5 * time.Second
	// fingerprintTimeout is the fingerprint call's own deadline.
	fingerprintTimeout = 30 * time.Second
	// firstWait is how long requests wait, at most, while the agent
	// starts, for a driver's first fingerprint; after that the driver is
	// "not checked yet" until it answers.
	firstWait = 2 * time.Second
)

// reasonNotChecked is a driver's health before its first fingerprint.
const reasonNotChecked = "not checked yet"

// stallHints say what probably hangs when a driver's fingerprint does
// not answer.
var stallHints = map[api.Isolation]string{api.IsolationVM: " (libvirtd hung?)"}

// healthCache holds each driver's last fingerprint and last error.
type healthCache struct {
	mu      sync.Mutex
	fps     map[api.Isolation]driver.Fingerprint
	taken   map[api.Isolation]time.Time
	lastErr map[api.Isolation]string
	errAt   map[api.Isolation]time.Time
	// first is closed when the driver's first verdict is in; firstBy is
	// when requests stop waiting for it (set when the first fingerprint
	// starts).
	first   map[api.Isolation]chan struct{}
	firstBy map[api.Isolation]time.Time
}

func (h *healthCache) init() {
	if h.fps == nil {
		h.fps = map[api.Isolation]driver.Fingerprint{}
		h.taken = map[api.Isolation]time.Time{}
		h.lastErr = map[api.Isolation]string{}
		h.errAt = map[api.Isolation]time.Time{}
		h.first = map[api.Isolation]chan struct{}{}
		h.firstBy = map[api.Isolation]time.Time{}
	}
}

// firstLocked is the channel closed by iso's first verdict; the caller
// holds h.mu.
func (h *healthCache) firstLocked(iso api.Isolation) chan struct{} {
	h.init()
	c, ok := h.first[iso]
	if !ok {
		c = make(chan struct{})
		h.first[iso] = c
	}
	return c
}

// fingerprint returns the driver's cached fingerprint. It never calls the
// driver; only while the agent starts does it wait (firstWait at most)
// for the driver's first fingerprint, and then reports the driver as not
// checked yet.
func (a *Agent) fingerprint(ctx context.Context, iso api.Isolation) (driver.Fingerprint, bool) {
	if _, ok := a.drivers[iso]; !ok {
		return driver.Fingerprint{}, false
	}
	h := &a.health
	h.mu.Lock()
	fp, have := h.fps[iso]
	first := h.firstLocked(iso)
	by, started := h.firstBy[iso]
	h.mu.Unlock()
	if have {
		return fp, true
	}
	if !started {
		by = time.Now().Add(firstWait)
	}
	if wait := time.Until(by); wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-first:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		h.mu.Lock()
		fp, have = h.fps[iso]
		h.mu.Unlock()
		if have {
			return fp, true
		}
	}
	return driver.Fingerprint{Healthy: false, Reason: reasonNotChecked}, true
}

func (a *Agent) healthInterval() time.Duration {
	if a.opts.HealthInterval > 0 {
		return a.opts.HealthInterval
	}
	return healthTTL
}

// recordHealth caches fp as the driver's health. A change of health is an
// event and moves the state index, so node-status pollers see it.
func (a *Agent) recordHealth(iso api.Isolation, fp driver.Fingerprint) {
	// The cache keeps a copy: a driver abandoned by a fingerprint
	// deadline may still write to its own map later.
	fp.Details = maps.Clone(fp.Details)
	h := &a.health
	h.mu.Lock()
	h.init()
	prev, had := h.fps[iso]
	h.fps[iso], h.taken[iso] = fp, time.Now()
	if first := h.firstLocked(iso); !had {
		close(first)
	}
	h.mu.Unlock()
	if had && prev.Healthy == fp.Healthy && prev.Reason == fp.Reason && prev.Version == fp.Version &&
		prev.Details["accel"] == fp.Details["accel"] {
		return
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

// healthLoop keeps the drivers' fingerprints fresh, one goroutine per
// driver, so requests never wait on a driver and no driver waits on
// another; health changes become events promptly.
func (a *Agent) healthLoop() {
	defer a.wg.Done()
	var wg sync.WaitGroup
	for iso, d := range a.drivers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.watchDriver(iso, d)
		}()
	}
	wg.Wait()
}

// watchDriver fingerprints d every health interval, counted from the end
// of the previous fingerprint, until the agent closes.
func (a *Agent) watchDriver(iso api.Isolation, d driver.Driver) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-a.ctx.Done():
			return
		}
		if !a.checkDriver(iso, d) {
			return
		}
		t.Reset(a.healthInterval())
	}
}

// checkDriver runs one fingerprint of d. When it has not answered within
// fingerprintWait the driver turns unhealthy at once; checkDriver still
// waits for the answer (no second fingerprint piles up behind a hung
// one), which sets the health again. It returns false when the agent
// closed meanwhile.
func (a *Agent) checkDriver(iso api.Isolation, d driver.Driver) bool {
	h := &a.health
	h.mu.Lock()
	h.init()
	if _, ok := h.firstBy[iso]; !ok {
		h.firstBy[iso] = time.Now().Add(firstWait)
	}
	h.mu.Unlock()
	// The goroutine outlives checkDriver only when the agent closes
	// (its ctx ends then) or the driver ignores its ctx.
	ctx, cancel := context.WithTimeout(a.ctx, fingerprintTimeout)
	got := make(chan driver.Fingerprint, 1)
	go func() {
		defer cancel()
		got <- d.Fingerprint(ctx)
	}()
	wait := time.NewTimer(fingerprintWait)
	defer wait.Stop()
	for {
		select {
		case fp := <-got:
			a.recordHealth(iso, fp)
			return true
		case <-wait.C:
			a.recordHealth(iso, a.stalled(iso))
		case <-a.ctx.Done():
			return false
		}
	}
}

// stalled is the driver's health while its fingerprint does not answer:
// unhealthy, with what was last known of its version and details.
func (a *Agent) stalled(iso api.Isolation) driver.Fingerprint {
	h := &a.health
	h.mu.Lock()
	prev := h.fps[iso]
	h.mu.Unlock()
	return driver.Fingerprint{
		Healthy: false,
		Reason:  fmt.Sprintf("fingerprint did not answer within %s%s", fingerprintWait, stallHints[iso]),
		Version: prev.Version,
		Details: prev.Details,
	}
}
