package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/berthd/berth/agent"
	"github.com/berthd/berth/api"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/image"
	"github.com/berthd/berth/internal/auth"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

// privateRegistry serves repositories under private/ to the users it
// knows (basic auth on GET: pushes go through) and those under public/
// to anyone.
func privateRegistry(t *testing.T, users map[string]string) string {
	t.Helper()
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v2/private/") {
			if u, p, ok := r.BasicAuth(); !ok || users[u] == "" || users[u] != p {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// The review's scenario: tenant b pulls a private image with its own
// credentials; tenant a neither lists it, nor runs it (never: image not
// found; if-not-present: the registry refuses the node's credentials),
// nor removes it, by ref or digest. Tenant a pulling it with its own valid
// credentials gets it; an anonymous pull of a public image and a pull with
// the node's credentials serve every tenant; operators see everything.
func TestPrivateImagesAreTheirTenants(t *testing.T) {
	users := map[string]string{"a": "pw-a", "b": "pw-b", "node": "pw-node"}
	host := privateRegistry(t, users)
	ctx := context.Background()
	base, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	variant := func(cmd string) v1.Image {
		img, err := mutate.Config(base, v1.Config{Cmd: []string{cmd}})
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	secretImg := variant("secret")
	secret, err := testimage.Push(ctx, host, "private/secret:1", secretImg)
	if err != nil {
		t.Fatal(err)
	}
	secretDigest, _ := secretImg.Digest()
	other, err := testimage.Push(ctx, host, "private/other:1", variant("other"))
	if err != nil {
		t.Fatal(err)
	}
	public, err := testimage.Push(ctx, host, "public/app:1", variant("app"))
	if err != nil {
		t.Fatal(err)
	}
	authFile := filepath.Join(t.TempDir(), "auth.json")
	if err := os.WriteFile(authFile, []byte(`{"auths":{}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	e := newAuthEnv(t, image.WithAuthFile(authFile), image.WithRegistries(image.Registries{Allowed: []string{"*"}, Insecure: []string{host}}))

	pull := func(caller, ref, user, tenant string) (int, string) {
		t.Helper()
		req := api.PullRequest{Ref: ref, Tenant: tenant}
		if user != "" {
			req.Auth = &api.RegistryAuth{Username: user, Password: users[user]}
		}
		body, _ := json.Marshal(req)
		return e.do(caller, "POST", "/v1/images/pull", string(body))
	}
	list := func(caller string) map[string]api.Image {
		t.Helper()
		code, body := e.do(caller, "GET", "/v1/images", "")
		if code != http.StatusOK {
			t.Fatalf("%s lists images: %d %s", caller, code, body)
		}
		var l api.ImageList
		if err := json.Unmarshal([]byte(body), &l); err != nil {
			t.Fatal(err)
		}
		out := map[string]api.Image{}
		for _, img := range l.Images {
			out[img.Ref] = img
		}
		return out
	}
	n := 0
	submit := func(caller, ref string, policy api.PullPolicy) (int, string) {
		t.Helper()
		n++
		body, _ := json.Marshal(api.WorkloadSpec{Name: "w" + string(rune('a'+n)), Image: ref, ImagePull: policy, Command: []string{"true"}})
		return e.do(caller, "POST", "/v1/workloads", string(body))
	}

	// Tenant b pulls with its credentials: private to b.
	code, body := pull("sub-b", secret, "b", "")
	if code != http.StatusOK {
		t.Fatalf("b pulls with its credentials: %d %s", code, body)
	}
	var got api.Image
	if err := json.Unmarshal([]byte(body), &got); err != nil || !got.Private || !slices.Equal(got.Tenants, []string{"b"}) {
		t.Fatalf("b's pull answers %s, want private to b", body)
	}
	if img, ok := list("sub-b")[secret]; !ok || !img.Private {
		t.Errorf("b does not list its private image: %v", list("sub-b"))
	}
	if img := list("operator")[secret]; !img.Private || !slices.Equal(img.Tenants, []string{"b"}) {
		t.Errorf("the operator lists %+v, want b's private image", img)
	}
	// Tenant a: absent from its list, by ref and by digest.
	code, body = e.do("sub-a", "GET", "/v1/images", "")
	if code != http.StatusOK || strings.Contains(body, "private/secret") || strings.Contains(body, secretDigest.String()) {
		t.Errorf("a lists b's private image: %d %s", code, body)
	}
	for _, ref := range []string{secret, secretDigest.String(), host + "/private/secret@" + secretDigest.String()} {
		code, body := submit("sub-a", ref, api.PullNever)
		if code != http.StatusBadRequest || !strings.Contains(body, api.ReasonImageNotFound) {
			t.Errorf("a submits %s with never: %d %s, want 400 image_not_found", ref, code, body)
		}
	}
	// if-not-present and always ask the registry, which refuses the node's
	// (no) credentials.
	for _, policy := range []api.PullPolicy{api.PullIfNotPresent, api.PullAlways} {
		code, body := submit("sub-a", secret, policy)
		if code != http.StatusFailedDependency || !strings.Contains(body, image.ReasonRegistryUnauthorized) {
			t.Errorf("a submits b's image with %s: %d %s, want 424 registry_unauthorized", policy, code, body)
		}
	}
	// Removal: a submitter may remove no image; and to the agent, b's image
	// is missing for a, by ref and by digest.
	if code, body := e.do("sub-a", "DELETE", "/v1/images?ref="+secret, ""); code != http.StatusForbidden {
		t.Errorf("a deletes b's image: %d %s, want 403", code, body)
	}
	actx := auth.NewContext(ctx, &auth.Identity{Name: "sub-a", Role: auth.RoleSubmitter, Tenants: []string{"a"}, Via: auth.ViaToken})
	for _, ref := range []string{secret, secretDigest.String()} {
		if err := e.agent.RemoveImage(actx, ref); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("the agent removes %s for a: %v, want not found", ref, err)
		}
	}
	if _, ok := list("operator")[secret]; !ok {
		t.Fatal("b's image is gone after a's removals")
	}

	// A pull with credentials is for one of the caller's tenants.
	if code, body := pull("sub-a", secret, "a", "b"); code != http.StatusForbidden {
		t.Errorf("a pulls for tenant b: %d %s, want 403", code, body)
	}
	if code, body := pull("sub-ab", secret, "a", ""); code != http.StatusBadRequest || !strings.Contains(body, `"tenant"`) {
		t.Errorf("a submitter of two tenants pulls with credentials for none: %d %s, want 400 naming tenant", code, body)
	}
	if code, body := pull("sub-a", secret, "", ""); code != http.StatusFailedDependency {
		t.Errorf("a pulls b's image without credentials: %d %s, want 424", code, body)
	}
	// Tenant a with its own valid credentials: both own it; each sees only
	// itself among the owners.
	if code, body := pull("sub-a", secret, "a", ""); code != http.StatusOK {
		t.Fatalf("a pulls with its credentials: %d %s", code, body)
	}
	if img := list("sub-a")[secret]; !img.Private || !slices.Equal(img.Tenants, []string{"a"}) {
		t.Errorf("a lists %+v, want private with tenants [a]", img)
	}
	if img := list("operator")[secret]; !slices.Equal(img.Tenants, []string{"a", "b"}) {
		t.Errorf("the operator lists %+v, want tenants a and b", img)
	}
	if code, body := submit("sub-a", secret, api.PullNever); code != http.StatusCreated {
		t.Errorf("a runs the image it pulled: %d %s", code, body)
	}

	// An anonymous pull of a public image is everyone's.
	if code, body := pull("sub-b", public, "", ""); code != http.StatusOK || strings.Contains(body, `"private"`) {
		t.Fatalf("b pulls a public image anonymously: %d %s", code, body)
	}
	if img, ok := list("sub-a")[public]; !ok || img.Private {
		t.Errorf("a lists %+v for the public image b pulled", img)
	}
	if code, body := submit("sub-a", public, api.PullNever); code != http.StatusCreated {
		t.Errorf("a runs the public image b pulled: %d %s", code, body)
	}

	// The node's credentials serve every tenant: with them a reaches the
	// image b pulled privately, and a node-wide pull makes it everyone's.
	if code, body := pull("sub-b", other, "b", ""); code != http.StatusOK {
		t.Fatalf("b pulls another private image: %d %s", code, body)
	}
	if code, body := submit("sub-a", other, api.PullIfNotPresent); code != http.StatusFailedDependency {
		t.Errorf("a submits b's other image without node credentials: %d %s, want 424", code, body)
	}
	nodeAuth := `{"auths":{"` + host + `":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("node:pw-node")) + `"}}}`
	if err := os.WriteFile(authFile, []byte(nodeAuth), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, body := submit("sub-a", other, api.PullIfNotPresent); code != http.StatusCreated {
		t.Errorf("a submits b's other image with node credentials in place: %d %s, want 201", code, body)
	}
	if _, ok := list("sub-a")[other]; ok {
		t.Error("a's submit made b's private image visible to a")
	}
	if code, body := pull("admin", other, "", ""); code != http.StatusOK || strings.Contains(body, `"private"`) {
		t.Fatalf("the admin pulls with the node's credentials: %d %s", code, body)
	}
	if img, ok := list("sub-a")[other]; !ok || img.Private {
		t.Errorf("after a node-wide pull a lists %+v, want the node's image", img)
	}
}

// A private image stays private across an agent restart: the owners are
// on disk (refs.json) before the pull is answered: while the first agent
// still runs (not closed, as a killed one never is; its state directory
// is its own), a second agent opens the image store and sees only what is
// on disk.
func TestPrivateImageOwnersSurviveARestart(t *testing.T) {
	host := privateRegistry(t, map[string]string{"b": "pw-b"})
	ctx := context.Background()
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	ref, err := testimage.Push(ctx, host, "private/secret:1", img)
	if err != nil {
		t.Fatal(err)
	}
	imgRoot := filepath.Join(t.TempDir(), "images")
	open := func() *agent.Agent {
		t.Helper()
		dir := t.TempDir()
		imgs, err := image.New(imgRoot, image.WithLogger(slog.New(slog.DiscardHandler)),
			image.WithRegistries(image.Registries{Allowed: []string{"*"}, Insecure: []string{host}}))
		if err != nil {
			t.Fatal(err)
		}
		a, err := agent.New(ctx, agent.Options{Capacity: &api.NodeResources{CPU: 8, MemoryMB: 8 << 10},
			DataDir: dir, Drivers: []driver.Driver{fake.New("container", fake.NewNode())}, Images: imgs,
			Defaults: agent.Defaults{CPU: 1, MemoryMB: 128, Pids: 256}, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	as := func(tenant string) context.Context {
		return auth.NewContext(ctx, &auth.Identity{Name: "sub-" + tenant, Role: auth.RoleSubmitter, Tenants: []string{tenant}, Via: auth.ViaToken})
	}
	first := open()
	t.Cleanup(func() { first.Close() })
	if _, err := first.PullImage(as("b"), api.PullRequest{Ref: ref, Tenant: "b", Auth: &api.RegistryAuth{Username: "b", Password: "pw-b"}}); err != nil {
		t.Fatal(err)
	}
	second := open()
	defer second.Close()
	if imgs := second.ListImages(as("a")); len(imgs) != 0 {
		t.Errorf("after a restart tenant a lists %+v", imgs)
	}
	if imgs := second.ListImages(as("b")); len(imgs) != 1 || !imgs[0].Private {
		t.Errorf("after a restart tenant b lists %+v, want its private image", imgs)
	}
	_, _, err = second.Submit(ctx, api.WorkloadSpec{Name: "w", Image: ref, ImagePull: api.PullNever, Command: []string{"true"}, Labels: map[string]string{"tenant": "a"}})
	if !errors.Is(err, errdefs.ErrImageNotFound) {
		t.Errorf("after a restart tenant a submits b's image with never: %v, want image not found", err)
	}
}
