package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"strings"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/auth"
)

// scoped is the agent as one caller may see it. A submitter sees only its
// tenants' workloads: another tenant's is "not found" with the very error
// a missing one gets, on every route. Every identity's requests record the
// workload, tenant and placement they touched, for the audit log.
//
// Names are unique per tenant (api.Ref), and a reference means:
//
//   - for a submitter: an id of its tenants' workloads, TENANT/NAME for one
//     of its tenants, or a bare NAME in its tenants' namespaces (with
//     several tenants, the one that holds it; held by more than one, the
//     reference is ambiguous and it must say TENANT/NAME);
//   - for every other role: an id, TENANT/NAME, or a bare NAME in the
//     node's own namespace (workloads without a tenant), as the agent
//     reads references.
//
// scoped does not embed Backend (its Backend is a named field): it
// implements every method itself, so a method added to Backend does not
// compile until someone decides here how a tenant-scoped caller may use
// it. scope_routes_test.go holds every route to being public, reachable
// by no tenant-scoped role, or scoped.
type scoped struct {
	Backend Backend
	id      *auth.Identity
	st      *request
}

var _ Backend = (*scoped)(nil)

func notFound(ref string) error { return fmt.Errorf("workload %q: %w", ref, errdefs.ErrNotFound) }

// tenantOf is the tenant a workload belongs to: the one its record keeps
// (its tenant label at submit), whose namespace holds its name.
func tenantOf(w *api.Workload) string { return w.Tenant }

// withTenant gives spec the tenant label the caller may set.
func (b *scoped) withTenant(spec api.WorkloadSpec) (api.WorkloadSpec, error) {
	tenant, err := auth.SubmitTenant(b.id, spec.Labels[auth.TenantLabel])
	switch {
	case errors.Is(err, auth.ErrTenantNotAllowed):
		return spec, fmt.Errorf("%w: %v", errdefs.ErrPermissionDenied, err)
	case errors.Is(err, auth.ErrTenantRequired):
		return spec, errdefs.Invalid(`labels["tenant"]`, "%v", err)
	case err != nil:
		return spec, err
	}
	if tenant != "" && spec.Labels[auth.TenantLabel] != tenant {
		labels := maps.Clone(spec.Labels)
		if labels == nil {
			labels = map[string]string{}
		}
		labels[auth.TenantLabel] = tenant
		spec.Labels = labels
	}
	return spec, nil
}

func (b *scoped) Submit(ctx context.Context, spec api.WorkloadSpec) (*api.Workload, bool, error) {
	spec, err := b.withTenant(spec)
	b.st.tenant = spec.Labels[auth.TenantLabel]
	if err != nil {
		return nil, false, err
	}
	w, created, err := b.Backend.Submit(ctx, spec)
	if w != nil {
		b.st.workload, b.st.placement = w.ID, w.Placement
	}
	return w, created, err
}

func (b *scoped) Place(ctx context.Context, spec api.WorkloadSpec) (*api.PlacementDecision, error) {
	spec, err := b.withTenant(spec)
	if err != nil {
		return nil, err
	}
	return b.Backend.Place(ctx, spec)
}

// Get resolves ref to a workload the caller may see.
func (b *scoped) Get(ctx context.Context, ref string) (*api.Workload, error) {
	if !b.id.Scoped() {
		return b.Backend.Get(ctx, ref)
	}
	// Whatever hides a workload, the answer is the one a missing
	// workload gets: notFound(ref), with the caller's own words.
	if tenant, name, ok := strings.Cut(ref, "/"); ok {
		if !b.id.CanSee(tenant) || name == "" {
			return nil, notFound(ref)
		}
		return b.visible(ctx, ref, tenant)
	}
	// An id first, as the agent reads references: a bare NAME the agent
	// resolves in the node's namespace is nothing a submitter sees.
	if w, err := b.Backend.Get(ctx, ref); err == nil && w.ID == ref && b.id.CanSee(tenantOf(w)) {
		return w, nil
	} else if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return nil, err
	}
	var found *api.Workload
	var holders []string
	for _, tenant := range b.id.Tenants {
		w, err := b.visible(ctx, api.Ref(tenant, ref), tenant)
		if errors.Is(err, errdefs.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		found = w
		holders = append(holders, tenant)
	}
	switch len(holders) {
	case 0:
		return nil, notFound(ref)
	case 1:
		return found, nil
	}
	// Only the caller's own tenants are named: it may see all of them.
	return nil, errdefs.Invalid("ref", "%q names workloads of more than one of your tenants (%s); address one as TENANT/NAME, e.g. %s", ref, strings.Join(holders, ", "), api.Ref(holders[0], ref))
}

// visible gets a TENANT/NAME reference of the caller's tenant, or
// notFound(ref).
func (b *scoped) visible(ctx context.Context, ref, tenant string) (*api.Workload, error) {
	w, err := b.Backend.Get(ctx, ref)
	switch {
	case errors.Is(err, errdefs.ErrNotFound):
		return nil, notFound(ref)
	case err != nil:
		return nil, err
	case tenantOf(w) != tenant || !b.id.CanSee(tenant):
		return nil, notFound(ref)
	}
	return w, nil
}

// resolve is Get for a mutation: it records what is touched, and the
// mutation then names the workload by its id, which is never reused, so a
// name that changes hands in between cannot redirect it.
func (b *scoped) resolve(ctx context.Context, ref string) (string, error) {
	w, err := b.Get(ctx, ref)
	if err != nil {
		return "", err
	}
	b.st.workload, b.st.tenant = w.ID, tenantOf(w)
	return w.ID, nil
}

func (b *scoped) List(ctx context.Context, f api.ListFilter) []api.Workload {
	all := b.Backend.List(ctx, f)
	if !b.id.Scoped() {
		return all
	}
	seen := make([]api.Workload, 0, len(all))
	for _, w := range all {
		if b.id.CanSee(tenantOf(&w)) {
			seen = append(seen, w)
		}
	}
	return seen
}

func (b *scoped) Stop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.Stop(ctx, id, timeout)
}

func (b *scoped) RequestStop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.RequestStop(ctx, id, timeout)
}

func (b *scoped) Delete(ctx context.Context, ref string, force bool) error {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return err
	}
	return b.Backend.Delete(ctx, id, force)
}

func (b *scoped) RequestDelete(ctx context.Context, ref string, force bool) (*api.Workload, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.RequestDelete(ctx, id, force)
}

// Exec and Signal: whoever may stop a workload may exec into it and
// signal it, within the same scope.
func (b *scoped) Exec(ctx context.Context, ref string, req api.ExecRequest) (driver.ExecSession, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.Exec(ctx, id, req)
}

func (b *scoped) Attach(ctx context.Context, ref string, req api.AttachRequest) (driver.AttachSession, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.Attach(ctx, id, req)
}

func (b *scoped) Signal(ctx context.Context, ref, sig string) (*api.Workload, error) {
	id, err := b.resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	b.st.signal = sig
	return b.Backend.Signal(ctx, id, sig)
}

func (b *scoped) Logs(ctx context.Context, ref string, opts api.LogOptions, emit func(stream string, line []byte, at time.Time) error) error {
	w, err := b.Get(ctx, ref)
	if err != nil {
		return err
	}
	return b.Backend.Logs(ctx, w.ID, opts, emit)
}

func (b *scoped) Stats(ctx context.Context, ref string) (*api.Stats, error) {
	w, err := b.Get(ctx, ref)
	if err != nil {
		return nil, err
	}
	return b.Backend.Stats(ctx, w.ID)
}

// Events gives a submitter the events of its tenants' workloads only: no
// node events, nothing of other tenants. A workload is judged when its
// first event comes by and remembered for the stream, so its deletion
// still reaches the submitter that saw it.
func (b *scoped) Events(ctx context.Context, lastID uint64, f api.EventFilter, lost func(), emit func(api.Event) error) error {
	if !b.id.Scoped() {
		return b.Backend.Events(ctx, lastID, f, lost, emit)
	}
	visible := map[string]bool{}
	return b.Backend.Events(ctx, lastID, f, lost, func(e api.Event) error {
		if e.WorkloadID == "" {
			return nil
		}
		ok, known := visible[e.WorkloadID]
		if !known {
			_, err := b.Get(ctx, e.WorkloadID)
			ok = err == nil
			visible[e.WorkloadID] = ok
		}
		if !ok {
			return nil
		}
		return emit(e)
	})
}

func (b *scoped) ImportImage(ctx context.Context, r io.Reader, ref string) ([]api.Image, error) {
	b.st.image = ref
	return b.Backend.ImportImage(ctx, r, ref)
}

// PullImage: a pull with credentials of its own is for one tenant, whose
// private image it becomes; a submitter pulls for one of its tenants (as
// it submits: its only one, or the one it names).
func (b *scoped) PullImage(ctx context.Context, req api.PullRequest) (*api.Image, error) {
	b.st.image = req.Ref
	if req.Auth != nil || req.Tenant != "" {
		tenant, err := auth.SubmitTenant(b.id, req.Tenant)
		switch {
		case errors.Is(err, auth.ErrTenantNotAllowed):
			return nil, fmt.Errorf("%w: %v", errdefs.ErrPermissionDenied, err)
		case errors.Is(err, auth.ErrTenantRequired):
			return nil, errdefs.Invalid("tenant", "%v", err)
		case err != nil:
			return nil, err
		}
		req.Tenant = tenant
		b.st.tenant = tenant
	}
	return b.Backend.PullImage(ctx, req)
}

// RemoveImage: the agent removes only an image the caller sees (ctx
// carries it).
func (b *scoped) RemoveImage(ctx context.Context, ref string) error {
	b.st.image = ref
	return b.Backend.RemoveImage(ctx, ref)
}

// Index is node-wide: it only says that something changed, never what or
// whose, and blocking queries of every role need it.
func (b *scoped) Index() (uint64, <-chan struct{}) { return b.Backend.Index() }

// ListImages: the node's images, which every tenant's workloads may run,
// and, for a submitter, its tenants' private ones; the agent filters by
// the identity ctx carries.
func (b *scoped) ListImages(ctx context.Context) []api.Image { return b.Backend.ListImages(ctx) }

// Ready is the public readiness probe's: no tenant data.
func (b *scoped) Ready(ctx context.Context) error { return b.Backend.Ready(ctx) }

// Node counts every tenant's workloads, so no tenant-scoped role is
// granted the routes that read it (/v1/node, /metrics).
func (b *scoped) Node(ctx context.Context) *api.Node { return b.Backend.Node(ctx) }

// Policy shows the operator's rules, tenants included; no tenant-scoped
// role is granted /v1/policy or /metrics.
func (b *scoped) Policy(ctx context.Context) api.PolicyStatus { return b.Backend.Policy(ctx) }

// checkEventScope answers, before an event stream starts, whether the
// caller may follow one workload's events: a submitter asking for another
// tenant's workload gets the 404 a missing one gets.
func (s *Server) checkEventScope(ctx context.Context, st *request, workloadID string) error {
	if workloadID == "" || st == nil || !st.id.Scoped() {
		return nil
	}
	_, err := st.backend.Get(ctx, workloadID)
	return err
}

// A node's maintenance is no tenant's: a tenant-scoped role is refused
// (none is granted node.write; should one be, it is refused here too).
func (b *scoped) Cordon(ctx context.Context, reason string) (*api.Node, error) {
	if b.id.Scoped() {
		return nil, fmt.Errorf("cordon the node: %w", errdefs.ErrPermissionDenied)
	}
	return b.Backend.Cordon(ctx, reason)
}

func (b *scoped) Drain(ctx context.Context, reason string, timeout time.Duration) (*api.Node, error) {
	if b.id.Scoped() {
		return nil, fmt.Errorf("drain the node: %w", errdefs.ErrPermissionDenied)
	}
	return b.Backend.Drain(ctx, reason, timeout)
}

func (b *scoped) Uncordon(ctx context.Context) (*api.Node, error) {
	if b.id.Scoped() {
		return nil, fmt.Errorf("uncordon the node: %w", errdefs.ErrPermissionDenied)
	}
	return b.Backend.Uncordon(ctx)
}

// Images are the node's: a tenant-scoped role prunes none.
func (b *scoped) PruneImages(ctx context.Context, all bool) ([]api.RemovedImage, error) {
	if b.id.Scoped() {
		return nil, fmt.Errorf("prune images: %w", errdefs.ErrPermissionDenied)
	}
	return b.Backend.PruneImages(ctx, all)
}
