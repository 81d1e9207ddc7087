package server

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"strings"

	"github.com/go-chi/chi/v5"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// VolumeBackend is what the volume routes need of the agent.
type VolumeBackend interface {
	CreateVolume(ctx context.Context, spec api.VolumeSpec) (*api.Volume, bool, error)
	// GetVolume and DeleteVolume take TENANT/NAME, or NAME in the node's
	// own namespace.
	GetVolume(ctx context.Context, ref string) (*api.Volume, error)
	ListVolumes(ctx context.Context) []api.Volume
	DeleteVolume(ctx context.Context, ref string) error
}

func (s *Server) volumeRoutes(r chi.Router) {
	r.Post("/", s.createVolume)
	r.Get("/", s.listVolumes)
	r.Get("/{ref}", s.getVolume)
	r.Delete("/{ref}", s.deleteVolume)
}

func (s *Server) createVolume(w http.ResponseWriter, r *http.Request) {
	var spec api.VolumeSpec
	if p := s.decodeJSON(w, r, &spec); p != nil {
		writeProblem(w, r, s.log, p)
		return
	}
	v, created, err := s.be(r).CreateVolume(r.Context(), spec)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	w.Header().Set("Location", "/v1/volumes/"+url.PathEscape(api.Ref(v.Tenant, v.Name)))
	status := http.StatusCreated
	if !created {
		status = http.StatusOK
	}
	writeJSON(w, status, v)
}

func (s *Server) listVolumes(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, api.VolumeList{Volumes: s.be(r).ListVolumes(r.Context())})
}

func (s *Server) getVolume(w http.ResponseWriter, r *http.Request) {
	v, err := s.be(r).GetVolume(r.Context(), refParam(r))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Server) deleteVolume(w http.ResponseWriter, r *http.Request) {
	if err := s.be(r).DeleteVolume(r.Context(), refParam(r)); err != nil {
		s.fail(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// A submitter's volumes are its tenants' alone: another tenant's answers
// as a missing one, as workloads do.

func (b *scoped) CreateVolume(ctx context.Context, spec api.VolumeSpec) (*api.Volume, bool, error) {
	ws, err := b.withTenant(api.WorkloadSpec{Labels: spec.Labels})
	b.st.tenant = ws.Labels[api.TenantLabel]
	if err != nil {
		return nil, false, err
	}
	spec.Labels = ws.Labels
	return b.Backend.CreateVolume(ctx, spec)
}

func (b *scoped) ListVolumes(ctx context.Context) []api.Volume {
	all := b.Backend.ListVolumes(ctx)
	if !b.id.Scoped() {
		return all
	}
	out := make([]api.Volume, 0, len(all))
	for _, v := range all {
		if b.id.CanSee(v.Tenant) {
			out = append(out, v)
		}
	}
	return out
}

// resolveVolume turns a caller's reference into the agent's: TENANT/NAME
// of a tenant it sees, or a bare NAME in its one tenant (or the one of its
// tenants that holds it).
func (b *scoped) resolveVolume(ctx context.Context, ref string) (string, error) {
	if !b.id.Scoped() {
		return ref, nil
	}
	if tenant, name, ok := strings.Cut(ref, "/"); ok {
		if !b.id.CanSee(tenant) || name == "" {
			return "", notFoundVolume(ref)
		}
		return ref, nil
	}
	var found []string
	for _, tenant := range b.id.Tenants {
		if _, err := b.Backend.GetVolume(ctx, api.Ref(tenant, ref)); err == nil {
			found = append(found, api.Ref(tenant, ref))
		}
	}
	switch len(found) {
	case 0:
		return "", notFoundVolume(ref)
	case 1:
		return found[0], nil
	default:
		return "", errdefs.Invalid("ref", "volume %q is held by several of your tenants (%s); say TENANT/NAME", ref, strings.Join(found, ", "))
	}
}

func notFoundVolume(ref string) error { return wrapNotFound("volume", ref) }

func wrapNotFound(kind, ref string) error {
	return &kindNotFound{kind: kind, ref: ref}
}

type kindNotFound struct{ kind, ref string }

func (e *kindNotFound) Error() string {
	return e.kind + " \"" + e.ref + "\": " + errdefs.ErrNotFound.Error()
}
func (e *kindNotFound) Unwrap() error { return errdefs.ErrNotFound }

func (b *scoped) GetVolume(ctx context.Context, ref string) (*api.Volume, error) {
	full, err := b.resolveVolume(ctx, ref)
	if err != nil {
		return nil, err
	}
	v, err := b.Backend.GetVolume(ctx, full)
	if errors.Is(err, errdefs.ErrNotFound) {
		return nil, notFoundVolume(ref)
	}
	return v, err
}

func (b *scoped) DeleteVolume(ctx context.Context, ref string) error {
	full, err := b.resolveVolume(ctx, ref)
	if err != nil {
		return err
	}
	err = b.Backend.DeleteVolume(ctx, full)
	if errors.Is(err, errdefs.ErrNotFound) {
		return notFoundVolume(ref)
	}
	return err
}
