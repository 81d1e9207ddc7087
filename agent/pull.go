package agent

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
)

// pullEventEvery spaces a pull's progress events.
const pullEventEvery = time.Second

// submitImage is the image a submit runs, by its pull policy: the stored
// one, or, where the node lacks it (or the policy is always), the one its
// registry names now, read from the manifest and config alone. Its layers
// download after the workload is admitted, while it is pending (pullFor).
// Registry trouble is the submit's error, with the registry's reason.
//
// Only the images tenant (the workload's; "" the node's namespace) sees
// count as stored: another tenant's private image is missing, so the
// registry is asked with the node's credentials, and refuses or serves
// this tenant as it would any (imageowners.go).
func (a *Agent) submitImage(ctx context.Context, spec api.WorkloadSpec, tenant string) (*image.Image, error) {
	if spec.ImagePull != api.PullAlways {
		img, err := a.images.GetAs(image.TenantViewer(tenant), spec.Image)
		if err == nil || !errors.Is(err, errdefs.ErrNotFound) {
			return img, err
		}
		if spec.ImagePull == api.PullNever {
			return nil, &errdefs.ValidationError{Class: errdefs.ErrImageNotFound, Fields: []errdefs.FieldError{{
				Field:  "image",
				Detail: fmt.Sprintf("image %s is not on this node and image_pull is never; pull or import it first", spec.Image),
			}}}
		}
	}
	img, err := a.images.Resolve(ctx, spec.Image)
	if err != nil {
		return nil, err
	}
	if stored, err := a.images.GetAs(image.TenantViewer(tenant), img.Digest); err == nil {
		return stored, nil
	}
	return img, nil
}

// pullFor downloads the image a pending workload was admitted with when
// the node does not hold it, sharing the download with every other
// workload that waits for the same image. The workload shows the progress
// (Workload.Pull) and events report it. An agent killed meanwhile pulls
// again when it starts the workload: layers already stored are kept.
func (a *Agent) pullFor(ctx context.Context, id string) error {
	r := a.record(id)
	if r == nil || r.Workload.ImageDigest == "" {
		return nil
	}
	if _, err := a.images.Get(r.Workload.ImageDigest); err == nil || r.Workload.Spec.ImagePull == api.PullNever {
		return nil // taskConfig reports an image that is gone
	}
	ref, digest := r.Workload.Spec.Image, r.Workload.ImageDigest
	a.mu.Lock()
	a.pulls[id] = &api.ImagePullStatus{Ref: ref, Digest: digest}
	a.mu.Unlock()
	defer func() {
		a.mu.Lock()
		delete(a.pulls, id)
		a.mu.Unlock()
	}()
	a.log.Info("pulling the workload's image", "workload_id", id, "ref", ref, "digest", digest)
	report := a.pullEvents(id, ref, digest)
	_, err := a.images.PullShared(ctx, ref, digest, func(done, total int64) {
		a.mu.Lock()
		if p := a.pulls[id]; p != nil {
			p.BytesDone, p.BytesTotal = done, total
		}
		a.mu.Unlock()
		report(done, total)
	})
	if err != nil {
		if ctx.Err() == nil {
			a.events.publish(api.Event{Type: api.EventImagePullFailed, WorkloadID: id, Message: fmt.Sprintf("pull %s failed: %v", ref, err),
				Attrs: map[string]string{"ref": ref, "digest": digest}})
		}
		return err
	}
	a.events.publish(api.Event{Type: api.EventImagePulled, WorkloadID: id, Message: "pulled " + ref, Attrs: map[string]string{"ref": ref, "digest": digest}})
	return nil
}

// failPull ends a pending workload whose image could not be pulled:
// failed, with the registry's reason. It is not restarted: the same pull
// would fail the same way until someone changes the registry.
func (a *Agent) failPull(id string, err error) {
	_, merr := a.mutate(id, func(r *record) error {
		if r.Deleting || r.Workload.State != api.StatePending {
			return errSkip
		}
		now := time.Now().UTC()
		r.Workload.State, r.Workload.FinishedAt, r.NextStart = api.StateFailed, &now, nil
		r.Workload.Error = "pull image: " + err.Error()
		return nil
	})
	if merr != nil {
		a.log.Error("record a failed image pull", "workload_id", id, "err", merr)
	}
}

// withPull adds the progress of the workload's image download, if any,
// and its health.
func (a *Agent) withPull(w *api.Workload) {
	a.withHealth(w)
	a.mu.Lock()
	defer a.mu.Unlock()
	if p := a.pulls[w.ID]; p != nil {
		cp := *p
		w.Pull = &cp
	}
}

// pullFromDB is a stored pull policy; records from before pull policies
// had the default.
func pullFromDB(p string) api.PullPolicy {
	if p == "" {
		return api.PullIfNotPresent
	}
	return api.PullPolicy(p)
}

// pullEvents is a pull's progress callback: an image.pull.progress event
// at most every pullEventEvery, and at the end.
func (a *Agent) pullEvents(workload, ref, digest string) func(done, total int64) {
	var last time.Time
	return func(done, total int64) {
		if now := time.Now(); now.Sub(last) >= pullEventEvery || done == total {
			last = now
			a.publishPullProgress(workload, ref, digest, done, total)
		}
	}
}

func (a *Agent) publishPullProgress(workload, ref, digest string, done, total int64) {
	a.events.publish(api.Event{Type: api.EventImagePullProgress, WorkloadID: workload,
		Message: fmt.Sprintf("pulling %s: %d of %d bytes", ref, done, total),
		Attrs:   map[string]string{"ref": ref, "digest": digest, "bytes_done": strconv.FormatInt(done, 10), "bytes_total": strconv.FormatInt(total, 10)}})
}

// pullNodeImage is POST /v1/images/pull with the node's credentials: it
// joins a download of the same image already under way (a submit's, or
// another pull's) rather than start a second one, and its progress starts
// where that download is. While it waits, the latest progress is published
// again every pullEventEvery even when no byte arrived (a stalled layer),
// so a client that subscribes to the events after the download began
// (berth image pull draws from them) sees where it is within that time.
func (a *Agent) pullNodeImage(ctx context.Context, ref string) (*image.Image, error) {
	resolved, err := a.images.Resolve(ctx, ref)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	var done, total int64
	var last time.Time
	report := func(d, t int64, force bool) {
		mu.Lock()
		defer mu.Unlock()
		if !force {
			done, total = d, t
		}
		if total == 0 {
			return // nothing known yet
		}
		if now := time.Now(); force || now.Sub(last) >= pullEventEvery || done == total {
			last = now
			a.publishPullProgress("", ref, resolved.Digest, done, total)
		}
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(pullEventEvery)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				mu.Lock()
				quiet := time.Since(last) >= pullEventEvery
				mu.Unlock()
				if quiet {
					report(0, 0, true)
				}
			}
		}
	}()
	return a.images.PullShared(ctx, ref, resolved.Digest, func(d, t int64) { report(d, t, false) })
}
