package agent

import (
	"context"
	"fmt"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/volume"
)

// maxVolumes bounds the volumes one workload mounts (a VM gives each a
// PCI slot of its own).
const maxVolumes = 16

// validateVolumes checks the shape of spec.Volumes: each names a volume
// or a host path (not both), at an absolute path other than /, no path
// twice. Whether the volume exists and the host path is allowed is
// Submit's to check (checkVolumes).
func validateVolumes(spec *api.WorkloadSpec, v *errdefs.ValidationError) {
	if len(spec.Volumes) > maxVolumes {
		v.Add("volumes", "%d volumes; at most %d", len(spec.Volumes), maxVolumes)
		return
	}
	seen := map[string]int{}
	for i := range spec.Volumes {
		m := &spec.Volumes[i]
		field := "volumes[" + strconv.Itoa(i) + "]"
		switch {
		case m.Name == "" && m.HostPath == "":
			v.Add(field, "name a volume (name) or a host directory (host_path)")
		case m.Name != "" && m.HostPath != "":
			v.Add(field, "name and host_path are exclusive: a volume or a host directory")
		case m.Name != "":
			if err := volume.CheckSpec(m.Name, 0, nil); err != nil {
				v.Add(field+".name", "%q is not a volume name", m.Name)
			}
		default:
			switch {
			case !path.IsAbs(m.HostPath) || len(m.HostPath) > maxPathLen || strings.ContainsRune(m.HostPath, 0):
				v.Add(field+".host_path", "%q is not an absolute path", m.HostPath)
			case hasDotDot(m.HostPath):
				v.Add(field+".host_path", "%q climbs with '..'; give the directory itself", m.HostPath)
			default:
				m.HostPath = path.Clean(m.HostPath)
			}
		}
		switch {
		case !path.IsAbs(m.Path) || len(m.Path) > maxPathLen || strings.ContainsRune(m.Path, 0):
			v.Add(field+".path", "%q must be an absolute path in the workload", m.Path)
			continue
		case path.Clean(m.Path) == "/":
			v.Add(field+".path", "a volume cannot replace the workload's root")
			continue
		case hasDotDot(m.Path):
			v.Add(field+".path", "%q climbs with '..'", m.Path)
			continue
		}
		m.Path = path.Clean(m.Path)
		if j, dup := seen[m.Path]; dup {
			v.Add(field+".path", "%s is already the path of volumes[%d]", m.Path, j)
		}
		seen[m.Path] = i
	}
}

func hasDotDot(p string) bool {
	for _, e := range strings.Split(p, "/") {
		if e == ".." {
			return true
		}
	}
	return false
}

// checkVolumes checks that a (normalized) spec's volumes can be mounted
// on this node: each named volume exists in the workload's tenant, each
// host path is one the operator allows. Its errors name the fields.
func (a *Agent) checkVolumes(spec api.WorkloadSpec, tenant string, isolation api.Isolation) error {
	if len(spec.Volumes) == 0 {
		return nil
	}
	v := &errdefs.ValidationError{}
	for i, m := range spec.Volumes {
		field := "volumes[" + strconv.Itoa(i) + "]"
		if a.opts.Volumes == nil {
			v.Add(field, "this node has no volume store")
			continue
		}
		if m.Name != "" {
			if _, err := a.opts.Volumes.Get(tenant, m.Name); err != nil {
				v.Add(field+".name", "no volume %q%s; create it first (POST /v1/volumes)", m.Name, inTenant(tenant))
			}
			continue
		}
		if err := a.opts.Volumes.CheckHostPath(m.HostPath, m.ReadOnly, a.volumeDevices(isolation)); err != nil {
			v.Add(field+".host_path", "%s", strings.TrimSuffix(err.Error(), ": "+errdefs.ErrInvalidArgument.Error()))
		}
	}
	return v.Err()
}

func inTenant(tenant string) string {
	if tenant == "" {
		return ""
	}
	return " in tenant " + tenant
}

// stageVolumes makes the host side of a workload's volumes for its task.
func (a *Agent) stageVolumes(w *api.Workload) ([]driver.Mount, error) {
	if len(w.Spec.Volumes) == 0 {
		return nil, nil
	}
	if a.opts.Volumes == nil {
		return nil, fmt.Errorf("this node has no volume store: %w", errdefs.ErrUnavailable)
	}
	srcs := make([]volume.Source, len(w.Spec.Volumes))
	for i, m := range w.Spec.Volumes {
		srcs[i] = volume.Source{Tenant: w.Tenant, Name: m.Name, HostPath: m.HostPath, Target: m.Path, ReadOnly: m.ReadOnly}
		if w.Isolation == api.IsolationVM {
			srcs[i].Owner = a.opts.VMVolumeOwner
		}
		srcs[i].Devices = a.volumeDevices(w.Isolation)
	}
	return a.opts.Volumes.Stage(w.ID, srcs)
}

// volumeDevices says whether a workload of this isolation can make
// device nodes in its volumes as root on the host: a VM's over virtio-fs
// can (virtiofsd runs as root); a container cannot (no CAP_MKNOD), nor a
// VM's over 9p (QEMU serves it unprivileged, VMVolumeOwner set).
func (a *Agent) volumeDevices(isolation api.Isolation) bool {
	return isolation == api.IsolationVM && a.opts.VMVolumeOwner == nil
}

// releaseVolumes unmounts what stageVolumes made for a workload.
func (a *Agent) releaseVolumes(id string) error {
	if a.opts.Volumes == nil {
		return nil
	}
	return a.opts.Volumes.Release(id)
}

// reconcileVolumes releases the staged mounts of workloads that have no
// record any more (a delete that crashed between its steps).
func (a *Agent) reconcileVolumes() {
	if a.opts.Volumes == nil {
		return
	}
	ids, err := a.opts.Volumes.Staged()
	if err != nil {
		a.log.Warn("reconcile: list staged volumes", "err", err)
		return
	}
	for _, id := range ids {
		if a.record(id) != nil {
			continue
		}
		a.log.Warn("reconcile: releasing the volumes of a workload that is gone", "workload_id", id)
		if err := a.opts.Volumes.Release(id); err != nil {
			a.log.Warn("reconcile: release volumes", "workload_id", id, "err", err)
		}
	}
}

// volumeUsers lists the workloads (ids, sorted) whose spec mounts the
// volume NAME of tenant: while any record does, the volume stays.
func (a *Agent) volumeUsers(tenant, name string) []string {
	var ids []string
	for _, r := range a.snapshotRecords() {
		if r.Workload.Tenant != tenant {
			continue
		}
		for _, m := range r.Workload.Spec.Volumes {
			if m.Name == name {
				ids = append(ids, r.Workload.ID)
				break
			}
		}
	}
	sort.Strings(ids)
	return ids
}

// volumeRef splits a volume reference: TENANT/NAME, or NAME in the
// node's own namespace.
func volumeRef(ref string) (tenant, name string) {
	if t, n, ok := strings.Cut(ref, "/"); ok {
		return t, n
	}
	return "", ref
}

func (a *Agent) volumeStore() (*volume.Store, error) {
	if a.opts.Volumes == nil {
		return nil, fmt.Errorf("this node has no volume store: %w", errdefs.ErrUnavailable)
	}
	return a.opts.Volumes, nil
}

func (a *Agent) toAPIVolume(v *volume.Volume) api.Volume {
	return api.Volume{Name: v.Name, Tenant: v.Tenant, SizeBytes: v.SizeBytes, Labels: v.Labels,
		CreatedAt: v.CreatedAt, UsedBy: a.volumeUsers(v.Tenant, v.Name)}
}

// CreateVolume creates a named volume in the tenant its labels name
// (created false: it existed with the same size and labels).
func (a *Agent) CreateVolume(ctx context.Context, spec api.VolumeSpec) (*api.Volume, bool, error) {
	vs, err := a.volumeStore()
	if err != nil {
		return nil, false, err
	}
	tenant := spec.Labels[api.TenantLabel]
	lv := &errdefs.ValidationError{}
	if tenant != "" && (len(tenant) > maxTenantLen || !tenantRE.MatchString(tenant)) {
		lv.Add("labels."+api.TenantLabel, "%q is not a tenant name", tenant)
	}
	for k, val := range spec.Labels {
		if len(k) > maxLabelKey || !labelKeyRE.MatchString(k) || len(val) > maxLabelValue || strings.ContainsFunc(val, isControl) {
			lv.Add("labels."+k, "not a valid label")
		}
	}
	if spec.SizeBytes < 0 {
		lv.Add("size_bytes", "must not be negative")
	}
	if err := lv.Err(); err != nil {
		return nil, false, err
	}
	v, created, err := vs.Create(tenant, spec.Name, spec.SizeBytes, spec.Labels)
	if err != nil {
		return nil, false, err
	}
	out := a.toAPIVolume(v)
	return &out, created, nil
}

// GetVolume returns the volume ref names (TENANT/NAME or NAME).
func (a *Agent) GetVolume(ctx context.Context, ref string) (*api.Volume, error) {
	vs, err := a.volumeStore()
	if err != nil {
		return nil, err
	}
	v, err := vs.Get(volumeRef(ref))
	if err != nil {
		return nil, err
	}
	out := a.toAPIVolume(v)
	return &out, nil
}

// ListVolumes returns every volume on the node.
func (a *Agent) ListVolumes(ctx context.Context) []api.Volume {
	if a.opts.Volumes == nil {
		return []api.Volume{}
	}
	vols := a.opts.Volumes.List()
	out := make([]api.Volume, 0, len(vols))
	for _, v := range vols {
		out = append(out, a.toAPIVolume(v))
	}
	return out
}

// DeleteVolume removes a volume and its data; a volume some workload
// mounts (whatever its state, until it is deleted) is a conflict naming
// them. Deleting a workload never deletes its volumes.
func (a *Agent) DeleteVolume(ctx context.Context, ref string) error {
	vs, err := a.volumeStore()
	if err != nil {
		return err
	}
	tenant, name := volumeRef(ref)
	trash, err := a.detachVolume(vs, ref, tenant, name)
	if err != nil {
		return err
	}
	// The files go outside writeMu: a volume of many files takes long to
	// delete, and every state write would wait. The volume is gone
	// already; files a failure or a crash leaves go at the next start.
	if err := vs.Purge(trash); err != nil {
		a.log.Warn("delete a removed volume's files; the next start deletes them", "volume", ref, "error", err)
	}
	return nil
}

// detachVolume takes an unused volume out of the store under writeMu, so
// that no submit can take it between the check and the removal (Submit
// checks again under it).
func (a *Agent) detachVolume(vs *volume.Store, ref, tenant, name string) (string, error) {
	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	if _, err := vs.Get(tenant, name); err != nil {
		return "", err
	}
	if users := a.volumeUsers(tenant, name); len(users) > 0 {
		return "", fmt.Errorf("volume %q is used by workload(s) %s; delete them first: %w", ref, strings.Join(users, ", "), errdefs.ErrConflict)
	}
	return vs.Detach(tenant, name)
}
