package image

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/berthd/berth/errdefs"
)

func TestRegistryClass(t *testing.T) {
	diag := func(code transport.ErrorCode) []transport.Diagnostic { return []transport.Diagnostic{{Code: code}} }
	for _, tc := range []struct {
		err  *transport.Error
		want error
	}{
		{&transport.Error{StatusCode: 404, Errors: diag(transport.ManifestUnknownErrorCode)}, errdefs.ErrNotFound},
		{&transport.Error{StatusCode: 404}, errdefs.ErrNotFound},
		{&transport.Error{StatusCode: 401, Errors: diag(transport.UnauthorizedErrorCode)}, errRegistryUnauthorized},
		{&transport.Error{StatusCode: 401}, errRegistryUnauthorized},
		{&transport.Error{StatusCode: 403}, errRegistryForbidden},
		{&transport.Error{StatusCode: 403, Errors: diag(transport.DeniedErrorCode)}, errRegistryForbidden},
		{&transport.Error{StatusCode: 429, Errors: diag(transport.TooManyRequestsErrorCode)}, errdefs.ErrUnavailable},
		{&transport.Error{StatusCode: 502}, errdefs.ErrUnavailable},
		// The code wins over a status that says otherwise.
		{&transport.Error{StatusCode: 400, Errors: diag(transport.NameUnknownErrorCode)}, errdefs.ErrNotFound},
		{&transport.Error{StatusCode: 400}, errdefs.ErrUnavailable},
	} {
		got, hint := registryClass(tc.err)
		if got != tc.want {
			t.Errorf("registryClass(%d %v) = %v, want %v", tc.err.StatusCode, tc.err.Errors, got, tc.want)
		}
		if got != nil && hint == "" {
			t.Errorf("registryClass(%d) gives no hint", tc.err.StatusCode)
		}
	}
}

func TestPullFailingRegistry(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "maintenance", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	s := newStore(t, t.TempDir(), insecure(host))
	_, err := s.Pull(context.Background(), host+"/a/b:c")
	if !errors.Is(err, errdefs.ErrUnavailable) {
		t.Fatalf("Pull(503 registry) = %v, want ErrUnavailable", err)
	}
}
