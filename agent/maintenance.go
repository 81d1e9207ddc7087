package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// keyCordon holds the node's cordon (a dbCordon) in the meta bucket;
// absent means schedulable.
var keyCordon = []byte("cordon")

// dbCordon is a cordon as the state database holds it.
type dbCordon struct {
	Since    time.Time `json:"since"`
	Reason   string    `json:"reason,omitempty"`
	Draining bool      `json:"draining,omitempty"`
}

func (s *store) getMeta(key []byte) (val []byte, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(key); v != nil {
			val = append([]byte(nil), v...)
		}
		return nil
	})
	return val, err
}

func (s *store) putMeta(key, val []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(key, val) })
}

func (s *store) deleteMeta(key []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(key) })
}

// maxCordonReason bounds an operator's reason: it is echoed in every
// refused submit and in node status.
const maxCordonReason = 1024

// Cordon makes the node refuse new workloads until Uncordon; running ones
// are left alone. It is persisted before it returns, so it survives an
// agent restart, and moves the state index.
func (a *Agent) Cordon(ctx context.Context, reason string) (*api.Node, error) {
	if err := a.setCordon(reason, false); err != nil {
		return nil, err
	}
	return a.Node(ctx), nil
}

// Drain cordons the node and asks every workload to stop with timeout (0:
// the agent's default) as its grace period. Each stop is persisted as a
// stop asked by a client is, and the drain itself too: an agent restarted
// before every stop was recorded asks the rest again. It returns once the
// stops are recorded, not when the workloads have ended (node status
// shows them ending).
func (a *Agent) Drain(ctx context.Context, reason string, timeout time.Duration) (*api.Node, error) {
	if timeout < 0 {
		return nil, errdefs.Invalid("timeout_seconds", "must not be negative")
	}
	if err := a.setCordon(reason, true); err != nil {
		return nil, err
	}
	a.drainAll(timeout)
	return a.Node(ctx), nil
}

// Uncordon lets the node take new workloads again.
func (a *Agent) Uncordon(ctx context.Context) (*api.Node, error) {
	a.writeMu.Lock()
	a.mu.Lock()
	was := a.cordon
	a.mu.Unlock()
	if was == nil {
		a.writeMu.Unlock()
		return a.Node(ctx), nil
	}
	if err := a.store.deleteMeta(keyCordon); err != nil {
		a.writeMu.Unlock()
		return nil, fmt.Errorf("persist the uncordon: %w", err)
	}
	a.mu.Lock()
	a.cordon = nil
	a.mu.Unlock()
	a.writeMu.Unlock()
	a.bumpIndex()
	a.log.Info("node uncordoned: new workloads are admitted again")
	a.events.publish(api.Event{Type: api.EventNodeUncordoned, Message: "node uncordoned: new workloads are admitted again"})
	return a.Node(ctx), nil
}

// setCordon persists a cordon (a drain when draining) under the write
// lock, which every admission takes, so no submit is admitted after it
// returns.
func (a *Agent) setCordon(reason string, draining bool) error {
	reason = strings.TrimSpace(reason)
	if len(reason) > maxCordonReason || strings.ContainsFunc(reason, isControl) {
		return errdefs.Invalid("reason", "at most %d printable characters", maxCordonReason)
	}
	a.writeMu.Lock()
	a.mu.Lock()
	prev := a.cordon
	a.mu.Unlock()
	c := api.NodeCordon{Since: time.Now().UTC(), Reason: reason, Draining: draining}
	if prev != nil {
		// A cordon keeps its start; a drain is never undone by a cordon.
		c.Since = prev.Since
		c.Draining = c.Draining || prev.Draining
		if reason == "" {
			c.Reason = prev.Reason
		}
	}
	if prev != nil && *prev == c {
		a.writeMu.Unlock()
		return nil
	}
	data, _ := json.Marshal(dbCordon{Since: c.Since, Reason: c.Reason, Draining: c.Draining})
	if err := a.store.putMeta(keyCordon, data); err != nil {
		a.writeMu.Unlock()
		return fmt.Errorf("persist the cordon: %w", err)
	}
	a.mu.Lock()
	a.cordon = &c
	a.mu.Unlock()
	a.writeMu.Unlock()
	a.bumpIndex()
	typ, msg := api.EventNodeCordoned, "node cordoned: new workloads are refused"
	if c.Draining {
		typ, msg = api.EventNodeDraining, "node draining: new workloads are refused and every workload is stopped"
	}
	attrs := map[string]string{}
	if c.Reason != "" {
		attrs["reason"] = c.Reason
	}
	a.log.Info(msg, "reason", c.Reason)
	a.events.publish(api.Event{Type: typ, Message: msg, Attrs: attrs})
	return nil
}

// drainAll asks every workload that has not ended for good to stop. A
// workload already stopping keeps the earlier of the two deadlines.
func (a *Agent) drainAll(timeout time.Duration) {
	a.mu.Lock()
	var ids []string
	for id, r := range a.recs {
		if !r.Workload.State.Terminal() || r.NextStart != nil {
			ids = append(ids, id)
		}
	}
	a.mu.Unlock()
	for _, id := range ids {
		if _, err := a.requestStop(id, timeout); err != nil && !errors.Is(err, errdefs.ErrNotFound) {
			a.log.Warn("drain: stop a workload", "workload_id", id, "err", err)
		}
	}
}

// loadCordon reads the persisted cordon at start; a drain that was under
// way is resumed once the workloads are recovered (resumeDrain).
func (a *Agent) loadCordon() error {
	data, err := a.store.getMeta(keyCordon)
	if err != nil || data == nil {
		return err
	}
	var c dbCordon
	if err := json.Unmarshal(data, &c); err != nil {
		return fmt.Errorf("the persisted cordon is unreadable: %w", err)
	}
	a.cordon = &api.NodeCordon{Since: c.Since, Reason: c.Reason, Draining: c.Draining}
	return nil
}

// resumeDrain asks again every workload to stop when the agent stopped
// while draining: a stop that was recorded keeps its deadline, one that
// was not is asked now.
func (a *Agent) resumeDrain() {
	a.mu.Lock()
	c := a.cordon
	a.mu.Unlock()
	if c != nil && c.Draining {
		a.drainAll(0)
	}
}

// cordonErr is why a submit is refused now, or nil when the node is
// schedulable. The caller holds writeMu or accepts a race with a cordon
// that is being set (Submit checks again under the lock).
func (a *Agent) cordonErr() error {
	a.mu.Lock()
	c := a.cordon
	a.mu.Unlock()
	if c == nil {
		return nil
	}
	what := "cordoned"
	if c.Draining {
		what = "draining"
	}
	msg := fmt.Sprintf("this node is %s since %s", what, c.Since.Format(time.RFC3339))
	if c.Reason != "" {
		msg += " (" + c.Reason + ")"
	}
	return fmt.Errorf("%s; submit to another node, or here once it is uncordoned: %w", msg, errdefs.ErrCordoned)
}

// schedulable fills the node's schedulability and its condition.
func (a *Agent) schedulable(n *api.Node) api.Condition {
	a.mu.Lock()
	c := a.cordon
	a.mu.Unlock()
	if c == nil {
		n.Schedulable = true
		return api.Condition{Type: api.ConditionSchedulable, Status: true, Reason: "Schedulable", Message: "new workloads are admitted"}
	}
	cc := *c
	n.Cordon = &cc
	cond := api.Condition{Type: api.ConditionSchedulable, Reason: "Cordoned", Message: "cordoned: new workloads are refused"}
	if c.Draining {
		cond.Reason, cond.Message = "Draining", "draining: new workloads are refused and every workload is stopped"
	}
	if c.Reason != "" {
		cond.Message += " (" + c.Reason + ")"
	}
	return cond
}
