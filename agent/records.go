package agent

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
)

// record is the agent's state of one workload: its API view, which the
// agent keeps current, and what only the agent needs (the driver's handle,
// the intents it carries out). Records in Agent.recs are never mutated
// once published; a change is a mutated clone, committed (mutate). What
// the state database holds is converted from it (store.go).
type record struct {
	Workload api.Workload
	// Handle is the driver's state from Start; nil before the task exists.
	Handle *driver.Handle
	// StopRequested: a workload asked to stop is never started or
	// restarted again.
	StopRequested bool
	// StopAt is when the stop was asked and StopGrace its grace period:
	// the stop's deadline, which an agent restart resumes with what is
	// left of it.
	StopAt    *time.Time
	StopGrace time.Duration
	// Deleting marks a delete in progress, carried out by the agent (after
	// a crash too). DeleteAttempts counts its failed attempts and
	// DeleteError is why the last one failed.
	Deleting       bool
	DeleteAttempts int
	DeleteError    string
	// NextStart is when a backed-off restart is due.
	NextStart *time.Time
	// StartBoot is the node's boot id when the current run's start began:
	// a start the node's reboot interrupted may have run the workload even
	// when nothing of its task survived (recover.go).
	StartBoot string
}

// clone is a deep copy of r: nothing of it is shared with r.
func (r *record) clone() *record {
	c := *r
	c.Workload = cloneWorkload(r.Workload)
	if r.Handle != nil {
		h := *r.Handle
		h.State = bytes.Clone(h.State)
		c.Handle = &h
	}
	c.StopAt = clonePtr(r.StopAt)
	c.NextStart = clonePtr(r.NextStart)
	return &c
}

// cloneWorkload is a deep copy of w: reads hand out clones, so a caller
// may change what it got without touching the agent's records.
func cloneWorkload(w api.Workload) api.Workload {
	c := w
	c.Spec = cloneSpec(w.Spec)
	c.ExitCode = clonePtr(w.ExitCode)
	c.LastExitCode = clonePtr(w.LastExitCode)
	c.StartedAt = clonePtr(w.StartedAt)
	c.FinishedAt = clonePtr(w.FinishedAt)
	c.Pull = clonePtr(w.Pull)
	if w.Health != nil {
		h := *w.Health
		h.Log = slices.Clone(h.Log)
		c.Health = &h
	}
	if w.Placement != nil {
		p := *w.Placement
		p.Matched = slices.Clone(p.Matched)
		c.Placement = &p
	}
	if w.Network != nil {
		n := *w.Network
		n.Ports = slices.Clone(n.Ports)
		c.Network = &n
	}
	return c
}

func cloneSpec(s api.WorkloadSpec) api.WorkloadSpec {
	c := s
	c.Command = slices.Clone(s.Command)
	c.Args = slices.Clone(s.Args)
	c.Env = maps.Clone(s.Env)
	c.SecretEnv = maps.Clone(s.SecretEnv)
	c.Labels = maps.Clone(s.Labels)
	c.Ports = slices.Clone(s.Ports)
	c.Volumes = slices.Clone(s.Volumes)
	c.Resources.Limits = clonePtr(s.Resources.Limits)
	c.Logs = clonePtr(s.Logs)
	if s.Health != nil {
		h := *s.Health
		h.Exec = slices.Clone(h.Exec)
		h.HTTP, h.TCP = clonePtr(h.HTTP), clonePtr(h.TCP)
		c.Health = &h
	}
	return c
}

func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	v := *p
	return &v
}

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// lookupLocked finds a workload by id or by name: ref is an id, TENANT/NAME
// or a bare NAME of the node's own namespace (api.Ref), never a name of
// another namespace. The caller holds a.mu.
func (a *Agent) lookupLocked(ref string) (*record, bool) {
	if r, ok := a.recs[ref]; ok {
		return r, true
	}
	if id, ok := a.names[ref]; ok {
		return a.recs[id], true
	}
	return nil, false
}

// namedLocked finds the workload holding name in tenant's namespace (the
// node's for ""), by name only: a name that happens to be some id is
// still a name. The caller holds a.mu.
func (a *Agent) namedLocked(tenant, name string) (*record, bool) {
	id, ok := a.names[api.Ref(tenant, name)]
	if !ok {
		return nil, false
	}
	r, ok := a.recs[id]
	return r, ok
}

// nameKey is r's key in a.names: its name in its tenant's namespace
// (api.Ref), empty when it has no name. A name is unique per tenant, so
// two tenants' workloads of one name are two keys.
func nameKey(r *record) string {
	if r.Workload.Name == "" {
		return ""
	}
	return api.Ref(r.Workload.Tenant, r.Workload.Name)
}

// get finds a workload by id, TENANT/NAME or a bare NAME of the node's own
// namespace. A workload being deleted is found until everything it held is
// released and its record is gone.
func (a *Agent) get(ref string) (*record, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	r, ok := a.lookupLocked(ref)
	if !ok {
		return nil, fmt.Errorf("workload %q: %w", ref, errdefs.ErrNotFound)
	}
	return r, nil
}

// record returns the current version of a workload's record, nil when it
// is gone.
func (a *Agent) record(id string) *record {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.recs[id]
}

// commitLocked queues r as the new version of its record for the state
// database and publishes it, and sees that a record with work left (a
// run, a stop, a delete) has a supervisor, which it wakes. The caller
// holds a.writeMu, and waits for a.commits.durable(r's index) once it has
// released it before anything follows from the change (commit.go).
// Records in a.recs are never mutated after publication, so readers may
// hold them without locks.
func (a *Agent) commitLocked(r *record) error {
	a.mu.Lock()
	idx := a.index + 1
	prev := a.recs[r.Workload.ID]
	a.mu.Unlock()
	r.Workload.ModifyIndex = idx
	r.Workload.Deleting = r.Deleting
	if err := a.commits.putRecord(r, idx); err != nil {
		return fmt.Errorf("persist workload %s: %w", r.Workload.ID, err)
	}
	a.mu.Lock()
	a.recs[r.Workload.ID] = r
	a.bindNameLocked(r)
	a.advanceLocked(idx)
	a.mu.Unlock()
	a.publishTransition(prev, r)
	if needsSupervisor(r) {
		a.supervise(r.Workload.ID)
	}
	return nil
}

// bindNameLocked makes r's name find r in its tenant's namespace, unless
// the name is another record's there: a name is never taken from the
// workload that holds it (a workload being deleted holds its name until it
// is gone, and Submit refuses the name meanwhile). The caller holds a.mu.
func (a *Agent) bindNameLocked(r *record) {
	key := nameKey(r)
	if key == "" {
		return
	}
	if id, ok := a.names[key]; ok && id != r.Workload.ID {
		if _, live := a.recs[id]; live {
			return
		}
	}
	a.names[key] = r.Workload.ID
}

// errSkip aborts a mutation without an error to report.
var errSkip = errors.New("skip")

// mutate applies fn to a copy of the workload's record and commits it,
// and returns once the change is on disk. fn may return errSkip to leave
// the record as it is.
func (a *Agent) mutate(id string, fn func(r *record) error) (*record, error) {
	r, err := a.mutateLocked(id, fn)
	if err != nil {
		return nil, err
	}
	if err := a.commits.durable(r.Workload.ModifyIndex); err != nil {
		return nil, err
	}
	return r, nil
}

// mutateLocked is mutate up to the commit, under writeMu.
func (a *Agent) mutateLocked(id string, fn func(r *record) error) (*record, error) {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	cur, ok := a.recs[id]
	a.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("workload %s: %w", id, errdefs.ErrNotFound)
	}
	r := cur.clone()
	if err := fn(r); err != nil {
		if errors.Is(err, errSkip) {
			return cur, nil
		}
		return nil, err
	}
	if err := a.commitLocked(r); err != nil {
		return nil, err
	}
	return r, nil
}

func (a *Agent) removeRecord(id string) error {
	idx, err := a.removeRecordLocked(id)
	if err != nil {
		return err
	}
	a.events.publish(api.Event{Type: api.EventWorkloadDeleted, WorkloadID: id, Message: "workload " + id + " deleted"})
	return a.commits.durable(idx)
}

func (a *Agent) removeRecordLocked(id string) (uint64, error) {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	idx := a.index + 1
	a.mu.Unlock()
	if err := a.commits.enqueue(storeWrite{id: id, del: true, index: idx}); err != nil {
		return 0, fmt.Errorf("delete workload %s: %w", id, err)
	}
	a.mu.Lock()
	if r, ok := a.recs[id]; ok {
		if key := nameKey(r); key != "" && a.names[key] == id {
			delete(a.names, key)
		}
	}
	delete(a.recs, id)
	delete(a.healths, id)
	a.advanceLocked(idx)
	a.mu.Unlock()
	return idx, nil
}

// bumpIndex moves the state index for a change that is not a workload
// record (a driver's health, the policy), so blocking queries on the node
// document see it. The index is persisted: it never goes backwards.
func (a *Agent) bumpIndex() {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	idx := a.index + 1
	a.mu.Unlock()
	if err := a.commits.enqueue(storeWrite{index: idx}); err != nil {
		a.log.Warn("persist state index", "err", err)
		return
	}
	a.mu.Lock()
	a.advanceLocked(idx)
	a.mu.Unlock()
}

// indexState is the state index and the channel closed when it moves on,
// published together so blocking queries read them without a.mu: a change
// wakes every parked query at once, and thousands of them must not queue
// on one lock to learn the new index.
type indexState struct {
	index   uint64
	changed chan struct{}
}

// advanceLocked moves the index to idx and wakes what waits for a change.
// The caller holds a.mu.
func (a *Agent) advanceLocked(idx uint64) {
	a.index = idx
	old := a.indexNow.Swap(&indexState{index: idx, changed: make(chan struct{})})
	close(old.changed)
}

// Index returns the current state index and a channel closed at the next
// change, for blocking queries.
func (a *Agent) Index() (uint64, <-chan struct{}) {
	st := a.indexNow.Load()
	return st.index, st.changed
}

// waitRecord blocks until the workload's record satisfies ok, it is gone
// (ErrNotFound), or ctx ends. What it answers with is on disk: callers
// acknowledge it.
func (a *Agent) waitRecord(ctx context.Context, id string, ok func(*record) bool) (*record, error) {
	for {
		_, changed := a.Index()
		r := a.record(id)
		if r == nil || ok(r) {
			idx, _ := a.Index()
			if err := a.commits.durable(idx); err != nil {
				return nil, err
			}
		}
		if r == nil {
			return nil, fmt.Errorf("workload %s: %w", id, errdefs.ErrNotFound)
		}
		if ok(r) {
			return r, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
