// Package agent is berth's lifecycle manager: it admits workloads, asks
// placement where each runs, drives the matching driver, persists every
// record before acknowledging, and recovers all of it after a restart.
//
// The agent knows nothing of HTTP (api/server calls it) and nothing of runc
// or libvirt (drivers do that behind driver.Driver).
package agent

import (
	"context"
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
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/network"
	"github.com/berthd/berth/volume"
)

// Images is what the agent needs of the image store.
type Images interface {
	Get(ref string) (*image.Image, error)
	Rootfs(ctx context.Context, img *image.Image) (string, error)
	List() []*image.Image
	Pull(ctx context.Context, ref string) (*image.Image, error)
	PullWith(ctx context.Context, ref string, o image.PullOptions) (*image.Image, error)
	// Resolve reads an image's manifest and config from its registry
	// without storing anything; PullShared pulls that digest, one pull for
	// every concurrent caller, with progress.
	Resolve(ctx context.Context, ref string) (*image.Image, error)
	PullShared(ctx context.Context, ref, digest string, progress func(done, total int64)) (*image.Image, error)
	Import(ctx context.Context, r io.Reader, ref string) ([]*image.Image, error)
	ImportDisk(ctx context.Context, r io.Reader, ref string) (*image.Image, error)
	DiskPath(img *image.Image) (string, error)
	Remove(ref string) error
	// Touch marks an image used now; Collect removes unused images past
	// the high watermark, PruneImages by hand (image/gc.go).
	Touch(digest string)
	Collect() ([]image.Removed, error)
	PruneImages(all bool) ([]image.Removed, error)
	// GetAs, ListAs and RemoveAs see only the images the viewer may:
	// another tenant's private image is missing (imageowners.go).
	GetAs(v image.Viewer, ref string) (*image.Image, error)
	ListAs(v image.Viewer) []*image.Image
	RemoveAs(v image.Viewer, ref string) error
	// DiskPressure says why the data directory has too little free space
	// to take more (nil when it has room).
	DiskPressure() error
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
	// BootID is the node's boot id (the drivers' too): a start the node's
	// reboot interrupted is told from one the agent's crash interrupted.
	BootID string
	Logger *slog.Logger
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
	// Volumes is the node's volume store; nil refuses every volume.
	Volumes *volume.Store
	// VMVolumeOwner, when set, is the user VMs' volumes are shown to as
	// their root (QEMU's, which serves 9p itself).
	VMVolumeOwner *volume.Owner
	// DiskInterval is how often the data directory's free space is
	// checked against the floor; default 10s.
	DiskInterval time.Duration
	// OnStart, when set, is told how long each start took that came to
	// an end by itself (running, or failed with err); starts called off
	// by a stop, a delete or the agent's shutdown are not reported. It
	// must not block: metrics record it.
	OnStart func(iso api.Isolation, took time.Duration, err error)
	// ExecLimits caps the exec sessions open at once (exec_limits.go).
	ExecLimits ExecLimits
}

// Agent manages the node's workloads.
type Agent struct {
	opts      Options
	execSlots execSlots
	log       *slog.Logger
	store     *store
	commits   *committer
	images    Images
	drivers   map[api.Isolation]driver.Driver
	logsDir   string

	// diskErr is the last free-space verdict (disk.go).
	diskMu  sync.Mutex
	diskErr string

	ctx    context.Context // the agent's lifetime; supervisors stop with it
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// writeMu serializes read-modify-write of records so each commit sees
	// the one before it.
	writeMu sync.Mutex

	mu       sync.Mutex // guards the fields below
	recs     map[string]*record
	names    map[string]string // api.Ref(tenant, name) -> id
	index    uint64
	indexNow atomic.Pointer[indexState]      // the index and its change channel, replaced on every commit
	sups     map[string]*supervisor          // each workload's supervisor, while one runs
	pulls    map[string]*api.ImagePullStatus // by workload id, while its image downloads
	// admitting counts the submits in flight per image digest: image
	// collection leaves their images alone.
	admitting map[string]int
	// healths are the running workloads' health (probe.go), by id.
	healths map[string]*runHealth
	runs    map[string]*runLock // per-workload locks of run transitions

	health healthCache
	pol    *policyHolder
	events *eventLog
	// logWatch wakes log followers when output is written.
	logWatch logWatch
	// startedAt is when this agent process started; nodeID is the node's
	// persisted identity.
	startedAt time.Time
	nodeID    string
	capacity  api.NodeResources
	conds     conditions
	// cordon is the operator's cordon (maintenance.go); nil means the
	// node is schedulable. Guarded by mu, changed under writeMu.
	cordon *api.NodeCordon
	// recovered is closed when the first reconciliation, which runs in the
	// background after recovery, is done.
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
	commits, err := newCommitter(st.db)
	if err != nil {
		st.close()
		return nil, err
	}
	// Until New returns the agent, a failure closes what it opened.
	ok := false
	defer func() {
		if !ok {
			commits.close()
			st.close()
		}
	}()
	a := &Agent{
		opts:    opts,
		log:     opts.Logger,
		store:   st,
		commits: commits,
		images:  opts.Images,
		drivers: map[api.Isolation]driver.Driver{},
		logsDir: filepath.Join(opts.DataDir, "logs"),
		recs:    map[string]*record{},
		names:   map[string]string{},
		sups:    map[string]*supervisor{},
		pulls:   map[string]*api.ImagePullStatus{},

		admitting: map[string]int{},
		healths:   map[string]*runHealth{},
		runs:      map[string]*runLock{},
		pol:       pol,
		events:    newEventLog(time.Now()),

		startedAt: time.Now().UTC(),
		capacity:  hostCapacity(),
		recovered: make(chan struct{}),
	}
	a.indexNow.Store(&indexState{changed: make(chan struct{})})
	if opts.Capacity != nil {
		a.capacity = *opts.Capacity
	}
	for _, d := range opts.Drivers {
		a.drivers[api.Isolation(d.Name())] = d
	}
	if err := os.MkdirAll(a.logsDir, 0o700); err != nil {
		return nil, err
	}
	if err := a.loadNodeID(); err != nil {
		return nil, fmt.Errorf("node id: %w", err)
	}
	if err := a.loadCordon(); err != nil {
		return nil, err
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	if err := a.recover(ctx); err != nil {
		a.cancel()
		return nil, err
	}
	pol.onChange = a.policyChanged
	if err := pol.watch(); err != nil {
		// Without inotify the agent still works; only edits need a restart.
		a.log.Warn("isolation policy hot reload is off: cannot watch the file", "source", opts.PolicyFile, "error", err)
	}
	a.log.Info("isolation policy loaded", "source", pol.current().source, "version", pol.current().policy.Version())
	a.checkDisk()
	a.resumeDrain()
	a.wg.Add(3)
	go a.healthLoop()
	go a.reconcileLoop()
	go a.diskLoop()
	ok = true
	return a, nil
}

// Close stops supervising (workloads keep running: their monitors and
// domains do not depend on the agent) and closes the state database.
func (a *Agent) Close() error {
	a.pol.close()
	a.cancel()
	a.wg.Wait()
	a.logWatch.close()
	return errors.Join(a.commits.close(), a.store.close())
}

func (a *Agent) driverFor(iso api.Isolation) (driver.Driver, error) {
	d, ok := a.drivers[iso]
	if !ok {
		return nil, fmt.Errorf("no %s driver on this node: %w", iso, errdefs.ErrUnavailable)
	}
	return d, nil
}
