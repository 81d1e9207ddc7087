// Package api holds berth's HTTP wire types and a Go client for them
// (package api/client). The handlers live in api/server. Everything here is
// JSON in snake_case and stable within /v1.
package api

import (
	"log/slog"
	"time"
)

// Isolation is how strongly a workload is isolated from the node.
type Isolation string

const (
	// IsolationAuto lets the node's policy decide (the default request).
	IsolationAuto Isolation = "auto"
	// IsolationContainer runs the workload as an OCI container under runc.
	IsolationContainer Isolation = "container"
	// IsolationVM runs the workload inside a libvirt virtual machine.
	IsolationVM Isolation = "vm"
)

// State is a workload's lifecycle state.
type State string

const (
	StatePending  State = "pending"
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateStopping State = "stopping"
	StateExited   State = "exited"
	StateFailed   State = "failed"
)

// Terminal reports whether the workload will not run again by itself.
func (s State) Terminal() bool { return s == StateExited || s == StateFailed }

// RestartPolicy says when berth restarts a workload that ended.
type RestartPolicy string

const (
	RestartNever     RestartPolicy = "never"
	RestartOnFailure RestartPolicy = "on-failure"
	RestartAlways    RestartPolicy = "always"
)

// TenantLabel is the workload label that names its tenant. A workload's
// name is unique within its tenant: the tenant's namespace, or the node's
// own for a workload without one (see Ref).
const TenantLabel = "tenant"

// Redacted stands in for a secret value in every answer: a secret_env
// value is written into the workload and nowhere a client, a log or an
// event can read it.
const Redacted = "<redacted>"

// Ref is how a named workload is addressed: TENANT/NAME, or NAME alone in
// the node's own namespace (a workload without a tenant). Names and tenant
// names hold no '/', so the two never meet. In a URL path the '/' is
// escaped (%2F), as url.PathEscape does.
func Ref(tenant, name string) string {
	if tenant == "" {
		return name
	}
	return tenant + "/" + name
}

// WorkloadSpec is what a submitter asks for. The same spec runs as a
// container or in a VM; the node's policy decides which.
type WorkloadSpec struct {
	// Name is optional and unique within the workload's tenant (a DNS
	// label); see Ref.
	Name string `json:"name,omitempty"`
	// Image is an OCI image reference. A missing one is pulled (ImagePull).
	Image string `json:"image"`
	// ImagePull is when the node pulls Image from its registry:
	// if-not-present (the default), always (a new digest of the tag is
	// pulled), or never (the image must be on the node).
	ImagePull PullPolicy `json:"image_pull,omitempty"`
	// Logs bound the workload's stdout and stderr logs within the
	// operator's maxima; zero fields take the node's defaults.
	Logs *LogSpec `json:"logs,omitempty"`
	// Health is the workload's health check (Workload.Health).
	Health *HealthCheck `json:"health,omitempty"`
	// Command replaces the image's entrypoint; Args replace its cmd.
	Command []string `json:"command,omitempty"`
	Args    []string `json:"args,omitempty"`
	// Env is added to (and overrides) the image's environment.
	Env map[string]string `json:"env,omitempty"`
	// SecretEnv is environment too, but its values are written only into
	// the workload (its process environment, a VM's config disk) and a
	// root-only file of the agent's: never into the state database, a log,
	// an event or an answer. Answers show each name with the value
	// Redacted. A name is in env or in secret_env, not both.
	SecretEnv map[string]string `json:"secret_env,omitempty"`
	// Workdir is an absolute path inside the image; default the image's.
	Workdir string            `json:"workdir,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	// Isolation is a request: policy may raise it but never lower it.
	Isolation  Isolation   `json:"isolation,omitempty"`
	Privileged bool        `json:"privileged,omitempty"`
	Resources  Resources   `json:"resources,omitempty"`
	Restart    RestartSpec `json:"restart,omitempty"`
	// Network is bridge (the default), none or host.
	Network string `json:"network,omitempty"`
	// Ports publishes workload ports on the node (bridge network only).
	Ports []PortMapping `json:"ports,omitempty"`
	// Volumes are named volumes and allowed host directories mounted into
	// the workload (api/volumes.go).
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// Stdin keeps the workload's standard input open for attach sessions
	// (GET /v1/workloads/{id}/attach, `berth attach`); without it the
	// workload reads end of file.
	Stdin bool `json:"stdin,omitempty"`
	// TTY runs the workload on a terminal of its own: its output (stdout
	// and stderr together, as a terminal writes them) goes to the stdout
	// log, and attach sessions type into it (`berth run -it`).
	TTY bool `json:"tty,omitempty"`
}

// Resources are the workload's requests: what admission counts against
// the node's allocatable. Limits are what the cgroup (or the VM: its vCPUs
// and guest RAM) enforces. A request given without a limit is also the
// limit; a limit given without a request is also the request (as in
// Kubernetes); a spec that gives neither gets the node's defaults, a small
// request under a larger limit (workload_defaults).
type Resources struct {
	// CPU in cores (0.5 is half a core).
	CPU      float64 `json:"cpu,omitempty"`
	MemoryMB int64   `json:"memory_mb,omitempty"`
	Pids     int64   `json:"pids,omitempty"`
	// DiskMB is the workload's ephemeral storage: what it may write to
	// its root filesystem (a container's writable layer, a VM's root
	// disk). Past it, writes fail with ENOSPC inside the workload.
	DiskMB int64 `json:"disk_mb,omitempty"`
	// Limits are at least the requests; the agent fills them in.
	Limits *ResourceLimits `json:"limits,omitempty"`
}

// ResourceLimits are what a workload may use at most.
type ResourceLimits struct {
	CPU      float64 `json:"cpu,omitempty"`
	MemoryMB int64   `json:"memory_mb,omitempty"`
}

// RestartSpec is the restart policy and its retry budget.
type RestartSpec struct {
	Policy     RestartPolicy `json:"policy,omitempty"`
	MaxRetries int           `json:"max_retries,omitempty"`
	// OnUnhealthy stops a workload its health check finds unhealthy; the
	// restart policy (and its backoff) then decides whether it runs again.
	OnUnhealthy bool `json:"on_unhealthy,omitempty"`
}

// Workload is the record berth keeps for a submitted spec.
type Workload struct {
	ID   string `json:"id"`
	Name string `json:"name,omitempty"`
	// Tenant is the workload's tenant (its tenant label when it was
	// submitted), whose namespace holds its name; empty for the node's
	// own namespace.
	Tenant    string       `json:"tenant,omitempty"`
	Spec      WorkloadSpec `json:"spec"`
	State     State        `json:"state"`
	Isolation Isolation    `json:"isolation"`
	// ExitCode is set once the workload has exited.
	ExitCode *int `json:"exit_code,omitempty"`
	// OOMKilled is true when the kernel killed the workload for memory.
	OOMKilled bool `json:"oom_killed,omitempty"`
	// Error says why the workload failed (state failed) or what went wrong last.
	Error       string     `json:"error,omitempty"`
	Placement   *Placement `json:"placement,omitempty"`
	ImageDigest string     `json:"image_digest,omitempty"`
	// Pull is the download of the workload's image while it is pending.
	Pull *ImagePullStatus `json:"pull,omitempty"`
	// Health is what the health check found while the workload runs.
	Health       *HealthStatus `json:"health,omitempty"`
	RestartCount int           `json:"restart_count"`
	// LastExitCode is the exit code of the previous run when the workload restarted.
	LastExitCode *int       `json:"last_exit_code,omitempty"`
	CreatedAt    time.Time  `json:"created_at"`
	StartedAt    *time.Time `json:"started_at,omitempty"`
	FinishedAt   *time.Time `json:"finished_at,omitempty"`
	// Network is the workload's place on the node network while it runs
	// (the mode always).
	Network *NetworkStatus `json:"network,omitempty"`
	// ModifyIndex increases each time the record changes.
	ModifyIndex uint64 `json:"modify_index"`
	// Deleting is true while a delete is in progress: the workload still
	// holds what it held (its task, its address, its logs) until the agent
	// has released all of it, and then it is gone (404). A delete that
	// fails is retried by the agent; Error says why it failed last.
	Deleting bool `json:"deleting,omitempty"`
}

// Placement records why a workload runs where it runs.
type Placement struct {
	Isolation     Isolation   `json:"isolation"`
	Denied        bool        `json:"denied,omitempty"`
	DecidingRule  string      `json:"deciding_rule,omitempty"`
	Matched       []RuleMatch `json:"matched,omitempty"`
	PolicyVersion string      `json:"policy_version"`
	Explanation   string      `json:"explanation"`
	// Network is the network mode the workload gets: its request, or none
	// when a rule forces it.
	Network string `json:"network,omitempty"`
}

// RuleMatch is one policy rule that matched and why.
type RuleMatch struct {
	Rule    string `json:"rule"`
	Outcome string `json:"outcome"`
	Reason  string `json:"reason"`
}

// WorkloadList is the answer of GET /v1/workloads.
type WorkloadList struct {
	Workloads []Workload `json:"workloads"`
}

// Stats is a point-in-time resource reading of a running workload.
type Stats struct {
	Time          time.Time `json:"time"`
	CPUUsageNanos uint64    `json:"cpu_usage_ns"`
	MemoryBytes   uint64    `json:"memory_bytes"`
	// MemoryWorkingSetBytes is the memory the workload would keep under
	// pressure: usage less inactive file cache for a container, the QEMU
	// process's resident memory for a VM.
	MemoryWorkingSetBytes uint64 `json:"memory_working_set_bytes"`
	MemoryLimit           uint64 `json:"memory_limit_bytes,omitempty"`
	Pids                  uint64 `json:"pids"`
	PidsLimit             uint64 `json:"pids_limit,omitempty"`
}

// Image is an image in the node's store.
type Image struct {
	Ref       string    `json:"ref"`
	Digest    string    `json:"digest"`
	Size      int64     `json:"size"`
	CreatedAt time.Time `json:"created_at"`
	// Kind is empty for an OCI image and "disk" for a whole-disk VM image
	// (qcow2), which boots its own OS in a VM.
	Kind string `json:"kind,omitempty"`
	// Private: the image was pulled with credentials of the pull's own
	// and only its tenants (and operators and admins) see it; false: the
	// node's image, which every tenant may run.
	Private bool `json:"private,omitempty"`
	// Tenants own a private image: all of them for an operator or admin,
	// the caller's own for a submitter; none listed: the node's namespace.
	Tenants []string `json:"tenants,omitempty"`
}

// ImageList is the answer of GET /v1/images.
type ImageList struct {
	Images []Image `json:"images"`
}

// PullRequest asks the node to pull an image from a registry.
type PullRequest struct {
	Ref string `json:"ref"`
	// Auth, when set, are credentials for this pull alone, in place of the
	// node's (images.auth_file). berth never logs, stores, audits or
	// answers them.
	Auth *RegistryAuth `json:"auth,omitempty"`
	// Tenant is the tenant a pull with Auth is for: the image is private
	// to it. A submitter with one tenant gets its own; one with several
	// names one. Empty for an operator or admin: the node's namespace
	// (workloads without a tenant). Without Auth the image is the node's
	// and Tenant is not used.
	Tenant string `json:"tenant,omitempty"`
}

// RegistryAuth are a registry's credentials: a username and password
// (or token), or an identity token. They print as Redacted.
type RegistryAuth struct {
	Username      string `json:"username,omitempty"`
	Password      string `json:"password,omitempty"`
	IdentityToken string `json:"identity_token,omitempty"`
	RegistryToken string `json:"registry_token,omitempty"`
}

// String, GoString and LogValue keep credentials out of anything that
// prints or logs them by mistake.
func (RegistryAuth) String() string       { return Redacted }
func (RegistryAuth) GoString() string     { return Redacted }
func (RegistryAuth) LogValue() slog.Value { return slog.StringValue(Redacted) }

// LogLine is one line of output in the NDJSON log format.
type LogLine struct {
	Stream string `json:"stream"`
	Line   string `json:"line"`
	// Time is when the line was written (the write that completed it),
	// present when timestamps were asked for and the log records it.
	Time *time.Time `json:"time,omitempty"`
}

// Health is the body of /healthz and /readyz.
type Health struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks,omitempty"`
}

// ListFilter selects workloads in GET /v1/workloads; empty fields match all.
type ListFilter struct {
	// Labels must all be present; an empty value matches any value.
	Labels    map[string]string
	State     State
	Isolation Isolation
}

// LogOptions select what GET /v1/workloads/{id}/logs returns.
type LogOptions struct {
	// Stream is "stdout", "stderr" or "" for both.
	Stream string
	// Tail is how many of the last lines of each stream; negative means all.
	Tail int
	// Follow streams new output until the workload has ended for good.
	Follow bool
	// Since leaves out the lines written before it (zero: none).
	Since time.Time
	// Timestamps gives each line the time it was written.
	Timestamps bool
}

// Verdicts of a placement decision (PlacementDecision.Verdict).
const (
	// VerdictAllow: the workload may run with the decided isolation.
	VerdictAllow = "allow"
	// VerdictDeny: a deny rule, or a deny default, forbids the workload.
	VerdictDeny = "deny"
	// VerdictRefused: the request asks for less isolation than the policy
	// requires (container where vm is required).
	VerdictRefused = "refused"
	// VerdictUnschedulable: this node cannot run the isolation the policy
	// requires; berth never falls back to weaker isolation.
	VerdictUnschedulable = "unschedulable"
)

// PlacementDecision is the answer of POST /v1/placements: what the node's
// policy decides for a spec, without creating anything. Its placement
// fields are those a submitted workload would record.
type PlacementDecision struct {
	Placement
	// Verdict is allow, deny, refused or unschedulable; only allow would
	// be admitted.
	Verdict string `json:"verdict"`
	// Spec is the spec as the agent normalized it (image reference,
	// defaults): what the policy saw.
	Spec WorkloadSpec `json:"spec"`
	// Node is what the decision assumed about the node.
	Node NodeFacts `json:"node"`
	// Exec says whether exec sessions into such a workload are allowed
	// (a rule may say exec: deny), decided under the same policy.
	Exec *ExecDecision `json:"exec,omitempty"`
}

// ExecDecision is the policy's word on exec into a workload.
type ExecDecision struct {
	Allowed bool `json:"allowed"`
	// Rule names the rule with exec: deny that matched, Reason why.
	Rule        string `json:"rule,omitempty"`
	Reason      string `json:"reason,omitempty"`
	Explanation string `json:"explanation"`
}

// NodeFacts is what placement knows about the node's drivers.
type NodeFacts struct {
	ContainerAvailable bool   `json:"container_available"`
	ContainerReason    string `json:"container_reason,omitempty"`
	VMAvailable        bool   `json:"vm_available"`
	VMReason           string `json:"vm_reason,omitempty"`
	// Accel is the VM acceleration in use: kvm, tcg or empty.
	Accel string `json:"accel,omitempty"`
}

// PolicyStatus is the answer of GET /v1/policy: the active isolation
// policy and how its hot reloads went.
type PolicyStatus struct {
	// Version is the content hash of the active policy ("sha256:...").
	Version string `json:"version"`
	// Source is the policy file's path, or "builtin" for the embedded
	// default.
	Source   string    `json:"source"`
	LoadedAt time.Time `json:"loaded_at"`
	// Default is the outcome when no rule matches: container, vm or deny.
	Default string       `json:"default"`
	Rules   []PolicyRule `json:"rules"`
	// Watching is true while the agent watches Source for changes.
	Watching bool `json:"watching"`
	// Reloads counts changes of the file that were applied.
	Reloads uint64 `json:"reloads"`
	// ReloadFailures counts changes of the file that were rejected.
	ReloadFailures uint64 `json:"reload_failures"`
	// LastReloadError is set while the file on disk is not the active
	// policy because it is invalid (or unreadable); a later valid change
	// clears it.
	LastReloadError *PolicyReloadError `json:"last_reload_error,omitempty"`
}

// PolicyRule describes one rule of the active policy.
type PolicyRule struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Outcome is container, vm or deny.
	Outcome string `json:"outcome"`
	// Match summarizes the match conditions.
	Match string `json:"match,omitempty"`
	// When is the rule's CEL expression.
	When string `json:"when,omitempty"`
	// Line is where the rule starts in the policy file.
	Line int `json:"line"`
}

// PolicyReloadError is why the policy file on disk was not applied.
type PolicyReloadError struct {
	At time.Time `json:"at"`
	// Message is every problem, one "file:line:column: message" per line.
	Message string `json:"message"`
	// Errors are the positioned problems, when the file could be read.
	Errors []PolicyError `json:"errors,omitempty"`
}

// PolicyError is one problem in a policy file. Line and Column are 1-based;
// 0 means the parser did not say.
type PolicyError struct {
	File    string `json:"file"`
	Line    int    `json:"line"`
	Column  int    `json:"column"`
	Message string `json:"message"`
}

// Network modes of a workload.
const (
	// NetworkBridge: an interface and address on the node's bridge network
	// (the default).
	NetworkBridge = "bridge"
	// NetworkNone: loopback only.
	NetworkNone = "none"
	// NetworkHost: the host's network namespace (containers only, and only
	// where the isolation policy allows it).
	NetworkHost = "host"
)

// PortMapping publishes a workload's port on the node.
type PortMapping struct {
	HostPort      int    `json:"host_port"`
	ContainerPort int    `json:"container_port"`
	Protocol      string `json:"protocol,omitempty"` // tcp (default) or udp
}

// NetworkStatus is where a workload is on the node's network.
type NetworkStatus struct {
	Mode string `json:"mode"`
	// Address is the workload's address on the bridge, e.g. 10.88.0.5.
	Address string        `json:"address,omitempty"`
	Gateway string        `json:"gateway,omitempty"`
	Ports   []PortMapping `json:"ports,omitempty"`
}

// PullPolicy is when a submit pulls its image (WorkloadSpec.ImagePull).
type PullPolicy string

const (
	PullIfNotPresent PullPolicy = "if-not-present"
	PullAlways       PullPolicy = "always"
	PullNever        PullPolicy = "never"
)

// ImagePullStatus is the download of a workload's image while it is
// pending (Workload.Pull).
type ImagePullStatus struct {
	Ref        string `json:"ref"`
	Digest     string `json:"digest"`
	BytesDone  int64  `json:"bytes_done"`
	BytesTotal int64  `json:"bytes_total"`
}

// LogSpec is how a workload's logs rotate: each stream's file rotates at
// MaxBytes, and MaxFiles rotated files are kept (the oldest goes).
type LogSpec struct {
	MaxBytes int64 `json:"max_bytes,omitempty"`
	MaxFiles int   `json:"max_files,omitempty"`
}

// PruneRequest is the body of POST /v1/images/prune.
type PruneRequest struct {
	// All removes every image no workload uses; without it, unused
	// images go least recently used first down to the low watermark.
	All bool `json:"all,omitempty"`
}

// RemovedImage is an image a prune or the collector removed.
type RemovedImage struct {
	Ref    string `json:"ref"`
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
	Reason string `json:"reason"`
}

// PruneResult is the answer of POST /v1/images/prune.
type PruneResult struct {
	Removed []RemovedImage `json:"removed"`
}
