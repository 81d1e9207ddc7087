package main

import (
	"bytes"
	"context"
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
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// lockedBuffer is an io.Writer the progress goroutine and the test share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// heldPullAgent serves an agent whose image store pulls from an in-memory
// registry that holds every GET of the image's last layer until release
// is called: a download under way, stalled with part of it done.
func heldPullAgent(t *testing.T) (c *client.Client, ref string, release func()) {
	t.Helper()
	hold := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(hold) }) }
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	layer, err := ociimage.Layer(ociimage.File{Name: "marker", Body: "held"})
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(base, layer)
	if err != nil {
		t.Fatal(err)
	}
	held, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+held.String()) {
			select {
			case <-hold:
			case <-r.Context().Done():
				return
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(rs.Close)
	host := strings.TrimPrefix(rs.URL, "http://")
	if ref, err = testimage.Push(context.Background(), host, "test/held:1", img); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	imgs, err := image.New(filepath.Join(dir, "images"), image.WithRegistries(image.Registries{Allowed: []string{"*"}, Insecure: []string{host}}), image.WithLogger(slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	_, c = serveAgent(t, dir, imgs)
	// Registered after the agent's: runs before its server waits for the
	// held request to end.
	t.Cleanup(release)
	return c, ref, release
}

func waitForText(t *testing.T, b *lockedBuffer, what string, ok func(string) bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !ok(b.String()); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the progress output is %q", what, b.String())
		}
	}
}

// berth run --wait and berth image pull that join a download another
// submit started draw its progress at once, from where it is, though no
// byte arrives after they joined (the download is stalled).
func TestProgressOfADownloadUnderWay(t *testing.T) {
	c, ref, release := heldPullAgent(t)
	ctx := context.Background()
	spec := api.WorkloadSpec{Image: ref, Command: []string{"true"}}
	first, err := c.Submit(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	var at *api.ImagePullStatus
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		w, _, err := c.Get(ctx, first.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		if w.Pull != nil && w.Pull.BytesDone > 0 {
			at = w.Pull
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the first download did not begin: %+v", w)
		}
	}
	want := progressLine(at.Ref, at.BytesDone, at.BytesTotal)

	second, err := c.Submit(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	// The second workload joins the download (and its progress event is
	// published) before berth run --wait subscribes: nothing is published
	// after, as no byte arrives.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		w, _, err := c.Get(ctx, second.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		if w.Pull != nil && w.Pull.BytesDone == at.BytesDone {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the second workload did not join the download: %+v", w)
		}
	}
	var runOut lockedBuffer
	stopRun := drawPullProgress(ctx, c, second.ID, "", &runOut)
	t.Cleanup(stopRun) // before the agent's server closes: it waits for the stream
	waitForText(t, &runOut, "berth run --wait", func(s string) bool { return strings.Contains(s, want) })

	var pullOut lockedBuffer
	stopPull := drawPullProgress(ctx, c, "", ref, &pullOut)
	t.Cleanup(stopPull)
	pulled := make(chan error, 1)
	go func() {
		_, err := c.PullImage(ctx, ref)
		pulled <- err
	}()
	waitForText(t, &pullOut, "berth image pull", func(s string) bool { return strings.Contains(s, want) })

	release()
	if err := <-pulled; err != nil {
		t.Fatalf("image pull: %v", err)
	}
	stopPull()
	stopRun()
	if !strings.HasSuffix(pullOut.String(), "\r\033[K") || !strings.HasSuffix(runOut.String(), "\r\033[K") {
		t.Errorf("the bars are not cleared at the end: %q, %q", pullOut.String(), runOut.String())
	}
}
