// Package driver is the contract between berth's agent and the runtimes that
// actually run workloads (ctrdriver: runc containers, vmdriver: libvirt VMs).
//
// A driver knows nothing of HTTP, policy or the agent's store: it receives a
// runtime-neutral TaskConfig, runs it, and answers for it by task id. Each
// driver keeps whatever state it needs on disk under its own directory so
// that Recover can re-attach after the agent restarts; the Handle it returns
// from Start is persisted by the agent as a versioned, opaque blob.
package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/berthd/berth/errdefs"
)

// Driver runs tasks of one isolation kind. Every method takes ctx first and
// returns errors wrapping an errdefs class (errdefs.ErrNotFound for an
// unknown task id, and so on).
type Driver interface {
	// Name is the isolation the driver provides: "container" or "vm".
	Name() string
	// Fingerprint probes what the driver can do on this node. It never fails:
	// a broken runtime is reported as unhealthy with a reason.
	Fingerprint(ctx context.Context) Fingerprint
	// Start creates and starts the task. When it returns nil the task is
	// running (or has already exited) and Wait will report its end.
	Start(ctx context.Context, cfg *TaskConfig) (*Handle, error)
	// Wait blocks until the task has exited, or ctx ends.
	Wait(ctx context.Context, id string) (*ExitResult, error)
	// Ended returns a channel closed once the task has ended; Wait then
	// answers at once. The agent selects on it with the rest of a running
	// workload's events, so a running workload costs it no goroutine
	// parked in Wait.
	Ended(id string) (<-chan struct{}, error)
	// Stop asks the task to end (SIGTERM), then forces it after timeout.
	// Stopping a task that already exited is not an error. The stop is
	// the driver's once asked: its deadline is persisted and enforced
	// whether or not the caller still waits (ctx only bounds the wait),
	// and it resumes after Recover when the agent restarted meanwhile.
	Stop(ctx context.Context, id string, timeout time.Duration) error
	// Destroy removes every resource the driver made for the task, killing
	// it first if it still runs. Destroying an unknown task is not an error.
	Destroy(ctx context.Context, id string) error
	// Inspect reports the task's current state.
	Inspect(ctx context.Context, id string) (*TaskStatus, error)
	// Stats reads the task's resource usage.
	Stats(ctx context.Context, id string) (*Stats, error)
	// Recover re-attaches to a task after the agent restarted, from the
	// handle persisted at Start (which may carry only the id when the agent
	// died before it could persist the rest).
	Recover(ctx context.Context, h *Handle) error
	// List returns the ids of every task the driver has resources for on
	// this node, running or not, so the agent can reconcile its store.
	List(ctx context.Context) ([]string, error)
	// Close releases what the driver holds for itself (connections,
	// background probes and the guests they run). Tasks keep running and
	// a new driver over the same root recovers them.
	Close(ctx context.Context) error
}

// ErrRebooted is returned (wrapped) by Recover for a task that was started
// in an earlier boot of the node: whatever it was is gone, and the driver
// has released what it left on disk.
var ErrRebooted = errors.New("node rebooted")

// TaskConfig is everything a driver needs to run one task. The agent has
// already resolved the image's defaults (entrypoint, env, workdir) into it.
type TaskConfig struct {
	ID      string
	Name    string
	Image   Image
	Args    []string
	Env     []string // KEY=VALUE
	Workdir string
	// User is the image's user, "uid[:gid]"; empty means root.
	User      string
	Resources Resources
	Labels    map[string]string
	// LogDir is where the driver writes StdoutLog and StderrLog. The agent
	// owns the directory and removes it after Destroy.
	LogDir string
	// Logs bound each of the two logs; zero fields take the driver's
	// defaults.
	Logs LogLimits
	// Network is the task's place on the node network; nil means loopback
	// only (mode none).
	Network *Network
	// Mounts are the task's volumes, staged by the agent (see Mount).
	Mounts []Mount
	// Stdin keeps the main process's standard input open for attach
	// sessions (see Attacher); without it the process reads /dev/null.
	Stdin bool
	// TTY runs the main process on a terminal of its own (80x24 until an
	// attach resizes it); its output, stdout and stderr together, is
	// written to StdoutLog.
	TTY bool
	// Commit, when set, is called by Start once everything of the task is
	// prepared and before anything of the workload can run (the monitor
	// that runs it is spawned, the domain created): the agent's record
	// that the start began is on disk by its return. An error aborts the
	// start, which then removes what it made.
	Commit func() error
}

// RunCommit calls cfg.Commit when there is one.
func (cfg *TaskConfig) RunCommit() error {
	if cfg.Commit == nil {
		return nil
	}
	if err := cfg.Commit(); err != nil {
		return fmt.Errorf("record the start: %w", err)
	}
	return nil
}

// Mount is a host directory a task sees at Target. The agent has staged
// Source as a mount of its own (nosuid, nodev, and read-only when
// ReadOnly), which the driver binds (a container) or shares (a VM) as it
// is; it never resolves a path the workload could have changed.
type Mount struct {
	Source   string
	Target   string
	ReadOnly bool
}

// Network modes.
const (
	NetworkBridge = "bridge"
	NetworkNone   = "none"
	NetworkHost   = "host"
)

// Network is a task's network, made by the agent before Start.
type Network struct {
	// Mode is bridge, none or host (containers only).
	Mode string
	// Netns is the network namespace a container joins (bridge mode).
	Netns string
	// Bridge is the bridge a VM's NIC joins, with MAC as its address.
	Bridge string
	MAC    string
	// Address is the task's address with prefix length, e.g.
	// 10.88.0.5/16; Gateway the default route; DNS the name servers.
	Address string
	Gateway string
	DNS     []string
	// ResolvConf is the resolv.conf the task sees.
	ResolvConf []byte
}

// Image is the task's root filesystem source.
type Image struct {
	Ref    string
	Digest string
	// RootfsDir is the image's unpacked, read-only root filesystem, shared by
	// every task of that image. Drivers must layer a per-task copy-on-write
	// view over it and never write into it.
	RootfsDir string
	// DiskPath, when set, is an absolute path to a bootable whole-disk
	// image in qcow2 format, booted instead of an OCI root filesystem, for
	// workloads that need a full OS; RootfsDir is then unused. Only the VM
	// driver runs such tasks. The image is shared and never written: each
	// task boots a copy-on-write overlay over it. The guest boots by its
	// own bootloader (BIOS), so Args, Env, Workdir and User are not passed
	// in (the disk's OS decides what runs) and may be empty. The guest's
	// first serial port (ttyS0) is the task's stdout log; stderr stays
	// empty. The task exits 0 when the guest powers itself off (or resets),
	// and 137 (SIGKILL) when it was forced off: Stop presses the ACPI power
	// button and forces the VM off after its timeout.
	DiskPath string
}

// Resources are the task's limits.
type Resources struct {
	CPU         float64 // cores
	MemoryBytes int64
	Pids        int64
	// DiskBytes bounds what the task may write to its root filesystem
	// (0: no bound of its own). A container's writable layer lives on a
	// filesystem of this size; a VM's root disk has this much free space.
	// Writing past it fails with ENOSPC inside the task, never on the node.
	DiskBytes int64
	// CPURequest (cores, at most CPU) is the share the task is promised
	// when the node's CPUs are contended: a container's CPU weight. 0
	// means the runtime's default weight.
	CPURequest float64
}

// LogLimits bound a task's logs: each rotates at MaxBytes, keeping
// MaxFiles rotated files (StdoutLog.1 is the newest).
type LogLimits struct {
	MaxBytes int64
	MaxFiles int
}

// Names of the log files in TaskConfig.LogDir.
const (
	StdoutLog = "stdout.log"
	StderrLog = "stderr.log"
)

// Handle is a driver's persisted knowledge of a task.
type Handle struct {
	ID      string          `json:"id"`
	Driver  string          `json:"driver"`
	Version int             `json:"version"`
	State   json.RawMessage `json:"state,omitempty"`
}

// TaskState is what a driver knows of a task's life.
type TaskState string

const (
	TaskRunning TaskState = "running"
	TaskExited  TaskState = "exited"
)

// TaskStatus is the answer of Inspect.
type TaskStatus struct {
	ID        string
	State     TaskState
	Pid       int
	StartedAt time.Time
	Exit      *ExitResult // set when State is TaskExited
}

// ExitResult is how a task ended.
type ExitResult struct {
	ExitCode int
	// Signal is the signal that killed the task, 0 if it exited by itself.
	Signal    int
	OOMKilled bool
	// Err is set when the driver lost track of the task and the code is a guess.
	Err        string
	FinishedAt time.Time
}

// Stats is a resource reading.
type Stats struct {
	CPUUsageNanos uint64
	MemoryBytes   uint64
	// MemoryWorkingSetBytes is the memory the task would keep under
	// pressure: for a container its usage less inactive file cache (what
	// cAdvisor calls the working set), for a VM the resident memory of
	// its QEMU process.
	MemoryWorkingSetBytes uint64
	MemoryLimit           uint64
	Pids                  uint64
	PidsLimit             uint64
}

// Fingerprint is a driver's self-report.
type Fingerprint struct {
	Healthy bool
	// Reason says why the driver is unhealthy.
	Reason  string
	Version string
	// Capabilities are what the agent decides on; Details are for people.
	Capabilities Capabilities
	// Details are driver specific facts, e.g. cgroup_mode, runc_version.
	Details map[string]string
}

// Capabilities say what a driver can run on this node.
type Capabilities struct {
	// WholeDisk: the driver boots whole-disk images (Image.DiskPath).
	WholeDisk bool
	// HostNetwork: the driver can run tasks in the host's network.
	HostNetwork bool
	// UserNS: each task's root is an unprivileged host uid of its own.
	UserNS bool
	// Accel is a VM driver's accelerator; empty for other drivers.
	Accel Accel
}

// Accel is how a VM driver runs guests.
type Accel string

const (
	AccelKVM Accel = "kvm"
	AccelTCG Accel = "tcg"
	// AccelProbing: the driver is still finding out whether KVM works.
	AccelProbing Accel = "probing"
)

// CheckID enforces the one task id rule of every driver: ids name
// directories, domains, cgroups and runc containers, so they are 1-64
// letters, digits, '.', '_' or '-', starting with a letter or digit.
func CheckID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("task id %q: want 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit: %w", id, errdefs.ErrInvalidArgument)
	}
	return nil
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
