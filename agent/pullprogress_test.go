package agent

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/berthd/berth/api"
)

// pullOf reads a workload's pull status.
func pullOf(t *testing.T, e *env, id string) *api.ImagePullStatus {
	t.Helper()
	w, err := e.agent.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return w.Pull
}

// A submit or an image pull that joins a download under way starts from
// where it is: with the download stalled (no byte arrives after the join),
// the joining workload's pull status and a progress event for it already
// say the bytes done and total, and an image pull publishes them at once
// and again while it waits. Every layer still downloads once.
func TestJoinedPullStartsWhereTheDownloadIs(t *testing.T) {
	cr := startCountingRegistry(t)
	e := pullEnv(t, cr)
	ref, img := pushApp(t, cr, "test/progress:1", "joined")
	layers := layerDigests(t, img)
	hold := make(chan struct{})
	cr.mu.Lock()
	cr.hold, cr.held = hold, map[string]bool{layers[len(layers)-1].String(): true}
	cr.mu.Unlock()
	released := false
	defer func() {
		if !released {
			close(hold)
		}
	}()

	spec := sh("true")
	spec.Image = ref
	first, _, err := e.agent.Submit(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	var at *api.ImagePullStatus
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if p := pullOf(t, e, first.ID); p != nil && p.BytesDone > 0 && cr.getsOf(layers[len(layers)-1]) > 0 {
			at = p // the rest waits on the held layer
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first submit's download did not begin: %+v", pullOf(t, e, first.ID))
		}
	}
	if at.BytesDone >= at.BytesTotal {
		t.Fatalf("the download is not held: %+v", at)
	}

	from := e.agent.events.lastID()
	second, _, err := e.agent.Submit(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		p := pullOf(t, e, second.ID)
		if p != nil && p.BytesDone == at.BytesDone && p.BytesTotal == at.BytesTotal {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the joining workload's pull status is %+v, want the download's %d of %d", p, at.BytesDone, at.BytesTotal)
		}
	}
	evs, _, _ := e.agent.events.after(from, func(ev *api.Event) bool {
		return ev.Type == api.EventImagePullProgress && ev.WorkloadID == second.ID
	})
	if len(evs) == 0 || evs[0].Attrs["bytes_done"] != strconv.FormatInt(at.BytesDone, 10) || evs[0].Attrs["bytes_total"] != strconv.FormatInt(at.BytesTotal, 10) {
		t.Errorf("the joining workload's progress events: %+v", evs)
	}

	// berth image pull of the same image joins it too.
	from = e.agent.events.lastID()
	pulled := make(chan error, 1)
	go func() {
		_, err := e.agent.PullImage(context.Background(), api.PullRequest{Ref: ref})
		pulled <- err
	}()
	want := strconv.FormatInt(at.BytesDone, 10)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		evs, _, _ := e.agent.events.after(from, func(ev *api.Event) bool {
			return ev.Type == api.EventImagePullProgress && ev.WorkloadID == "" && ev.Attrs["bytes_done"] == want
		})
		if len(evs) >= 2 {
			break // at the join, and again while it waits
		}
		if time.Now().After(deadline) {
			t.Fatalf("the image pull published %d progress events at %s bytes", len(evs), want)
		}
	}

	close(hold)
	released = true
	if err := <-pulled; err != nil {
		t.Fatalf("image pull: %v", err)
	}
	for _, id := range []string{first.ID, second.ID} {
		if w := e.waitFor(id, terminal); w.State != api.StateExited || exitOf(w) != 0 {
			t.Errorf("workload %s: %s %q", id, w.State, w.Error)
		}
	}
	for _, d := range layers {
		if n := cr.getsOf(d); n != 1 {
			t.Errorf("layer %s downloaded %d times, want once", d, n)
		}
	}
}
