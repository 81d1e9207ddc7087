// Package testimage is the in-memory OCI registry tests pull from. It is
// for tests only: nothing that ships imports it (images themselves are
// built by internal/ociimage).
package testimage

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// StartRegistry serves an empty in-memory OCI registry on 127.0.0.1 for the
// duration of the test and returns its host:port. It speaks plain HTTP, so
// no TLS setup is needed, and berth reaches it only when the test lists the
// host:port it returns in images.insecure_registries (image.Registries).
func StartRegistry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// Push uploads img to host as repo (e.g. "test/busybox" or
// "test/busybox:1.0"; the tag defaults to latest) and returns the full
// reference it can be pulled by.
func Push(ctx context.Context, host, repo string, img v1.Image) (string, error) {
	ref, err := name.ParseReference(host+"/"+repo, name.Insecure)
	if err != nil {
		return "", fmt.Errorf("parse reference %s/%s: %w", host, repo, err)
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		return "", fmt.Errorf("push %s: %w", ref, err)
	}
	return ref.Name(), nil
}
