package daemon_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// An agent SIGKILLed while a submitted workload's image downloads (the
// submit acknowledged, the layers held back by the registry) loses
// nothing: the restarted agent downloads the image again and runs the
// workload to its exit code.
func TestAgentSIGKILLDuringImagePull(t *testing.T) {
	requireRunc(t)
	var mu sync.Mutex
	hold := true
	release := make(chan struct{})
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	heldBlobs := map[string]bool{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Layers (not the config: the submit reads that) wait while held.
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			mu.Lock()
			held := hold && heldBlobs[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]
			mu.Unlock()
			if held {
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
			}
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := testimage.Push(context.Background(), host, "test/pulled:1", img)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	mu.Lock()
	for _, l := range layers {
		d, _ := l.Digest()
		heldBlobs[d.String()] = true
	}
	mu.Unlock()

	dataDir := t.TempDir()
	addr := freeAddr(t)
	cfgFile := filepath.Join(t.TempDir(), "berth.yaml")
	cfg := fmt.Sprintf("listen: %s\ndata_dir: %s\nvm:\n  enabled: false\nnetwork:\n  enabled: false\nworkload_defaults:\n  stop_timeout: 2s\nimages:\n  insecure_registries: [%q]\n", addr, dataDir, host)
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	p := &agentProcess{t: t, config: cfgFile}
	c := p.start(addr)
	t.Cleanup(func() {
		deleteAll(t, c)
		p.kill()
	})
	ctx := context.Background()
	w, err := c.Submit(ctx, api.WorkloadSpec{Image: ref, Command: []string{"sh", "-c", "echo pulled and ran; exit 4"}})
	if err != nil {
		t.Fatal(err)
	}
	// The download has begun (a layer is asked for) when the agent dies.
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, _, err := c.Get(ctx, w.ID, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got.State != api.StatePending {
			t.Fatalf("while its layers are held back: %s", got.State)
		}
		if got.Pull != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the download never began")
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.kill()
	mu.Lock()
	hold = false
	mu.Unlock()
	close(release)

	c = p.start(addr)
	end, err := c.WaitExit(ctx, w.ID)
	if err != nil {
		t.Fatal(err)
	}
	if end.State != api.StateExited || exitCode(end) != 4 {
		t.Fatalf("after the restart: %s exit %d %q, want exited 4", end.State, exitCode(end), end.Error)
	}
	if out, _ := logs(t, c, w.ID); !strings.Contains(out, "pulled and ran") {
		t.Errorf("output %q", out)
	}
}
