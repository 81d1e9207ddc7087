package agent

import (
	"context"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// countingRegistry is an in-memory registry that counts blob downloads
// and can hold or refuse them.
type countingRegistry struct {
	host string
	mu   sync.Mutex
	gets map[string]int // blob digest -> GETs
	hold chan struct{}  // non-nil: GETs of the held blobs wait for it to close
	held map[string]bool
	fail map[string]bool // blob digests whose GETs answer 404
}

func startCountingRegistry(t *testing.T) *countingRegistry {
	cr := &countingRegistry{gets: map[string]int{}}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if i := strings.Index(r.URL.Path, "/blobs/sha256:"); i >= 0 && r.Method == http.MethodGet {
			cr.mu.Lock()
			digest := r.URL.Path[i+len("/blobs/"):]
			cr.gets[digest]++
			hold, fail := cr.hold, cr.fail[digest]
			if !cr.held[digest] {
				hold = nil
			}
			cr.mu.Unlock()
			if fail {
				http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}`, http.StatusNotFound)
				return
			}
			if hold != nil {
				select {
				case <-hold:
				case <-r.Context().Done():
					return
				}
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	cr.host = strings.TrimPrefix(srv.URL, "http://")
	return cr
}

func (cr *countingRegistry) getsOf(h v1.Hash) int {
	cr.mu.Lock()
	defer cr.mu.Unlock()
	return cr.gets[h.String()]
}

// pullEnv is the test agent over an image store that may pull from cr.
func pullEnv(t *testing.T, cr *countingRegistry) *env {
	e := newEnv(t)
	imgs, err := image.New(filepath.Join(e.dir, "pulled"), image.WithRegistries(image.Registries{Allowed: []string{"*"}, Insecure: []string{cr.host}}),
		image.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	e.imgs = imgs
	e.change = func(o *Options) { o.Images = imgs }
	e.restart()
	return e
}

func pushApp(t *testing.T, cr *countingRegistry, repo, marker string) (string, v1.Image) {
	t.Helper()
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	layer, err := ociimage.Layer(ociimage.File{Name: "marker", Body: marker})
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := testimage.Push(context.Background(), cr.host, repo, img)
	if err != nil {
		t.Fatal(err)
	}
	return ref, img
}

func layerDigests(t *testing.T, img v1.Image) []v1.Hash {
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var out []v1.Hash
	for _, l := range ls {
		d, _ := l.Digest()
		out = append(out, d)
	}
	return out
}

// A submit of an image the node does not hold pulls it: ten concurrent
// submits are admitted before the layers download, and download each
// layer once; each runs the image's content.
func TestSubmitPullsMissingImageOnce(t *testing.T) {
	cr := startCountingRegistry(t)
	e := pullEnv(t, cr)
	ref, img := pushApp(t, cr, "test/app:1", "one")
	from := e.agent.events.lastID()
	var wg sync.WaitGroup
	ids := make([]string, 10)
	errs := make([]error, 10)
	for i := range 10 {
		wg.Go(func() {
			spec := sh("true")
			spec.Image = ref
			w, _, err := e.agent.Submit(context.Background(), spec)
			if err == nil {
				ids[i] = w.ID
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
	}
	for _, id := range ids {
		w := e.waitFor(id, terminal)
		if w.State != api.StateExited || exitOf(w) != 0 {
			t.Errorf("workload %s: %s exit %d %q", id, w.State, exitOf(w), w.Error)
		}
	}
	for _, d := range layerDigests(t, img) {
		if n := cr.getsOf(d); n != 1 {
			t.Errorf("layer %s downloaded %d times, want once", d, n)
		}
	}
	if _, err := e.imgs.Get(ref); err != nil {
		t.Errorf("the pulled image is not in the store: %v", err)
	}
	// Progress events, each with its workload, up to every byte.
	evs, _, _ := e.agent.events.after(from, func(ev *api.Event) bool { return ev.Type == api.EventImagePullProgress })
	complete := 0
	for _, ev := range evs {
		if ev.WorkloadID == "" || ev.Attrs["bytes_total"] == "" || ev.Attrs["bytes_total"] == "0" {
			t.Errorf("progress event %+v", ev)
		}
		if ev.Attrs["bytes_done"] == ev.Attrs["bytes_total"] {
			complete++
		}
	}
	if complete == 0 {
		t.Errorf("no progress event says the download is complete: %d events", len(evs))
	}
}

// image_pull: always resolves the tag again and runs the new digest;
// never refuses an image the node lacks, naming why; a download the
// registry refuses fails the workload with the registry's reason.
func TestImagePullPolicies(t *testing.T) {
	cr := startCountingRegistry(t)
	e := pullEnv(t, cr)
	ctx := context.Background()
	ref, _ := pushApp(t, cr, "test/app:1", "one")
	first := e.submit(api.WorkloadSpec{Image: ref, Command: []string{"true"}})
	e.waitFor(first.ID, terminal)
	_, img2 := pushApp(t, cr, "test/app:1", "two")
	d2, _ := img2.Digest()

	again := e.submit(api.WorkloadSpec{Image: ref, Command: []string{"true"}})
	if again.ImageDigest != first.ImageDigest {
		t.Errorf("if-not-present: digest %s, want the stored %s", again.ImageDigest, first.ImageDigest)
	}
	always := e.submit(api.WorkloadSpec{Image: ref, ImagePull: api.PullAlways, Command: []string{"true"}})
	if always.ImageDigest != d2.String() {
		t.Errorf("always: digest %s, want the tag's new %s", always.ImageDigest, d2)
	}
	if w := e.waitFor(always.ID, terminal); w.State != api.StateExited || exitOf(w) != 0 {
		t.Errorf("always: %s %q", w.State, w.Error)
	}

	_, _, err := e.agent.Submit(ctx, api.WorkloadSpec{Image: cr.host + "/test/absent:1", ImagePull: api.PullNever, Command: []string{"true"}})
	if !errors.Is(err, errdefs.ErrImageNotFound) || !strings.Contains(err.Error(), "never") {
		t.Errorf("never, missing image: %v", err)
	}
	if _, _, err := e.agent.Submit(ctx, api.WorkloadSpec{Image: cr.host + "/test/absent:1", Command: []string{"true"}}); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("an image the registry lacks: %v, want not found", err)
	}
	if _, _, err := e.agent.Submit(ctx, api.WorkloadSpec{Image: ref, ImagePull: "sometimes"}); !errors.Is(err, errdefs.ErrInvalidArgument) {
		t.Errorf("a bad image_pull: %v", err)
	}

	ref3, img3 := pushApp(t, cr, "test/app:3", "three")
	cr.mu.Lock()
	cr.fail = map[string]bool{}
	for _, d := range layerDigests(t, img3) {
		cr.fail[d.String()] = true
	}
	cr.mu.Unlock()
	w := e.submit(api.WorkloadSpec{Image: ref3, Command: []string{"true"}})
	w = e.waitFor(w.ID, terminal)
	if w.State != api.StateFailed || !strings.Contains(w.Error, "pull image") || !strings.Contains(w.Error, "404") {
		t.Errorf("a refused download: %s %q, want failed with the registry's reason", w.State, w.Error)
	}
}

// An agent that stops while a workload's image downloads (the workload
// pending, with progress) pulls it again after its restart and runs it:
// nothing acknowledged is lost.
func TestPullResumesAfterAgentRestart(t *testing.T) {
	cr := startCountingRegistry(t)
	e := pullEnv(t, cr)
	ref, img := pushApp(t, cr, "test/app:1", "one")
	hold := make(chan struct{})
	cr.mu.Lock()
	cr.hold, cr.held = hold, map[string]bool{}
	for _, d := range layerDigests(t, img) {
		cr.held[d.String()] = true
	}
	cr.mu.Unlock()
	w := e.submit(api.WorkloadSpec{Image: ref, Command: []string{"true"}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, _ := e.agent.Get(context.Background(), w.ID)
		if got.State != api.StatePending {
			t.Fatalf("while its image downloads: %s", got.State)
		}
		if got.Pull != nil && got.Pull.BytesTotal > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no pull progress shown")
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.restart()
	close(hold)
	cr.mu.Lock()
	cr.hold = nil
	cr.mu.Unlock()
	if got := e.waitFor(w.ID, terminal); got.State != api.StateExited || exitOf(got) != 0 {
		t.Errorf("after the restart: %s %q", got.State, got.Error)
	}
}
