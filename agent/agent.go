// Package agent is berth's lifecycle manager: it admits workloads, asks
// placement where each runs, drives the matching driver, persists every
// record before acknowledging, and recovers all of it after a restart.
//
// The agent knows nothing of HTTP (api/server calls it) and nothing of runc
// or libvirt (drivers do that behind driver.Driver).
package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/network"
)

// Images is what the agent needs of the image store.
type Images interface {
	Get(ref string) (*image.Image, error)
	Rootfs(ctx context.Context, img *image.Image) (string, error)
	List() []*image.Image
	Pull(ctx context.Context, ref string) (*image.Image, error)
	Import(ctx context.Context, r io.Reader, ref string) ([]*image.Image, error)
	ImportDisk(ctx context.Context, r io.Reader, ref string) (*image.Image, error)
	DiskPath(img *image.Image) (string, error)
	Remove(ref string) error
}

// Options configure an Agent.
type Options struct {
	// DataDir holds the state database and the workloads' logs.
	DataDir string
	// Drivers by the isolation they provide; a missing one is unavailable.
	Drivers []driver.Driver
	Images  Images
	// Defaults fill resources a spec leaves out.
	Defaults Defaults
	// StopTimeout is the grace period of a stop that names none.
	StopTimeout time.Duration
	// RestartBackoff is the first delay of a restart; it doubles with each
	// quick failure up to 5 minutes. Default 1s.
	RestartBackoff time.Duration
	// Version is the agent's version, reported in node status.
	Version string
	Logger  *slog.Logger
	// PolicyFile is the isolation policy, watched and reloaded when it
	// changes; empty means the embedded default (configs/policy.yaml).
	PolicyFile string

	// Reserved is kept back from workloads; admission refuses a workload
	// whose requests do not fit in capacity minus reserved.
	Reserved Reserved
	// VMOverheadMB is the memory a VM costs the node beyond its guest's.
	VMOverheadMB int64
	// Capacity overrides the host's CPUs and memory (tests).
	Capacity *api.NodeResources
	// HealthInterval is how often drivers are fingerprinted in the
	// background; default 10s.
	HealthInterval time.Duration
	// Network attaches workloads to the node network; nil means every
	// workload gets loopback only (bridge requests are refused).
	Network *network.Manager
	// NodeLabels describe the node to policy rules (node.labels in CEL),
	// e.g. zone=eu-1, certified=pci.
	NodeLabels map[string]string
	// ReconcileInterval is how often records and driver tasks are
	// compared (Reconcile); default 30s.
	ReconcileInterval time.Duration
}

// Agent manages the node's workloads.
type Agent struct {
	opts    Options
	log     *slog.Logger
	store   *store
	images  Images
	drivers map[api.Isolation]driver.Driver
	logsDir string

	ctx    context.Context // the agent's lifetime; supervisors stop with it
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// writeMu serializes read-modify-write of records so each commit sees
	// the one before it.
	writeMu sync.Mutex

	mu      sync.Mutex // guards the fields below
	recs    map[string]*record
	names   map[string]string // name -> id
	index   uint64
	changed chan struct{}          // closed and replaced on every commit
	sups    map[string]*supervisor // each workload's supervisor, while one runs
	runs    map[string]*runLock    // per-workload locks of run transitions

	health healthCache
	pol    *policyHolder
	events *eventLog
	// startedAt is when this agent process started; nodeID is the node's
	// persisted identity.
	startedAt time.Time
	nodeID    string
	capacity  api.NodeResources
	conds     conditions
	// recovered is closed when the start-up work that runs in the
	// background (interrupted deletes, the first reconciliation) is done.
	recovered chan struct{}
}

// New opens the agent's state and recovers every workload it knew: those
// that kept running while it was down are re-attached, those that ended get
// their exit recorded, those half-started are started.
func New(ctx context.Context, opts Options) (*Agent, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.StopTimeout == 0 {
		opts.StopTimeout = 10 * time.Second
	}
	if opts.RestartBackoff == 0 {
		opts.RestartBackoff = time.Second
	}
	if opts.Defaults.Network == "" {
		opts.Defaults.Network = api.NetworkNone
		if opts.Network != nil {
			opts.Defaults.Network = api.NetworkBridge
		}
	}
	pol, err := loadPolicy(opts.PolicyFile, opts.Logger)
	if err != nil {
		return nil, err
	}
	st, err := openStore(opts.DataDir)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		opts:    opts,
		log:     opts.Logger,
		store:   st,
		images:  opts.Images,
		drivers: map[api.Isolation]driver.Driver{},
		logsDir: filepath.Join(opts.DataDir, "logs"),
		recs:    map[string]*record{},
		names:   map[string]string{},
		changed: make(chan struct{}),
		sups:    map[string]*supervisor{},
		runs:    map[string]*runLock{},
		pol:     pol,
		events:  newEventLog(time.Now()),

		startedAt: time.Now().UTC(),
		capacity:  hostCapacity(),
		recovered: make(chan struct{}),
	}
	if opts.Capacity != nil {
		a.capacity = *opts.Capacity
	}
	for _, d := range opts.Drivers {
		a.drivers[api.Isolation(d.Name())] = d
	}
	if err := os.MkdirAll(a.logsDir, 0o700); err != nil {
		st.close()
		return nil, err
	}
	if err := a.loadNodeID(); err != nil {
		st.close()
		return nil, fmt.Errorf("node id: %w", err)
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	if err := a.recover(ctx); err != nil {
		a.cancel()
		st.close()
		return nil, err
	}
	pol.onChange = a.policyChanged
	if err := pol.watch(); err != nil {
		// Without inotify the agent still works; only edits need a restart.
		a.log.Warn("isolation policy hot reload is off: cannot watch the file", "source", opts.PolicyFile, "error", err)
	}
	a.log.Info("isolation policy loaded", "source", pol.current().source, "version", pol.current().policy.Version())
	a.wg.Add(2)
	go a.healthLoop()
	go a.reconcileLoop()
	return a, nil
}

// Close stops supervising (workloads keep running: their monitors and
// domains do not depend on the agent) and closes the state database.
func (a *Agent) Close() error {
	a.pol.close()
	a.cancel()
	a.wg.Wait()
	return a.store.close()
}

// ---- records ----------------------------------------------------------

func newID() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// lookup finds a workload by id or name; the caller holds a.mu.
func (a *Agent) lookupLocked(ref string) (*record, bool) {
	if r, ok := a.recs[ref]; ok {
		return r, true
	}
	if id, ok := a.names[ref]; ok {
		return a.recs[id], true
	}
	return nil, false
}

// get finds a workload by id or name. A workload being deleted is found
// until everything it held is released and its record is gone.
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

// commitLocked persists r as the new version of its record and publishes
// it, and sees that a record with work left (a run, a stop, a delete) has
// a supervisor, which it wakes. The caller holds a.writeMu. Records in
// a.recs are never mutated after publication, so readers may hold them
// without locks.
func (a *Agent) commitLocked(r *record) error {
	a.mu.Lock()
	idx := a.index + 1
	prev := a.recs[r.Workload.ID]
	a.mu.Unlock()
	r.Workload.ModifyIndex = idx
	r.Workload.Deleting = r.Deleting
	if err := a.store.put(r, idx); err != nil {
		return fmt.Errorf("persist workload %s: %w", r.Workload.ID, err)
	}
	a.mu.Lock()
	a.index = idx
	a.recs[r.Workload.ID] = r
	a.bindNameLocked(r)
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
	a.publishTransition(prev, r)
	if needsSupervisor(r) {
		a.supervise(r.Workload.ID)
	}
	return nil
}

// bindNameLocked makes r's name find r, unless the name is another
// record's: a name is never taken from the workload that holds it (a
// workload being deleted holds its name until it is gone, and Submit
// refuses the name meanwhile). The caller holds a.mu.
func (a *Agent) bindNameLocked(r *record) {
	name := r.Workload.Name
	if name == "" {
		return
	}
	if id, ok := a.names[name]; ok && id != r.Workload.ID {
		if _, live := a.recs[id]; live {
			return
		}
	}
	a.names[name] = r.Workload.ID
}

// errSkip aborts a mutation without an error to report.
var errSkip = errors.New("skip")

// mutate applies fn to a copy of the workload's record and commits it. fn
// may return errSkip to leave the record as it is.
func (a *Agent) mutate(id string, fn func(r *record) error) (*record, error) {
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
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	a.mu.Lock()
	idx := a.index + 1
	a.mu.Unlock()
	if err := a.store.delete(id, idx); err != nil {
		return fmt.Errorf("delete workload %s: %w", id, err)
	}
	a.mu.Lock()
	if r, ok := a.recs[id]; ok && r.Workload.Name != "" && a.names[r.Workload.Name] == id {
		delete(a.names, r.Workload.Name)
	}
	delete(a.recs, id)
	a.index = idx
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
	a.events.publish(api.Event{Type: api.EventWorkloadDeleted, WorkloadID: id, Message: "workload " + id + " deleted"})
	return nil
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
	if err := a.store.setIndex(idx); err != nil {
		a.log.Warn("persist state index", "err", err)
		return
	}
	a.mu.Lock()
	a.index = idx
	close(a.changed)
	a.changed = make(chan struct{})
	a.mu.Unlock()
}

// Index returns the current state index and a channel closed at the next
// change, for blocking queries.
func (a *Agent) Index() (uint64, <-chan struct{}) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.index, a.changed
}

// ---- submit ----------------------------------------------------------

// Submit admits a workload: validates it, places it, persists it (before it
// returns) and starts it in the background. A submit naming an existing
// workload with the same spec returns that workload (created false), so
// clients can retry safely; with a different spec it is a conflict.
func (a *Agent) Submit(ctx context.Context, spec api.WorkloadSpec) (*api.Workload, bool, error) {
	spec, err := normalize(spec, a.opts.Defaults)
	if err != nil {
		return nil, false, err
	}
	img, err := a.images.Get(spec.Image)
	if err != nil {
		if errors.Is(err, errdefs.ErrNotFound) {
			return nil, false, &errdefs.ValidationError{Fields: []errdefs.FieldError{{
				Field:  "image",
				Detail: fmt.Sprintf("image %s is not on this node; pull it (POST /v1/images/pull) or import it (POST /v1/images) first", spec.Image),
			}}}
		}
		return nil, false, err
	}
	if img.Kind == image.KindDisk {
		if spec, err = diskSpec(spec); err != nil {
			return nil, false, err
		}
	} else if _, err := resolveCommand(spec, img); err != nil {
		return nil, false, err
	}
	if w := a.existing(spec); w != nil {
		return w, false, nil
	}
	placement, err := a.place(ctx, spec)
	if err != nil {
		return nil, false, err
	}

	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	if spec.Name != "" {
		a.mu.Lock()
		existing, ok := a.lookupLocked(spec.Name)
		a.mu.Unlock()
		if ok && existing.Deleting {
			return nil, false, fmt.Errorf("a workload named %q (id %s) is being deleted; submit again once it is gone: %w", spec.Name, existing.Workload.ID, errdefs.ErrConflict)
		}
		if ok {
			if reflect.DeepEqual(existing.Workload.Spec, spec) {
				w := cloneWorkload(existing.Workload)
				return &w, false, nil
			}
			return nil, false, fmt.Errorf("a workload named %q already exists with a different spec (id %s): %w", spec.Name, existing.Workload.ID, errdefs.ErrAlreadyExists)
		}
	}
	now := time.Now().UTC()
	r := &record{Workload: api.Workload{
		ID:          newID(),
		Name:        spec.Name,
		Spec:        spec,
		State:       api.StatePending,
		Isolation:   placement.Isolation,
		Placement:   placement,
		ImageDigest: img.Digest,
		CreatedAt:   now,
		Network:     &api.NetworkStatus{Mode: placement.Network},
	}}
	if r.Workload.Network.Mode == "" {
		r.Workload.Network.Mode = spec.Network
	}
	if err := a.admitLocked(&r.Workload); err != nil {
		return nil, false, err
	}
	if err := a.commitLocked(r); err != nil {
		return nil, false, err
	}
	a.log.Info("workload admitted", "workload_id", r.Workload.ID, "name", spec.Name, "image", spec.Image,
		"isolation", placement.Isolation, "rule", placement.DecidingRule)
	w := cloneWorkload(r.Workload)
	return &w, true, nil
}

// resolveCommand merges the image's entrypoint and cmd with the spec's
// command and args the way Kubernetes does: command replaces the
// entrypoint (and drops the image's cmd), args replace the cmd.
func resolveCommand(spec api.WorkloadSpec, img *image.Image) ([]string, error) {
	var argv []string
	switch {
	case len(spec.Command) > 0:
		argv = append(append(argv, spec.Command...), spec.Args...)
	case len(spec.Args) > 0:
		argv = append(append(argv, img.Config.Entrypoint...), spec.Args...)
	default:
		argv = append(append(argv, img.Config.Entrypoint...), img.Config.Cmd...)
	}
	if len(argv) == 0 {
		return nil, errdefs.Invalid("command", "image %s has no entrypoint or cmd; give a command", spec.Image)
	}
	return argv, nil
}

// taskConfig turns a workload into the runtime-neutral task its driver runs.
func (a *Agent) taskConfig(ctx context.Context, w *api.Workload) (*driver.TaskConfig, error) {
	img, err := a.images.Get(w.ImageDigest)
	if err != nil {
		return nil, fmt.Errorf("image %s (%s) is gone from the node: %w", w.Spec.Image, w.ImageDigest, err)
	}
	logDir := a.logDir(w.ID)
	if img.Kind == image.KindDisk {
		disk, err := a.images.DiskPath(img)
		if err != nil {
			return nil, err
		}
		if err := os.MkdirAll(logDir, 0o700); err != nil {
			return nil, err
		}
		return &driver.TaskConfig{
			ID: w.ID, Name: w.Name,
			Image: driver.Image{Ref: img.Ref, Digest: img.Digest, DiskPath: disk},
			Resources: driver.Resources{
				CPU:         w.Spec.Resources.CPU,
				MemoryBytes: w.Spec.Resources.MemoryMB << 20,
				Pids:        w.Spec.Resources.Pids,
			},
			Labels: w.Spec.Labels,
			LogDir: logDir,
		}, nil
	}
	rootfs, err := a.images.Rootfs(ctx, img)
	if err != nil {
		return nil, fmt.Errorf("unpack image %s: %w", w.Spec.Image, err)
	}
	argv, err := resolveCommand(w.Spec, img)
	if err != nil {
		return nil, err
	}
	env := mergeEnv(img.Config.Env, w.Spec.Env)
	workdir := w.Spec.Workdir
	if workdir == "" {
		workdir = img.Config.WorkingDir
	}
	if err := os.MkdirAll(logDir, 0o700); err != nil {
		return nil, err
	}
	return &driver.TaskConfig{
		ID:      w.ID,
		Name:    w.Name,
		Image:   driver.Image{Ref: img.Ref, Digest: img.Digest, RootfsDir: rootfs},
		Args:    argv,
		Env:     env,
		Workdir: workdir,
		User:    img.Config.User,
		Resources: driver.Resources{
			CPU:         w.Spec.Resources.CPU,
			MemoryBytes: w.Spec.Resources.MemoryMB << 20,
			Pids:        w.Spec.Resources.Pids,
		},
		Labels: w.Spec.Labels,
		LogDir: logDir,
	}, nil
}

func (a *Agent) logDir(id string) string { return filepath.Join(a.logsDir, id) }

// mergeEnv overlays the spec's variables on the image's, keeping the
// image's order and appending new ones sorted, so the result is stable.
func mergeEnv(imageEnv []string, specEnv map[string]string) []string {
	out := make([]string, 0, len(imageEnv)+len(specEnv))
	seen := map[string]bool{}
	for _, kv := range imageEnv {
		k, _, _ := cutEnv(kv)
		if v, ok := specEnv[k]; ok {
			out = append(out, k+"="+v)
		} else {
			out = append(out, kv)
		}
		seen[k] = true
	}
	keys := make([]string, 0, len(specEnv))
	for k := range specEnv {
		if !seen[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, k+"="+specEnv[k])
	}
	hasPath := false
	for _, kv := range out {
		if k, _, _ := cutEnv(kv); k == "PATH" {
			hasPath = true
		}
	}
	if !hasPath {
		out = append(out, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return out
}

func cutEnv(kv string) (string, string, bool) {
	for i := 0; i < len(kv); i++ {
		if kv[i] == '=' {
			return kv[:i], kv[i+1:], true
		}
	}
	return kv, "", false
}

// ---- reads ------------------------------------------------------------

// Get returns a workload by id or name.
func (a *Agent) Get(ctx context.Context, ref string) (*api.Workload, error) {
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	w := cloneWorkload(r.Workload)
	return &w, nil
}

// List returns the workloads that match f, oldest first; those being
// deleted are listed (deleting: true) until they are gone.
func (a *Agent) List(ctx context.Context, f api.ListFilter) []api.Workload {
	a.mu.Lock()
	recs := make([]*record, 0, len(a.recs))
	for _, r := range a.recs {
		recs = append(recs, r)
	}
	a.mu.Unlock()
	out := make([]api.Workload, 0, len(recs))
	for _, r := range recs {
		w := &r.Workload
		if f.State != "" && w.State != f.State || f.Isolation != "" && w.Isolation != f.Isolation {
			continue
		}
		match := true
		for k, v := range f.Labels {
			if got, ok := w.Spec.Labels[k]; !ok || (v != "" && got != v) {
				match = false
				break
			}
		}
		if match {
			out = append(out, cloneWorkload(*w))
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Stats reads a running workload's resource usage from its driver.
func (a *Agent) Stats(ctx context.Context, ref string) (*api.Stats, error) {
	r, err := a.get(ref)
	if err != nil {
		return nil, err
	}
	if r.Workload.State != api.StateRunning && r.Workload.State != api.StateStopping {
		return nil, fmt.Errorf("workload %s is %s; stats exist only while it runs: %w", r.Workload.ID, r.Workload.State, errdefs.ErrFailedPrecondition)
	}
	d, err := a.driverFor(r.Workload.Isolation)
	if err != nil {
		return nil, err
	}
	st, err := d.Stats(ctx, r.Workload.ID)
	if err != nil {
		return nil, err
	}
	return &api.Stats{
		Time:          time.Now().UTC(),
		CPUUsageNanos: st.CPUUsageNanos,
		MemoryBytes:   st.MemoryBytes,
		MemoryLimit:   st.MemoryLimit,
		Pids:          st.Pids,
		PidsLimit:     st.PidsLimit,
	}, nil
}

func (a *Agent) driverFor(iso api.Isolation) (driver.Driver, error) {
	d, ok := a.drivers[iso]
	if !ok {
		return nil, fmt.Errorf("no %s driver on this node: %w", iso, errdefs.ErrUnavailable)
	}
	return d, nil
}

// diskSpec checks a spec that boots a whole-disk image: it runs in a VM
// (an auto request becomes a vm request, so policy may still deny it), and
// the disk's own OS decides what runs, so the spec names no command, env
// or workdir.
func diskSpec(spec api.WorkloadSpec) (api.WorkloadSpec, error) {
	v := &errdefs.ValidationError{}
	switch spec.Isolation {
	case api.IsolationAuto, api.IsolationVM:
		spec.Isolation = api.IsolationVM
	default:
		v.Add("isolation", "%s is a whole-disk image: it runs only in a VM", spec.Image)
	}
	if len(spec.Command) > 0 || len(spec.Args) > 0 {
		v.Add("command", "a whole-disk image boots its own OS; it takes no command")
	}
	if len(spec.Env) > 0 {
		v.Add("env", "a whole-disk image boots its own OS; it takes no environment")
	}
	if spec.Workdir != "" {
		v.Add("workdir", "a whole-disk image boots its own OS; it takes no workdir")
	}
	if spec.Network == api.NetworkHost {
		v.Add("network", "host is for containers only")
	}
	if err := v.Err(); err != nil {
		return spec, err
	}
	return spec, nil
}
