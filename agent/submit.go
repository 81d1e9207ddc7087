package agent

import (
	"context"
	"fmt"
	"maps"
	"reflect"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
)

// Submit admits a workload: validates it, places it, persists it (before it
// returns) and starts it in the background. A submit naming an existing
// workload of its tenant (the node's own namespace without one) with the
// same spec, secret values included, returns that workload (created
// false), so clients can retry safely; with a different spec it is a
// conflict. Names are unique per tenant: another tenant's workload of the
// same name is neither a conflict nor a retry.
//
// The secret environment is written to its own root-only file before the
// record is committed; the record, and everything made from it (the
// answer, events, the state database), holds only its names.
func (a *Agent) Submit(ctx context.Context, spec api.WorkloadSpec) (*api.Workload, bool, error) {
	w, created, err := a.submit(ctx, spec)
	if err != nil {
		return nil, false, err
	}
	// Acknowledged only once on disk, a retry's answer too: the record it
	// found may still be on its way there.
	if err := a.commits.durable(w.ModifyIndex); err != nil {
		return nil, false, err
	}
	return w, created, nil
}

func (a *Agent) submit(ctx context.Context, spec api.WorkloadSpec) (*api.Workload, bool, error) {
	secrets := maps.Clone(spec.SecretEnv)
	spec, err := normalize(spec, a.opts.Defaults)
	if err != nil {
		return nil, false, err
	}
	tenant := spec.Labels[api.TenantLabel]
	img, err := a.submitImage(ctx, spec, tenant)
	if err != nil {
		return nil, false, err
	}
	// Image collection leaves the image alone until the record that uses
	// it is committed (or the submit refused).
	defer a.admit(img.Digest)()
	if img.Kind == image.KindDisk {
		if spec, err = diskSpec(spec); err != nil {
			return nil, false, err
		}
	} else if _, err := resolveCommand(spec, img); err != nil {
		return nil, false, err
	}
	// A retry gets the workload already admitted even when the policy
	// has changed since: its decision was made and recorded then. Checked
	// again under the lock below.
	if w := a.retryOf(tenant, spec, secrets); w != nil {
		return w, false, nil
	}
	if err := a.cordonErr(); err != nil {
		return nil, false, err
	}
	// A node whose data directory is nearly full takes nothing more: the
	// state database and every workload's logs live there.
	if err := a.images.DiskPressure(); err != nil {
		return nil, false, err
	}
	placement, err := a.place(ctx, spec)
	if err != nil {
		return nil, false, err
	}

	a.writeMu.Lock()
	defer a.writeMu.Unlock()
	// Under writeMu: a volume cannot be deleted between this check and
	// the commit that makes this workload one of its users.
	if err := a.checkVolumes(spec, tenant, placement.Isolation); err != nil {
		return nil, false, err
	}
	if spec.Name != "" {
		a.mu.Lock()
		existing, ok := a.namedLocked(tenant, spec.Name)
		a.mu.Unlock()
		if ok && existing.Deleting {
			return nil, false, fmt.Errorf("a workload named %q (id %s) is being deleted; submit again once it is gone: %w", spec.Name, existing.Workload.ID, errdefs.ErrConflict)
		}
		if ok {
			same, err := a.sameSpec(existing, spec, secrets)
			if err != nil {
				return nil, false, err
			}
			if same {
				w := cloneWorkload(existing.Workload)
				return &w, false, nil
			}
			return nil, false, fmt.Errorf("a workload named %q already exists with a different spec (id %s): %w", spec.Name, existing.Workload.ID, errdefs.ErrAlreadyExists)
		}
	}
	// Checked again under the lock a cordon is set under: nothing is
	// admitted once Cordon has returned.
	if err := a.cordonErr(); err != nil {
		return nil, false, err
	}
	now := time.Now().UTC()
	r := &record{Workload: api.Workload{
		ID:          newID(),
		Name:        spec.Name,
		Tenant:      tenant,
		Spec:        spec,
		State:       api.StatePending,
		Isolation:   placement.Isolation,
		Placement:   placement,
		ImageDigest: img.Digest,
		CreatedAt:   now,
		Network:     &api.NetworkStatus{Mode: placement.Network},
	}}
	if r.Workload.Network.Mode == "" {
		r.Workload.Network.Mode = spec.Network
	}
	if err := a.admitLocked(&r.Workload); err != nil {
		return nil, false, err
	}
	// The secrets are on disk before the record that names them: a run
	// (which may start as soon as the record is committed) finds them,
	// and a crash in between leaves a file the next start sweeps away.
	if len(secrets) > 0 {
		if err := a.store.putSecrets(r.Workload.ID, secrets); err != nil {
			return nil, false, fmt.Errorf("store the secret environment of workload %s: %w", r.Workload.ID, err)
		}
	}
	if err := a.commitLocked(r); err != nil {
		if len(secrets) > 0 {
			if rerr := a.store.removeSecrets(r.Workload.ID); rerr != nil {
				a.log.Warn("remove the secrets of a workload that was not admitted", "workload_id", r.Workload.ID, "err", rerr)
			}
		}
		return nil, false, err
	}
	a.log.Info("workload admitted", "workload_id", r.Workload.ID, "name", spec.Name, "tenant", tenant, "image", spec.Image,
		"isolation", placement.Isolation, "rule", placement.DecidingRule)
	w := cloneWorkload(r.Workload)
	return &w, true, nil
}

// retryOf returns the workload a submit of spec (normalized) is a retry
// of: one of the same name in the same tenant's namespace, not being
// deleted, with the same spec and the same secret values.
func (a *Agent) retryOf(tenant string, spec api.WorkloadSpec, secrets map[string]string) *api.Workload {
	if spec.Name == "" {
		return nil
	}
	a.mu.Lock()
	r, ok := a.namedLocked(tenant, spec.Name)
	a.mu.Unlock()
	if !ok || r.Deleting {
		return nil
	}
	// A secrets file that cannot be read here (a delete may have begun
	// since) is judged again under the lock, where a delete is seen.
	if same, err := a.sameSpec(r, spec, secrets); err != nil || !same {
		return nil
	}
	w := cloneWorkload(r.Workload)
	return &w
}

// sameSpec reports whether r was submitted with spec (normalized, so its
// secret values are redacted) and secrets: the record keeps only the
// secrets' names, so their values are compared with its secrets file, by
// digest.
func (a *Agent) sameSpec(r *record, spec api.WorkloadSpec, secrets map[string]string) (bool, error) {
	if !reflect.DeepEqual(r.Workload.Spec, spec) {
		return false, nil
	}
	if len(secrets) == 0 {
		return true, nil // and so has r: the names are part of the spec
	}
	stored, err := a.store.secrets(r.Workload.ID)
	if err != nil {
		return false, fmt.Errorf("compare with workload %s: read its secret environment: %w", r.Workload.ID, err)
	}
	return sameSecrets(stored, secrets), nil
}

// diskSpec checks a spec that boots a whole-disk image: it runs in a VM
// (an auto request becomes a vm request, so policy may still deny it), and
// the disk's own OS decides what runs, so the spec names no command, env
// or workdir.
func diskSpec(spec api.WorkloadSpec) (api.WorkloadSpec, error) {
	v := &errdefs.ValidationError{}
	switch spec.Isolation {
	case api.IsolationAuto, api.IsolationVM:
		spec.Isolation = api.IsolationVM
	default:
		v.Add("isolation", "%s is a whole-disk image: it runs only in a VM", spec.Image)
	}
	if len(spec.Command) > 0 || len(spec.Args) > 0 {
		v.Add("command", "a whole-disk image boots its own OS; it takes no command")
	}
	if len(spec.Env) > 0 {
		v.Add("env", "a whole-disk image boots its own OS; it takes no environment")
	}
	if len(spec.SecretEnv) > 0 {
		v.Add("secret_env", "a whole-disk image boots its own OS; it takes no environment")
	}
	if spec.Workdir != "" {
		v.Add("workdir", "a whole-disk image boots its own OS; it takes no workdir")
	}
	if spec.Network == api.NetworkHost {
		v.Add("network", "host is for containers only")
	}
	if len(spec.Volumes) > 0 {
		v.Add("volumes", "a whole-disk image boots its own OS, which berth cannot mount volumes in")
	}
	if spec.Stdin {
		v.Add("stdin", "a whole-disk image boots its own OS; its console is not the workload's stdin")
	}
	if spec.TTY {
		v.Add("tty", "a whole-disk image boots its own OS; berth gives it no terminal")
	}
	if err := v.Err(); err != nil {
		return spec, err
	}
	return spec, nil
}

// resolveCommand merges the image's entrypoint and cmd with the spec's
// command and args the way Kubernetes does: command replaces the
// entrypoint (and drops the image's cmd), args replace the cmd.
func resolveCommand(spec api.WorkloadSpec, img *image.Image) ([]string, error) {
	var argv []string
	switch {
	case len(spec.Command) > 0:
		argv = append(append(argv, spec.Command...), spec.Args...)
	case len(spec.Args) > 0:
		argv = append(append(argv, img.Config.Entrypoint...), spec.Args...)
	default:
		argv = append(append(argv, img.Config.Entrypoint...), img.Config.Cmd...)
	}
	if len(argv) == 0 {
		return nil, errdefs.Invalid("command", "image %s has no entrypoint or cmd; give a command", spec.Image)
	}
	return argv, nil
}
