package agent

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/berthd/berth/api"
)

// eventRing is how many recent events the agent keeps for clients that
// reconnect with Last-Event-ID.
const eventRing = 4096

// eventLog is a bounded, in-memory log of the node's events. IDs start at
// the agent's start time in microseconds, so they keep increasing across
// agent restarts and a client's Last-Event-ID from an earlier agent asks for
// "everything after", which is what it needs.
type eventLog struct {
	mu      sync.Mutex
	buf     []api.Event // ring; buf[(start+i)%len] for i < n
	start   int
	n       int
	nextID  uint64
	changed chan struct{}
}

func newEventLog(now time.Time) *eventLog {
	return &eventLog{buf: make([]api.Event, eventRing), nextID: uint64(now.UnixMicro()), changed: make(chan struct{})}
}

func (l *eventLog) publish(e api.Event) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextID++
	e.ID = l.nextID
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	if l.n < len(l.buf) {
		l.buf[(l.start+l.n)%len(l.buf)] = e
		l.n++
	} else {
		l.buf[l.start] = e
		l.start = (l.start + 1) % len(l.buf)
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// after returns the kept events with an ID above id that match, whether
// events after id were already dropped from the ring, and a channel closed
// at the next publish.
func (l *eventLog) after(id uint64, match func(*api.Event) bool) (out []api.Event, lost bool, changed <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n > 0 {
		oldest := l.buf[l.start].ID
		lost = id != 0 && id+1 < oldest
	}
	for i := 0; i < l.n; i++ {
		e := &l.buf[(l.start+i)%len(l.buf)]
		if e.ID > id && match(e) {
			out = append(out, *e)
		}
	}
	return out, lost, l.changed
}

// Events calls emit with every event after lastID that matches f (none
// when lastID is 0: a new subscriber), then with each new one as it happens, until ctx ends or emit fails. lost tells
// emit's caller that events between lastID and the first delivered were
// dropped from the ring (the client was away too long).
func (a *Agent) Events(ctx context.Context, lastID uint64, f api.EventFilter, lost func(), emit func(api.Event) error) error {
	if lastID == 0 {
		// A new subscriber wants what happens from now on.
		lastID = a.events.lastID()
	}
	first := true
	for {
		evs, gap, changed := a.events.after(lastID, f.Match)
		if first && gap && lost != nil {
			lost()
		}
		first = false
		for _, e := range evs {
			if err := emit(e); err != nil {
				return err
			}
			lastID = e.ID
		}
		if len(evs) == 0 {
			// Nothing matched; skip what was looked at so far.
			if id := a.events.lastID(); id > lastID {
				lastID = id
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil
		}
	}
}

func (l *eventLog) lastID() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return 0
	}
	return l.buf[(l.start+l.n-1)%len(l.buf)].ID
}

// publishTransition derives the events of a record change: every state
// change of every workload goes through commitLocked, so none is missed.
func (a *Agent) publishTransition(prev, cur *record) {
	w := &cur.Workload
	ev := func(typ, msg string, attrs map[string]string) {
		a.events.publish(api.Event{Type: typ, WorkloadID: w.ID, Message: msg, Attrs: attrs})
	}
	if prev == nil {
		attrs := map[string]string{"image": w.Spec.Image, "name": w.Name}
		if w.Tenant != "" {
			attrs["tenant"] = w.Tenant
		}
		ev(api.EventWorkloadCreated, fmt.Sprintf("workload %s created from %s", w.ID, w.Spec.Image), attrs)
		if p := w.Placement; p != nil {
			ev(api.EventWorkloadPlaced, p.Explanation, map[string]string{"isolation": string(p.Isolation), "rule": p.DecidingRule, "policy_version": p.PolicyVersion})
		}
		return
	}
	pw := &prev.Workload
	if w.RestartCount > pw.RestartCount {
		ev(api.EventWorkloadRestarted, fmt.Sprintf("workload %s restarts (restart %d)", w.ID, w.RestartCount), map[string]string{"restart_count": strconv.Itoa(w.RestartCount)})
	}
	if w.State == pw.State {
		return
	}
	switch w.State {
	case api.StateRunning:
		attrs := map[string]string{"isolation": string(w.Isolation)}
		msg := fmt.Sprintf("workload %s is running as a %s", w.ID, w.Isolation)
		if w.Network != nil && w.Network.Address != "" {
			attrs["address"] = w.Network.Address
			msg += " at " + w.Network.Address
		}
		ev(api.EventWorkloadStarted, msg, attrs)
	case api.StateStopping:
		ev(api.EventWorkloadStopping, fmt.Sprintf("workload %s is stopping", w.ID), nil)
	case api.StateExited:
		code := -1
		if w.ExitCode != nil {
			code = *w.ExitCode
		}
		attrs := map[string]string{"exit_code": strconv.Itoa(code)}
		if w.OOMKilled {
			attrs["oom_killed"] = "true"
		}
		ev(api.EventWorkloadExited, fmt.Sprintf("workload %s exited with code %d", w.ID, code), attrs)
	case api.StateFailed:
		ev(api.EventWorkloadFailed, fmt.Sprintf("workload %s failed: %s", w.ID, w.Error), map[string]string{"error": w.Error})
	}
}

// policyChanged turns a policy reload into an event and a new state index
// (the node document shows the policy).
func (a *Agent) policyChanged(ok bool, version, detail string) {
	a.bumpIndex()
	if ok {
		a.events.publish(api.Event{Type: api.EventPolicyReloaded,
			Message: "isolation policy " + version + " is active (was " + detail + ")",
			Attrs:   map[string]string{"version": version, "previous_version": detail}})
		return
	}
	a.events.publish(api.Event{Type: api.EventPolicyRejected,
		Message: "isolation policy change rejected; " + version + " stays active: " + detail,
		Attrs:   map[string]string{"active_version": version}})
}
