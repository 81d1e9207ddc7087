// Package auth decides who may do what on a berth agent: the roles, the
// actions of the API, the tenant scoping of submitters, and the tokens file
// that maps credentials to identities. Authorize and the tenant checks are
// pure functions; only Store (store.go) reads files.
package auth

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Role is what an identity may do.
type Role string

const (
	// RoleAdmin may do everything.
	RoleAdmin Role = "admin"
	// RoleOperator runs the node: policy, node status, images, events and
	// metrics, and reads every workload. It cannot create, stop or delete
	// workloads.
	RoleOperator Role = "operator"
	// RoleSubmitter creates, reads, stops and deletes the workloads of its
	// tenants, and sees nothing of other tenants' workloads.
	RoleSubmitter Role = "submitter"
	// RoleReader reads what a fleet controller needs: node status, events
	// and metrics.
	RoleReader Role = "reader"
)

// Roles lists the roles, strongest first.
var Roles = []Role{RoleAdmin, RoleOperator, RoleSubmitter, RoleReader}

// Valid reports whether r is a known role.
func (r Role) Valid() bool { return slices.Contains(Roles, r) }

// Action is one kind of API request. Each route maps to exactly one.
type Action string

const (
	// ActPublic needs no identity: liveness and readiness probes.
	ActPublic         Action = "public"
	ActWorkloadCreate Action = "workload.create"
	// ActWorkloadRead is get, list, logs and stats.
	ActWorkloadRead   Action = "workload.read"
	ActWorkloadStop   Action = "workload.stop"
	ActWorkloadDelete Action = "workload.delete"
	ActImageRead      Action = "image.read"
	// ActImagePull makes the agent fetch an image from a registry.
	ActImagePull Action = "image.pull"
	// ActImageWrite imports (and so may retag) or removes images.
	ActImageWrite Action = "image.write"
	// ActPlacement is the dry-run decision of POST /v1/placements.
	ActPlacement  Action = "placement.explain"
	ActPolicyRead Action = "policy.read"
	ActNodeRead   Action = "node.read"
	// ActNodeWrite cordons, drains and uncordons the node.
	ActNodeWrite  Action = "node.write"
	ActEventsRead Action = "events.read"
	ActMetrics    Action = "metrics.read"
	// ActUnknown is a route the authorization table does not know: only
	// admins reach it, so a new endpoint is closed until someone decides.
	ActUnknown Action = "unknown"
)

// grants is the whole authorization matrix. Admin is not listed: it may
// do everything.
var grants = map[Role][]Action{
	RoleOperator: {ActWorkloadRead, ActImageRead, ActImagePull, ActImageWrite, ActPlacement, ActPolicyRead, ActNodeRead, ActNodeWrite, ActEventsRead, ActMetrics},
	// Submitters see events too, but only those of their tenants'
	// workloads (the API filters them).
	RoleSubmitter: {ActWorkloadCreate, ActWorkloadRead, ActWorkloadStop, ActWorkloadDelete, ActImageRead, ActImagePull, ActPlacement, ActEventsRead},
	RoleReader:    {ActNodeRead, ActEventsRead, ActMetrics},
}

// Via says how an identity was established.
type Via string

const (
	ViaToken      Via = "token"
	ViaClientCert Via = "client_cert"
	// ViaUnixRoot is a root process on the agent's unix socket: it could
	// read the agent's data directory anyway.
	ViaUnixRoot Via = "unix_root"
	// ViaNone is every request when no tokens file is configured (the
	// agent then listens only on loopback and the unix socket).
	ViaNone Via = "none"
)

// Identity is who sent a request.
type Identity struct {
	// Name is the entry's name in the tokens file; never the token.
	Name    string
	Role    Role
	Tenants []string
	Via     Via
}

// Anonymous is the identity of every request when auth is off.
var Anonymous = &Identity{Name: "anonymous", Role: RoleAdmin, Via: ViaNone}

// UnixRoot is the identity of a root peer on the unix socket.
var UnixRoot = &Identity{Name: "unix-root", Role: RoleAdmin, Via: ViaUnixRoot}

// Authorize reports whether id may perform act. A nil identity (no or a
// bad credential) may perform only public actions.
func Authorize(id *Identity, act Action) bool {
	if act == ActPublic {
		return true
	}
	if id == nil {
		return false
	}
	if id.Role == RoleAdmin {
		return true
	}
	return slices.Contains(grants[id.Role], act)
}

// Scoped reports whether id sees only its tenants' workloads.
func (id *Identity) Scoped() bool { return id != nil && id.Role == RoleSubmitter }

// TenantLabel is the workload label that names its tenant.
const TenantLabel = "tenant"

// CanSee reports whether id may see a workload whose tenant label is
// tenant. Unscoped roles see all; a submitter sees its tenants' only, and
// never a workload without a tenant.
func (id *Identity) CanSee(tenant string) bool {
	if id == nil {
		return false
	}
	if !id.Scoped() {
		return true
	}
	return tenant != "" && slices.Contains(id.Tenants, tenant)
}

// Errors of SubmitTenant.
var (
	// ErrTenantNotAllowed: the spec names a tenant the identity may not
	// act for.
	ErrTenantNotAllowed = errors.New("tenant not allowed")
	// ErrTenantRequired: the identity has several tenants and the spec
	// names none.
	ErrTenantRequired = errors.New("tenant required")
)

// SubmitTenant is the tenant label a workload submitted by id gets, given
// the one its spec asks for (requested, "" when none). Unscoped roles keep
// what they asked for. A submitter may only name one of its tenants; with
// exactly one tenant it is set for it.
func SubmitTenant(id *Identity, requested string) (string, error) {
	if !id.Scoped() {
		return requested, nil
	}
	switch {
	case requested != "" && slices.Contains(id.Tenants, requested):
		return requested, nil
	case requested != "":
		return "", fmt.Errorf("%w: %s may act for tenant(s) %s, not %q", ErrTenantNotAllowed, id.Name, strings.Join(id.Tenants, ", "), requested)
	case len(id.Tenants) == 1:
		return id.Tenants[0], nil
	default:
		return "", fmt.Errorf("%w: %s acts for tenants %s; set the %q label to one of them", ErrTenantRequired, id.Name, strings.Join(id.Tenants, ", "), TenantLabel)
	}
}
