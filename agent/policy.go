package agent

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/configs"
	"github.com/berthd/berth/internal/filewatch"
	"github.com/berthd/berth/placement"
)

// BuiltinPolicySource is the source of the embedded default policy, as GET
// /v1/policy reports it and as its messages name it.
const BuiltinPolicySource = "builtin"

// policyHolder holds the active isolation policy and keeps it in step with
// its file. Readers take the active policy with one atomic load; a reload
// parses and validates the new file completely before it swaps the pointer,
// so a decision sees either the old policy or the new one, never a mix, and
// an invalid file never becomes active.
type policyHolder struct {
	file string // absolute path; "" for the built-in policy
	log  *slog.Logger

	active atomic.Pointer[activePolicy]

	mu       sync.Mutex // serializes reloads and guards the fields below
	lastKey  string     // what the last reload saw: a content hash or a read error
	lastErr  *api.PolicyReloadError
	reloads  uint64
	failures uint64

	watcher *filewatch.Watcher // nil when not watching

	// onChange hears of every reload outcome, outside the lock: applied
	// (ok, new version, old version) or rejected (!ok, active version,
	// error).
	onChange func(ok bool, version, detail string)
}

// activePolicy is one loaded policy; it is never changed once stored.
type activePolicy struct {
	policy   *placement.Policy
	source   string
	loadedAt time.Time
}

// loadPolicy loads the policy file, or the embedded default when file is
// empty. An invalid file is an error: the agent must not start on a policy
// it cannot read, nor quietly on a different one.
func loadPolicy(file string, log *slog.Logger) (*policyHolder, error) {
	h := &policyHolder{log: log}
	if file == "" {
		p, err := placement.Parse(BuiltinPolicySource, configs.DefaultPolicy)
		if err != nil {
			return nil, fmt.Errorf("built-in isolation policy: %w", err)
		}
		h.active.Store(&activePolicy{policy: p, source: BuiltinPolicySource, loadedAt: time.Now().UTC()})
		return h, nil
	}
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, fmt.Errorf("isolation policy %s: %w", file, err)
	}
	h.file = abs
	data, err := readPolicyFile(abs)
	if err != nil {
		return nil, fmt.Errorf("isolation policy: %w", err)
	}
	p, err := placement.Parse(abs, data)
	if err != nil {
		return nil, fmt.Errorf("isolation policy %s is invalid; fix it (berth policy check %s) and start again:\n%w", abs, abs, err)
	}
	h.lastKey = contentKey(data)
	h.active.Store(&activePolicy{policy: p, source: abs, loadedAt: time.Now().UTC()})
	return h, nil
}

// readPolicyFile reads at most one byte more than placement accepts, so a
// huge file costs nothing and Parse still reports it as too large.
func readPolicyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, placement.MaxSize+1))
}

func contentKey(data []byte) string {
	sum := sha256.Sum256(data)
	return "sha256:" + hex.EncodeToString(sum[:])
}

// current is the active policy.
func (h *policyHolder) current() *activePolicy { return h.active.Load() }

// watch starts watching the policy file and its directory. Watching the
// directory is what makes atomic replacement work: an editor that writes a
// temporary file and renames it over the policy replaces the inode a watch
// on the file alone would follow, and a Kubernetes ConfigMap volume swaps a
// symlink next to it. Every burst of events ends in one read of the file,
// and a file whose content did not change is not parsed again.
func (h *policyHolder) watch() error {
	if h.file == "" {
		return nil
	}
	w, err := filewatch.Watch(h.file, func() { _ = h.reload() }, func(err error) {
		h.log.Warn("isolation policy watcher", "source", h.file, "error", err)
	})
	if err != nil {
		return err
	}
	h.watcher = w
	return nil
}

// close stops watching. The active policy stays usable.
func (h *policyHolder) close() {
	if h.watcher == nil {
		return
	}
	h.watcher.Close()
}

// reload reads the file and, when its content changed, validates it and
// swaps it in. A file that cannot be read or is invalid leaves the active
// policy in place and is recorded as the last reload error.
func (h *policyHolder) reload() error {
	if h.file == "" {
		return nil
	}
	// notify runs after the lock is released (defers run last-in first-out).
	var notify func()
	defer func() {
		if notify != nil && h.onChange != nil {
			notify()
		}
	}()
	h.mu.Lock()
	defer h.mu.Unlock()
	data, err := readPolicyFile(h.file)
	key := ""
	if err != nil {
		key = "error:" + err.Error()
	} else {
		key = contentKey(data)
	}
	if key == h.lastKey {
		return nil
	}
	h.lastKey = key
	old := h.current()
	now := time.Now().UTC()
	var p *placement.Policy
	if err == nil {
		p, err = placement.Parse(h.file, data)
	}
	if err != nil {
		h.failures++
		h.lastErr = reloadError(now, err)
		var list placement.ErrorList
		if errors.As(err, &list) {
			lines := make([]string, len(list))
			for i, e := range list {
				lines[i] = e.Error()
			}
			h.log.Error("isolation policy change rejected; the active policy stays",
				"source", h.file, "active_version", old.policy.Version(), "errors", lines, "reload_failures", h.failures)
		} else {
			h.log.Error("isolation policy file unreadable; the active policy stays",
				"source", h.file, "active_version", old.policy.Version(), "error", err, "reload_failures", h.failures)
		}
		msg := err.Error()
		notify = func() { h.onChange(false, old.policy.Version(), msg) }
		return err
	}
	h.active.Store(&activePolicy{policy: p, source: h.file, loadedAt: now})
	h.lastErr = nil
	h.reloads++
	h.log.Info("isolation policy reloaded", "source", h.file,
		"old_version", old.policy.Version(), "new_version", p.Version(), "rules", len(p.Rules()))
	notify = func() { h.onChange(true, p.Version(), old.policy.Version()) }
	return nil
}

func reloadError(at time.Time, err error) *api.PolicyReloadError {
	e := &api.PolicyReloadError{At: at, Message: err.Error()}
	var list placement.ErrorList
	if errors.As(err, &list) {
		for _, pe := range list {
			e.Errors = append(e.Errors, api.PolicyError{File: pe.File, Line: pe.Line, Column: pe.Column, Message: pe.Msg})
		}
	}
	return e
}

// brief is what node status shows of the policy: without the rule list
// status builds, since fleet controllers poll node status often.
func (h *policyHolder) brief() api.NodePolicy {
	cur := h.current()
	b := api.NodePolicy{Version: cur.policy.Version(), Source: cur.source}
	h.mu.Lock()
	defer h.mu.Unlock()
	b.LastReloadError = h.lastErrLocked()
	return b
}

// lastErrLocked is a copy of the last reload error, or nil; the caller
// holds h.mu.
func (h *policyHolder) lastErrLocked() *api.PolicyReloadError {
	if h.lastErr == nil {
		return nil
	}
	e := *h.lastErr
	e.Errors = append([]api.PolicyError(nil), h.lastErr.Errors...)
	return &e
}

// status describes the active policy and the reloads so far.
func (h *policyHolder) status() api.PolicyStatus {
	cur := h.current()
	st := api.PolicyStatus{
		Version:  cur.policy.Version(),
		Source:   cur.source,
		LoadedAt: cur.loadedAt,
		Default:  string(cur.policy.Default()),
		Rules:    []api.PolicyRule{},
		Watching: h.watcher != nil,
	}
	for _, r := range cur.policy.Rules() {
		st.Rules = append(st.Rules, api.PolicyRule{
			Name: r.Name, Description: r.Description, Outcome: string(r.Outcome),
			Match: r.Match, When: r.When, Line: r.Line,
		})
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	st.Reloads, st.ReloadFailures = h.reloads, h.failures
	st.LastReloadError = h.lastErrLocked()
	return st
}
