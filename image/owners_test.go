package image

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/testimage"
)

// A private pull's image is its owners' alone, by ref and by digest, for
// get, list and remove; a second tenant's private pull adds it to the
// owners; a node-wide pull makes it the node's; refs.json keeps the owners
// across a restart.
func TestPrivateImageOwners(t *testing.T) {
	requireRoot(t)
	img := busybox(t)
	host := testimage.StartRegistry(t)
	ctx := context.Background()
	ref, err := testimage.Push(ctx, host, "b/secret:1", img)
	if err != nil {
		t.Fatal(err)
	}
	digest := digestOf(t, img)
	root := filepath.Join(t.TempDir(), "images")
	s := newStore(t, root, insecure(host))
	got, err := s.PullWith(ctx, ref, PullOptions{Owners: []string{"b"}})
	if err != nil {
		t.Fatal(err)
	}
	if !got.Private() || !slices.Equal(got.Owners, []string{"b"}) {
		t.Fatalf("pulled for b: owners %q", got.Owners)
	}
	a, b := TenantViewer("a"), TenantViewer("b")
	for _, name := range []string{ref, digest, refRepository(ref) + "@" + digest} {
		if _, err := s.GetAs(a, name); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("tenant a gets %s: %v, want not found", name, err)
		}
		if _, err := s.GetAs(b, name); err != nil {
			t.Errorf("tenant b gets %s: %v", name, err)
		}
		if _, err := s.GetAs(TenantViewer(""), name); !errors.Is(err, errdefs.ErrNotFound) {
			t.Errorf("the node's namespace gets %s: %v, want not found", name, err)
		}
		if _, err := s.Get(name); err != nil {
			t.Errorf("the node gets %s: %v", name, err)
		}
	}
	if n := len(s.ListAs(a)); n != 0 {
		t.Errorf("tenant a lists %d images", n)
	}
	if n := len(s.ListAs(b)); n != 1 {
		t.Errorf("tenant b lists %d images", n)
	}
	if err := s.RemoveAs(a, ref); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("tenant a removes b's image: %v", err)
	}
	if err := s.RemoveAs(a, digest); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("tenant a removes b's image by digest: %v", err)
	}
	if _, err := s.Get(ref); err != nil {
		t.Fatalf("b's image after a's removals: %v", err)
	}

	// Tenant a pulls it too: both own it, and a restart keeps that.
	if _, err := s.PullWith(ctx, ref, PullOptions{Owners: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	s = newStore(t, root, insecure(host))
	if got, err := s.GetAs(a, ref); err != nil || !slices.Equal(got.Owners, []string{"a", "b"}) {
		t.Fatalf("after a's pull and a restart: %+v %v, want owners a and b", got, err)
	}
	if _, err := s.GetAs(TenantViewer("c"), ref); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("tenant c gets it: %v", err)
	}
	// A node-wide pull makes it the node's, and a later private pull does
	// not take it back.
	if _, err := s.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PullWith(ctx, ref, PullOptions{Owners: []string{"b"}}); err != nil {
		t.Fatal(err)
	}
	s = newStore(t, root, insecure(host))
	if got, err := s.GetAs(TenantViewer("c"), ref); err != nil || got.Private() {
		t.Errorf("after a node-wide pull and a restart: %+v %v, want the node's", got, err)
	}
}

// Two tenants pulling the same image privately at once both own it: the
// owners merge under the store's lock, neither pull's commit loses the
// other's.
func TestConcurrentPrivatePullsMergeOwners(t *testing.T) {
	requireRoot(t)
	img := busybox(t)
	host := testimage.StartRegistry(t)
	ctx := context.Background()
	ref, err := testimage.Push(ctx, host, "shared/app:1", img)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(t.TempDir(), "images")
	s := newStore(t, root, insecure(host))
	tenants := []string{"a", "b", "c", "d"}
	errs := make(chan error, len(tenants))
	for _, tenant := range tenants {
		go func() {
			_, err := s.PullWith(ctx, ref, PullOptions{Owners: []string{tenant}})
			errs <- err
		}()
	}
	for range tenants {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	s = newStore(t, root, insecure(host))
	if got, err := s.Get(ref); err != nil || !slices.Equal(got.Owners, tenants) {
		t.Fatalf("after concurrent private pulls and a restart: %+v %v, want owners %v", got, err, tenants)
	}
}
