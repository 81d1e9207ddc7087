package image

import (
	"context"
	"encoding/base64"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// basicAuthRegistry is an in-memory registry that wants user:pass for
// everything but pushes made with it.
func basicAuthRegistry(t *testing.T, user, pass string) string {
	t.Helper()
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if r.Method == http.MethodGet && (!ok || u != user || p != pass) {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}`, http.StatusUnauthorized)
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// A registry that needs basic auth: refused without credentials (with the
// registry's reason), pulled with the operator's auth file and with a
// pull's own credentials; the secret is in no error.
func TestPullWithCredentials(t *testing.T) {
	const secret = "s3cret-Pa55"
	host := basicAuthRegistry(t, "puller", secret)
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := testimage.Push(context.Background(), host, "private/app:1", img)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	anon := newStore(t, t.TempDir(), insecure(host), WithAuthFile(filepath.Join(t.TempDir(), "none.json")))
	if _, err := anon.Pull(ctx, ref); err == nil {
		t.Fatal("pulled without credentials from a registry that wants them")
	}
	empty := filepath.Join(t.TempDir(), "config.json")
	os.WriteFile(empty, []byte(`{"auths":{}}`), 0o600)
	anon = newStore(t, t.TempDir(), insecure(host), WithAuthFile(empty))
	_, err = anon.Pull(ctx, ref)
	if err == nil || !strings.Contains(err.Error(), "401") || strings.Contains(err.Error(), secret) {
		t.Errorf("without credentials: %v, want the registry's 401", err)
	}

	authFile := filepath.Join(t.TempDir(), "config.json")
	cfg := `{"auths":{"` + host + `":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("puller:"+secret)) + `"}}}`
	if err := os.WriteFile(authFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	withFile := newStore(t, t.TempDir(), insecure(host), WithAuthFile(authFile))
	if _, err := withFile.Pull(ctx, ref); err != nil {
		t.Errorf("with the auth file: %v", err)
	}

	perPull := newStore(t, t.TempDir(), insecure(host), WithAuthFile(empty))
	if _, err := perPull.PullWith(ctx, ref, PullOptions{Auth: &Credentials{Username: "puller", Password: "wrong"}}); err == nil || strings.Contains(err.Error(), "wrong") {
		t.Errorf("with wrong credentials: %v", err)
	}
	if _, err := perPull.PullWith(ctx, ref, PullOptions{Auth: &Credentials{Username: "puller", Password: secret}}); err != nil {
		t.Errorf("with the pull's own credentials: %v", err)
	}
	if s := (Credentials{Password: secret}); strings.Contains(s.String(), secret) {
		t.Error("credentials print their password")
	}
}
