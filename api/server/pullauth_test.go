package server_test

import (
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// A pull's own credentials reach a registry that needs basic auth, and the
// password is in no log line (the agent's, the server's, the audit log's
// at debug), no event and no answer, whether the pull works or is refused.
func TestPullCredentialsAreNeverRecorded(t *testing.T) {
	const secret = "Zq9-very-secret-pa55"
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); r.Method == http.MethodGet && (!ok || u != "ci" || p != secret) {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}`, http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := testimage.Push(context.Background(), host, "private/app:1", img)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	var logs syncBuffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	authFile := filepath.Join(dir, "auth.json")
	os.WriteFile(authFile, []byte(`{"auths":{}}`), 0o600)
	imgs, err := image.New(filepath.Join(dir, "images"), image.WithLogger(logger), image.WithAuthFile(authFile),
		image.WithRegistries(image.Registries{Allowed: []string{"*"}, Insecure: []string{host}}))
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), agent.Options{Capacity: &api.NodeResources{CPU: 8, MemoryMB: 8 << 10},
		DataDir: dir, Drivers: []driver.Driver{fake.New("container", fake.NewNode())}, Images: imgs,
		Defaults: agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256}, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	hs := httptest.NewServer(server.New(a, server.Options{Logger: logger, Audit: logger}))
	defer hs.Close()
	c, err := client.New(hs.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := c.PullImageWith(ctx, api.PullRequest{Ref: ref, Auth: &api.RegistryAuth{Username: "ci", Password: secret + "-wrong"}}); err == nil || strings.Contains(err.Error(), secret) {
		t.Errorf("wrong credentials: %v", err)
	}
	got, err := c.PullImageWith(ctx, api.PullRequest{Ref: ref, Auth: &api.RegistryAuth{Username: "ci", Password: secret}})
	if err != nil {
		t.Fatalf("pull with its own credentials: %v", err)
	}
	if got.Digest == "" {
		t.Errorf("pulled image: %+v", got)
	}
	// The node keeps no credentials: a pull without them is refused.
	if _, err := a.PullImage(ctx, api.PullRequest{Ref: ref + "-other"}); err == nil {
		t.Error("a pull without credentials worked after one with them")
	}
	evctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	var events strings.Builder
	_ = a.Events(evctx, 0, api.EventFilter{}, func() {}, func(e api.Event) error {
		events.WriteString(e.Message)
		for k, v := range e.Attrs {
			events.WriteString(k + "=" + v)
		}
		return nil
	})
	if strings.Contains(logs.String(), secret) {
		t.Errorf("a log line holds the secret:\n%s", logs.String())
	}
	if !strings.Contains(logs.String(), "/v1/images/pull") {
		t.Errorf("the audit log does not show the pulls:\n%s", logs.String())
	}
	if strings.Contains(events.String(), secret) {
		t.Errorf("an event holds the secret: %s", events.String())
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "images", "refs.json")); bytes.Contains(data, []byte(secret)) {
		t.Error("the image index holds the secret")
	}
	if data, _ := os.ReadFile(filepath.Join(dir, "state.db")); bytes.Contains(data, []byte(secret)) {
		t.Error("the state database holds the secret")
	}
}
