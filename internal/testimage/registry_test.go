package testimage

import (
	"context"
	"testing"

	"github.com/berthd/berth/internal/ociimage"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

func TestRegistryPush(t *testing.T) {
	img := busyboxImage(t)
	host := StartRegistry(t)
	ref, err := Push(context.Background(), host, "test/busybox", img)
	if err != nil {
		t.Fatal(err)
	}
	if ref != host+"/test/busybox:latest" {
		t.Errorf("ref = %s", ref)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	got, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if d, _ := got.Digest(); d != want {
		t.Fatalf("pulled %s, pushed %s", d, want)
	}
}

func busyboxImage(t *testing.T) v1.Image {
	t.Helper()
	img, err := ociimage.Busybox()
	if err != nil {
		t.Fatal(err)
	}
	return img
}
