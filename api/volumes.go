package api

import "time"

// VolumeMount puts a volume into a workload at Path: a named volume
// berth manages (Name) or a host directory the operator allows
// (HostPath), exactly one of them.
type VolumeMount struct {
	// Name is a volume of the workload's tenant (POST /v1/volumes).
	Name string `json:"name,omitempty"`
	// HostPath is a directory on the node under one of the operator's
	// volumes.host_paths.
	HostPath string `json:"host_path,omitempty"`
	// Path is where the workload sees it: absolute, not /.
	Path string `json:"path"`
	// ReadOnly makes it read-only for the workload, and on the host side
	// of a VM's share.
	ReadOnly bool `json:"read_only,omitempty"`
}

// VolumeSpec is what POST /v1/volumes asks for.
type VolumeSpec struct {
	// Name is unique within the tenant (a DNS label).
	Name string `json:"name"`
	// SizeBytes, when set, gives the volume a filesystem of its own of
	// that size, reserved on the node: a full volume is ENOSPC inside
	// the workload and never fills the node. Zero is a plain directory,
	// bounded by the node's free-space floor.
	SizeBytes int64             `json:"size_bytes,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// Volume is a named volume on the node.
type Volume struct {
	Name string `json:"name"`
	// Tenant owns it (the tenant label at create); empty for the node's
	// own namespace. Another tenant's volume answers as missing.
	Tenant    string            `json:"tenant,omitempty"`
	SizeBytes int64             `json:"size_bytes,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	CreatedAt time.Time         `json:"created_at"`
	// UsedBy are the workloads (ids) that hold it: it cannot be deleted
	// while any does.
	UsedBy []string `json:"used_by,omitempty"`
}

// VolumeList is the answer of GET /v1/volumes.
type VolumeList struct {
	Volumes []Volume `json:"volumes"`
}
