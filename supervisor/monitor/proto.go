// Package monitor is the per-task monitor process of berth, in the pattern
// of conmon and containerd-shim, and the on-disk protocol it speaks with the
// agent's supervisor (package supervisor).
//
// A monitor runs in its own session, outlives agent restarts and owns its
// task: for a container it is runc's parent and the container's subreaper,
// owns the container's stdio and records its exit status; for a VM it
// drains the guest's virtio-serial ports into the task's logs. It enforces a
// container's stop deadline (SIGTERM, then SIGKILL) whether or not an agent
// is there to watch.
//
// The monitor binary (cmd/berth-monitor) links this package and nothing
// heavier than the standard library and x/sys: it lives as long as every
// workload, one per workload, so its memory is paid many times over.
//
// The protocol is files in the task directory, each replaced atomically:
//
//	monitor.json  Config      written by the agent before the monitor starts
//	monitor.pid   PidRecord   written by the monitor first thing (and by the agent)
//	status.json   Status      written by the monitor at each step of the task
//	stop.json     StopRequest written by the agent; SIGUSR1 tells the monitor
//	attach.sock   a container monitor's attach socket (protocol 3 on; see
//	              attach.go), served while its task runs
//
// plus one control message: SIGUSR1, "read stop.json now". The files are
// replaced atomically but not synced: they mean nothing after a power loss
// (the node's next boot finds them stamped with another boot id and
// releases what they name), and a process crash loses nothing of them.
// Every record
// carries the protocol version, so an agent adopts monitors an older agent
// started (records without a version are version 1: the layout before the
// supervisor was shared, which a new agent still reads).
package monitor

import (
	"strings"
	"time"

	"github.com/berthd/berth/internal/proc"
)

// Version is the protocol version this package writes.
const Version = 3

// Protocol versions: 1, the layout before the supervisor was shared; 2,
// the monitor enforces stop requests (stop.json); 3, a container monitor
// serves AttachSocket and holds the task's stdin and terminal.

// Files of the protocol, in the task directory.
const (
	ConfigFile = "monitor.json"
	PidFile    = "monitor.pid"
	StatusFile = "status.json"
	StopFile   = "stop.json"
	LogFile    = "monitor.log"
)

// ReadyFD is the pipe (the monitor's fd 3) on which the monitor tells the
// agent that its task runs, or that it failed to start.
const ReadyFD = 3

// EndedFD is the pipe (fd 4) on which the monitor tells the agent that the
// task's end is recorded, before it releases runc's state and the cgroup:
// the agent reports the exit without waiting for that clean-up. Its EOF,
// when the monitor exits, says the same.
const EndedFD = 4

// SpareArg, as the monitor's first argument, makes a monitor started
// ahead of its task (a spare): it waits for the task directory on
// TaskDirFD, so a start does not wait for a process to be created and a Go
// program to start up. SpareTitle follows it: the room its command line
// (ps, /proc/PID/cmdline) needs to name the task directory once it has it,
// as a monitor started for its task does.
const SpareArg = "-"

// SpareTitle is a spare's second argument: "spare", padded.
var SpareTitle = "spare" + strings.Repeat(" ", 250)

// NiceEnv names the niceness a spare monitor takes when it is handed its
// task: the agent starts spares in the background (proc.BackgroundNice),
// and the task's monitor, runc and the container run at the agent's own.
const NiceEnv = "BERTH_MONITOR_NICE"

// TaskDirFD is the pipe (fd 5) on which a spare monitor is handed its task
// directory, followed by end of file. End of file with nothing before it
// lets the spare go unused.
const TaskDirFD = 5

// Kind says what a monitor supervises.
type Kind string

const (
	// KindRunc is an OCI container run by runc.
	KindRunc Kind = "runc"
	// KindPorts is a VM: the monitor drains the guest's unix-socket ports
	// into files until QEMU ends. The VM's lifecycle is libvirt's, so the
	// agent's supervisor, not the monitor, enforces its stop deadline.
	KindPorts Kind = "ports"
)

// Config is what the agent tells a monitor (monitor.json).
type Config struct {
	Version int    `json:"version"`
	Kind    Kind   `json:"kind"`
	ID      string `json:"id"`
	// BootID is the node's boot id the agent runs under; the monitor
	// stamps it on its pid record, so a record of an earlier boot is
	// recognised as dead even if its pid was reused.
	BootID string `json:"boot_id,omitempty"`
	// LogMaxBytes is the size of each output log at which it rotates (or,
	// with LogMaxFiles 0, is capped); 0 means no limit.
	LogMaxBytes int64 `json:"log_max_bytes"`
	// LogMaxFiles is how many rotated files of each log are kept
	// (RotatedLog); 0 caps the log instead of rotating it.
	LogMaxFiles int `json:"log_max_files,omitempty"`

	Runc  *RuncConfig  `json:"runc,omitempty"`
	Ports *PortsConfig `json:"ports,omitempty"`
}

// RuncConfig is a container monitor's task.
type RuncConfig struct {
	Runc     string `json:"runc"`
	RuncRoot string `json:"runc_root"`
	Bundle   string `json:"bundle"`
	// LogDir receives stdout.log and stderr.log.
	LogDir string `json:"log_dir"`
	// StartTimeout bounds runc create and runc start together, and
	// berth-entry's execution of the process's program: a runc (or a
	// process) that hangs fails the start instead of wedging the task.
	StartTimeout time.Duration `json:"start_timeout"`
	// Cgroup is the container's cgroup path (e.g. /berth/ID), read for
	// the OOM killer's verdict once the container ended.
	Cgroup string `json:"cgroup"`
	// Stdin keeps the container's stdin open for attach clients: a pipe
	// whose write end the monitor holds (without TTY).
	Stdin bool `json:"stdin,omitempty"`
	// TTY: the container's process runs on a terminal (the bundle says
	// terminal: true); runc hands the monitor its master through a
	// console socket, and the terminal's output goes to stdout.log.
	TTY bool `json:"tty,omitempty"`
	// Entry is set when the bundle's process starts through berth-entry
	// (its args[0] is EntryArg0).
	Entry *Entry `json:"entry,omitempty"`
}

// PortsConfig is a VM monitor's task.
type PortsConfig struct {
	// Sockets by port name: where QEMU listens for each port.
	Sockets map[string]string `json:"sockets"`
	// Outputs by port name: where each port's bytes are appended.
	Outputs map[string]string `json:"outputs"`
	// QEMU is the VM's process; the monitor ends when it does.
	QEMU proc.Ident `json:"qemu"`
	// Durable names ports whose output is synced on every write (the
	// status port); they are capped at DurableMaxBytes, and a guest that
	// writes more is misbehaving: the monitor records the failure and
	// kills QEMU.
	Durable         []string `json:"durable,omitempty"`
	DurableMaxBytes int64    `json:"durable_max_bytes,omitempty"`
}

// PidRecord identifies a monitor process for its whole life (monitor.pid).
type PidRecord struct {
	proc.Ident
	BootID  string `json:"boot_id,omitempty"`
	Version int    `json:"version,omitempty"`
}

// Task states in Status.
const (
	StateCreated = "created" // created, not yet started (protocol 1 monitors)
	StateRunning = "running"
	StateExited  = "exited"
	StateFailed  = "failed" // the task could not start, or the monitor gave up
)

// Status is the monitor's record of its task (status.json).
type Status struct {
	State      string    `json:"state"`
	Pid        int       `json:"pid,omitempty"`
	StartedAt  time.Time `json:"started_at,omitzero"`
	ExitCode   int       `json:"exit_code"`
	Signal     int       `json:"signal,omitempty"`
	OOMKilled  bool      `json:"oom_killed,omitempty"`
	Error      string    `json:"error,omitempty"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
	// Stopped is set when the task ended after a stop request.
	Stopped bool `json:"stopped,omitempty"`
	// GuestFault is set when the monitor ended a VM whose guest broke the
	// channel's rules (Error says how): its own report is not trusted.
	GuestFault bool `json:"guest_fault,omitempty"`
	Version    int  `json:"version,omitempty"`
}

// StopRequest asks for a task's end (stop.json): SIGTERM at RequestedAt,
// SIGKILL at RequestedAt + Grace. A later request never extends an earlier
// deadline.
type StopRequest struct {
	RequestedAt time.Time     `json:"requested_at"`
	Grace       time.Duration `json:"grace"`
	Version     int           `json:"version,omitempty"`
}

// Deadline is when the task is killed.
func (r StopRequest) Deadline() time.Time { return r.RequestedAt.Add(r.Grace) }
