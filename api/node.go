package api

import (
	"strings"
	"time"
)

// Node is the node-status document fleet controllers poll (GET /v1/node).
// Index changes whenever anything in it changes except Uptime.
type Node struct {
	ID        string    `json:"id"`
	Hostname  string    `json:"hostname"`
	Version   string    `json:"version"`
	StartedAt time.Time `json:"started_at"`
	// UptimeSeconds is how long this agent process has run.
	UptimeSeconds float64 `json:"uptime_seconds"`

	// Capacity is the host's; Reserved is kept back for the system by
	// config; Allocatable = Capacity - Reserved; Allocated is the sum of
	// the requests of every workload that holds resources (VM overhead
	// included).
	Capacity    NodeResources `json:"capacity"`
	Reserved    NodeResources `json:"reserved"`
	Allocatable NodeResources `json:"allocatable"`
	Allocated   NodeResources `json:"allocated"`
	// Limited is the sum of the same workloads' limits, which may exceed
	// allocatable: limits are not reserved, requests are.
	Limited NodeResources `json:"limited"`

	Workloads  NodeWorkloads           `json:"workloads"`
	Drivers    map[string]DriverStatus `json:"drivers"`
	Policy     NodePolicy              `json:"policy"`
	Conditions []Condition             `json:"conditions"`
	Index      uint64                  `json:"index"`
	// Schedulable is false while the node is cordoned (or draining): it
	// refuses new workloads. Cordon says since when and why.
	Schedulable bool        `json:"schedulable"`
	Cordon      *NodeCordon `json:"cordon,omitempty"`
}

// NodeCordon is an operator's cordon of the node (berth node cordon or
// drain): new submits are refused until it is lifted (uncordon). It
// survives an agent restart.
type NodeCordon struct {
	Since  time.Time `json:"since"`
	Reason string    `json:"reason,omitempty"`
	// Draining is true after a drain: every workload was asked to stop
	// with its grace period, and a workload that survives an agent
	// restart is asked again.
	Draining bool `json:"draining,omitempty"`
}

// CordonRequest is the body of POST /v1/node/cordon and /v1/node/drain.
type CordonRequest struct {
	// Reason is shown to submitters the node refuses and in node status.
	Reason string `json:"reason,omitempty"`
	// TimeoutSeconds (drain only) is each workload's stop grace period;
	// 0 means the agent's default.
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// ReasonNodeCordoned is the problem reason of a submit a cordoned (or
// draining) node refuses; the detail says why.
const ReasonNodeCordoned = "node_cordoned"

// NodeResources is an amount of the node's resources.
type NodeResources struct {
	CPU       float64 `json:"cpu"`
	MemoryMB  int64   `json:"memory_mb"`
	Workloads int     `json:"workloads"`
}

// NodeWorkloads counts the node's workloads.
type NodeWorkloads struct {
	Total       int               `json:"total"`
	ByState     map[State]int     `json:"by_state"`
	ByIsolation map[Isolation]int `json:"by_isolation"`
}

// DriverStatus is a driver's health as the agent last saw it.
type DriverStatus struct {
	Healthy   bool              `json:"healthy"`
	Reason    string            `json:"reason,omitempty"`
	Version   string            `json:"version,omitempty"`
	Details   map[string]string `json:"details,omitempty"`
	CheckedAt time.Time         `json:"checked_at"`
	// LastError is the last error the driver returned to the agent.
	LastError   string     `json:"last_error,omitempty"`
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

// NodePolicy is the active isolation policy.
type NodePolicy struct {
	Version         string             `json:"version"`
	Source          string             `json:"source"`
	LastReloadError *PolicyReloadError `json:"last_reload_error,omitempty"`
}

// Condition is a named aspect of the node's health, as in Kubernetes.
type Condition struct {
	Type   string `json:"type"`
	Status bool   `json:"status"`
	// Reason is a stable CamelCase word; Message says it for people.
	Reason             string    `json:"reason"`
	Message            string    `json:"message,omitempty"`
	LastTransitionTime time.Time `json:"last_transition_time"`
}

// Condition types.
const (
	// ConditionReady: the node takes workloads (at least one healthy
	// driver, a policy loaded).
	ConditionReady = "Ready"
	// ConditionVMCapable: the VM driver is healthy.
	ConditionVMCapable = "VMCapable"
	// ConditionPolicyValid: the policy file on disk is the active policy
	// (false after a rejected reload).
	ConditionPolicyValid = "PolicyValid"
	// ConditionMemoryPressure: allocated memory is above 90% of allocatable.
	ConditionMemoryPressure = "MemoryPressure"
	// ConditionDiskPressure: the data directory's filesystem has less free
	// space than storage.min_free_bytes; submits and pulls are refused.
	ConditionDiskPressure = "DiskPressure"
	// ConditionSchedulable: the node takes new workloads (false while it
	// is cordoned or draining).
	ConditionSchedulable = "Schedulable"
)

// Event is one entry of the node's event stream (GET /v1/events).
type Event struct {
	// ID increases with every event; SSE clients resume with Last-Event-ID.
	ID         uint64            `json:"id"`
	Time       time.Time         `json:"time"`
	Type       string            `json:"type"`
	WorkloadID string            `json:"workload_id,omitempty"`
	Message    string            `json:"message"`
	Attrs      map[string]string `json:"attrs,omitempty"`
}

// Event types.
const (
	EventWorkloadCreated    = "workload.created"
	EventWorkloadPlaced     = "workload.placed"
	EventWorkloadStarted    = "workload.started"
	EventWorkloadExited     = "workload.exited"
	EventWorkloadFailed     = "workload.failed"
	EventWorkloadRestarted  = "workload.restarted"
	EventWorkloadStopping   = "workload.stopping"
	EventWorkloadDeleted    = "workload.deleted"
	EventWorkloadReconciled = "workload.reconciled"
	EventPolicyReloaded     = "policy.reloaded"
	EventPolicyRejected     = "policy.rejected"
	EventDriverHealthy      = "driver.healthy"
	EventDriverUnhealthy    = "driver.unhealthy"
	// EventNodeDiskPressure: the data directory's free space fell below
	// the floor (attrs status=false: it is back above it).
	EventNodeDiskPressure = "node.disk_pressure"
	// EventNodeCordoned, EventNodeDraining, EventNodeUncordoned: an
	// operator's maintenance of the node.
	EventNodeCordoned   = "node.cordoned"
	EventNodeDraining   = "node.draining"
	EventNodeUncordoned = "node.uncordoned"
	// EventImagePullProgress: bytes of an image's layers stored so far
	// (attrs ref, digest, bytes_done, bytes_total; workload_id when a
	// submit pulls it). EventImagePulled and EventImagePullFailed end it.
	EventImagePullProgress = "image.pull.progress"
	EventImagePulled       = "image.pulled"
	EventImagePullFailed   = "image.pull_failed"
	// EventImageRemoved: image collection or a prune removed an image
	// (attrs ref, digest, size, reason).
	EventImageRemoved = "image.removed"
)

// EventFilter selects events; empty fields match everything.
type EventFilter struct {
	WorkloadID string
	// Types are exact types ("workload.exited") or prefixes ending in a dot
	// ("workload.").
	Types []string
}

// Match reports whether e passes the filter.
func (f *EventFilter) Match(e *Event) bool {
	if f.WorkloadID != "" && e.WorkloadID != f.WorkloadID {
		return false
	}
	if len(f.Types) == 0 {
		return true
	}
	for _, t := range f.Types {
		if t == e.Type || (strings.HasSuffix(t, ".") && strings.HasPrefix(e.Type, t)) {
			return true
		}
	}
	return false
}
