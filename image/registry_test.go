package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/ociimage"
	"github.com/berthd/berth/internal/testimage"
)

func TestRegistryPatterns(t *testing.T) {
	for _, bad := range []string{"", "http://ghcr.io", "ghcr.io/org", "reg:0", "reg:99999", "reg:x", "a.*.com", "*x.com", "-bad.com", "two words"} {
		if err := ValidateRegistryPattern(bad); err == nil {
			t.Errorf("ValidateRegistryPattern(%q) accepted it", bad)
		}
	}
	for _, tc := range []struct {
		pattern string
		match   []string
		miss    []string
	}{
		{"*", []string{"ghcr.io", "reg.corp:5000", "10.0.0.1:5000", "[fd00::1]:5000"}, nil},
		{"ghcr.io", []string{"ghcr.io", "GHCR.io", "ghcr.io:443"}, []string{"evil-ghcr.io", "ghcr.io.evil.com"}},
		{"reg.corp:5000", []string{"reg.corp:5000"}, []string{"reg.corp", "reg.corp:5001"}},
		{"*.corp.example", []string{"a.corp.example", "a.b.corp.example:5000"}, []string{"corp.example", "acorp.example"}},
		{"10.0.0.0/8", []string{"10.1.2.3", "10.1.2.3:5000"}, []string{"11.0.0.1", "ten.example"}},
		{"127.0.0.1:5000", []string{"127.0.0.1:5000"}, []string{"127.0.0.1:5001", "localhost:5000"}},
		{"[::1]:5000", []string{"[::1]:5000"}, []string{"[::1]:5001"}},
		{"::1", []string{"[::1]:5000", "::1"}, nil},
		{"docker.io", []string{"index.docker.io", "docker.io"}, nil},
	} {
		p, err := parsePattern(tc.pattern)
		if err != nil {
			t.Errorf("parsePattern(%q): %v", tc.pattern, err)
			continue
		}
		for _, reg := range tc.match {
			if !matchAny([]pattern{p}, reg) {
				t.Errorf("%q does not match %q", tc.pattern, reg)
			}
		}
		for _, reg := range tc.miss {
			if matchAny([]pattern{p}, reg) {
				t.Errorf("%q matches %q", tc.pattern, reg)
			}
		}
	}
}

func TestSpecialAddresses(t *testing.T) {
	pol, err := newRegistryPolicy(Registries{
		Allowed:      []string{"*", "127.0.0.1:5000", "169.254.0.0/16", "named.local"},
		NodeNetworks: []netip.Prefix{netip.MustParsePrefix("10.88.0.0/16")},
	})
	if err != nil {
		t.Fatal(err)
	}
	pol.interfaceAddrs = func() ([]net.Addr, error) {
		return []net.Addr{&net.IPNet{IP: net.ParseIP("192.0.2.7"), Mask: net.CIDRMask(24, 32)}}, nil
	}
	g := newGuard(pol)
	for _, tc := range []struct {
		host, ip, port string
		refused        bool
	}{
		{"ghcr.io", "140.82.112.33", "443", false},
		{"evil.example", "127.0.0.1", "443", true},   // a name resolving to loopback
		{"evil.example", "127.0.0.1", "5000", false}, // the name counts as the address, which is listed
		{"127.0.0.1", "127.0.0.1", "5000", false},    // listed by address
		{"localhost", "::1", "5000", true},
		{"x", "::ffff:127.0.0.1", "443", true}, // IPv4-mapped loopback
		{"metadata", "169.254.169.254", "80", false},
		{"x", "fe80::1", "443", true},
		{"x", "0.0.0.0", "443", true},
		{"x", "224.0.0.1", "443", true},
		{"x", "192.0.2.7", "443", true},  // this node's address
		{"x", "192.0.2.8", "443", false}, // its neighbour
		{"x", "10.88.0.5", "8080", true}, // a workload
		{"named.local", "10.88.0.5", "8080", false},
		{"other.local", "10.88.0.5", "8080", true},
	} {
		err := g.checkAddr(tc.host, netip.MustParseAddr(tc.ip).Unmap(), tc.port)
		if (err != nil) != tc.refused {
			t.Errorf("checkAddr(%s -> %s:%s) = %v, want refused %v", tc.host, tc.ip, tc.port, err, tc.refused)
		}
		if err != nil && (!errors.Is(err, errdefs.ErrDenied) || !strings.Contains(err.Error(), "images.insecure_registries")) {
			t.Errorf("refusal %q: want ErrDenied naming the keys", err)
		}
	}
}

// server is an HTTP server on loopback counting its requests.
type server struct {
	*httptest.Server
	hits atomic.Int64
}

func (s *server) host() string { return strings.TrimPrefix(s.URL, "http://") }

func (s *server) port() string {
	_, port, _ := net.SplitHostPort(s.host())
	return port
}

func serve(t *testing.T, h http.Handler) *server {
	t.Helper()
	s := &server{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		h.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

// secret is what a service on the node's loopback answers: no byte of it
// may reach an error.
const secret = "TOP-SECRET-LOCAL-SERVICE-DATA"

func secretService(t *testing.T) *server {
	return serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"token":"%s","access_token":"%s","detail":"%s"}`, secret, secret, strings.Repeat(secret, 100))
	}))
}

// testRegistry is an in-memory registry holding a small image as
// test/img:latest, with h (when not nil) answering first.
func testRegistry(t *testing.T, h func(w http.ResponseWriter, r *http.Request) bool) *server {
	t.Helper()
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	var pushed atomic.Bool
	s := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if h != nil && pushed.Load() && h(w, r) {
			return
		}
		reg.ServeHTTP(w, r)
	}))
	img := mkImage(t, []ociimage.File{{Name: "hello", Body: "hi"}})
	if _, err := testimage.Push(context.Background(), s.host(), "test/img", img); err != nil {
		t.Fatal(err)
	}
	pushed.Store(true)
	s.hits.Store(0)
	return s
}

func noSecret(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		t.Fatal("the pull succeeded")
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("the error carries what the service answered: %v", err)
	}
	var p *api.Problem
	if errors.As(err, &p) && strings.Contains(p.Detail, secret) {
		t.Errorf("the problem carries what the service answered: %v", p.Detail)
	}
}

func TestPullRegistryPolicy(t *testing.T) {
	requireRoot(t)
	reg := testRegistry(t, nil)
	ref := reg.host() + "/test/img:latest"
	_, port, _ := net.SplitHostPort(reg.host())
	ctx := context.Background()

	for _, tc := range []struct {
		name string
		regs Registries
		ref  string
		key  string // the key the refusal names; "" for success
	}{
		{"default: loopback over HTTP is refused", DefaultRegistries, ref, "images.insecure_registries"},
		{"not in the allowed list", Registries{Allowed: []string{"ghcr.io"}}, ref, "images.allowed_registries"},
		{"nothing allowed", Registries{}, ref, "images.allowed_registries"},
		{"allowed over HTTPS only", Registries{Allowed: []string{reg.host()}}, ref, "images.insecure_registries"},
		// A wildcard never opens loopback, even for a name that resolves to it.
		{"wildcard insecure, name resolving to loopback", Registries{Insecure: []string{"*"}}, "localhost:" + port + "/test/img:latest", "images.insecure_registries"},
		{"wildcard insecure, loopback address", Registries{Insecure: []string{"*"}}, ref, "images.insecure_registries"},
		{"listed by address", Registries{Insecure: []string{reg.host()}}, ref, ""},
		{"listed by range", Registries{Insecure: []string{"127.0.0.0/8"}}, ref, ""},
		{"listed by exact name", Registries{Insecure: []string{"localhost:" + port}}, "localhost:" + port + "/test/img:latest", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStore(t, t.TempDir(), WithRegistries(tc.regs))
			reg.hits.Store(0)
			img, err := s.Pull(ctx, tc.ref)
			if tc.key == "" {
				if err != nil {
					t.Fatalf("Pull = %v", err)
				}
				t.Log("pulled", img.Ref)
				return
			}
			if err == nil {
				t.Fatal("Pull succeeded")
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.key) {
				t.Errorf("the refusal does not name %s: %v", tc.key, err)
			}
			if strings.HasPrefix(tc.name, "allowed over HTTPS") {
				// It spoke TLS to a plain-HTTP server and failed: unavailable.
				if !errors.Is(err, errdefs.ErrUnavailable) {
					t.Errorf("Pull = %v, want ErrUnavailable", err)
				}
				return
			}
			if !errors.Is(err, errdefs.ErrDenied) {
				t.Errorf("Pull = %v, want ErrDenied", err)
			}
			if n := reg.hits.Load(); n != 0 {
				t.Errorf("a refused pull sent %d requests to the registry", n)
			}
			if l := s.List(); len(l) != 0 {
				t.Errorf("a refused pull stored %+v", l)
			}
		})
	}
}

// TestPullSSRF: a registry the operator allows points berth elsewhere on
// the node (a redirect, a token realm); berth does not go, and nothing a
// service answers reaches the error.
func TestPullSSRF(t *testing.T) {
	requireRoot(t)
	local := secretService(t)
	for _, tc := range []struct {
		name string
		h    func(w http.ResponseWriter, r *http.Request) bool
	}{
		{"redirect to a loopback service", func(w http.ResponseWriter, r *http.Request) bool {
			if strings.Contains(r.URL.Path, "/blobs/") || strings.Contains(r.URL.Path, "/manifests/") {
				http.Redirect(w, r, local.URL+"/leak", http.StatusTemporaryRedirect)
				return true
			}
			return false
		}},
		{"redirect to a name of a loopback service", func(w http.ResponseWriter, r *http.Request) bool {
			if strings.Contains(r.URL.Path, "/blobs/") || strings.Contains(r.URL.Path, "/manifests/") {
				http.Redirect(w, r, "http://localhost:"+local.port()+"/leak", http.StatusTemporaryRedirect)
				return true
			}
			return false
		}},
		{"token realm on a loopback service", func(w http.ResponseWriter, r *http.Request) bool {
			if r.Header.Get("Authorization") == "" {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="x"`, local.URL))
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			return false
		}},
		{"token realm on a name of a loopback service", func(w http.ResponseWriter, r *http.Request) bool {
			if r.Header.Get("Authorization") == "" {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://localhost:%s/token",service="x"`, local.port()))
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			return false
		}},
		{"redirect to a link-local metadata address", func(w http.ResponseWriter, r *http.Request) bool {
			if strings.Contains(r.URL.Path, "/manifests/") {
				http.Redirect(w, r, "http://169.254.169.254/latest/meta-data/", http.StatusFound)
				return true
			}
			return false
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testRegistry(t, tc.h)
			local.hits.Store(0)
			s := newStore(t, t.TempDir(), insecure(reg.host()))
			_, err := s.Pull(context.Background(), reg.host()+"/test/img:latest")
			noSecret(t, err)
			t.Log(err)
			if !errors.Is(err, errdefs.ErrDenied) {
				t.Errorf("Pull = %v, want ErrDenied", err)
			}
			if n := local.hits.Load(); n != 0 {
				t.Errorf("berth sent %d requests to the loopback service", n)
			}
		})
	}
}

// TestPullErrorsCarryNoBody: whatever an allowed registry (or its token
// service) sends, the error a client reads carries berth's words, the
// status and known codes only, and a 401/403 keeps its own reasons.
func TestPullErrorsCarryNoBody(t *testing.T) {
	requireRoot(t)
	body := func(status int) func(w http.ResponseWriter, r *http.Request) bool {
		return func(w http.ResponseWriter, r *http.Request) bool {
			if strings.Contains(r.URL.Path, "/manifests/") {
				w.WriteHeader(status)
				io.WriteString(w, strings.Repeat(secret, 2000))
				return true
			}
			return false
		}
	}
	coded := func(status int, code string) func(w http.ResponseWriter, r *http.Request) bool {
		return func(w http.ResponseWriter, r *http.Request) bool {
			if strings.Contains(r.URL.Path, "/manifests/") {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(status)
				fmt.Fprintf(w, `{"errors":[{"code":%q,"message":%q,"detail":%q}]}`, code, secret, secret)
				return true
			}
			return false
		}
	}
	var tokenHost string
	tokenService := func(status int) func(w http.ResponseWriter, r *http.Request) bool {
		return func(w http.ResponseWriter, r *http.Request) bool {
			if r.URL.Path == "/token" {
				w.WriteHeader(status)
				io.WriteString(w, strings.Repeat(secret, 2000))
				return true
			}
			if r.Header.Get("Authorization") == "" {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="http://%s/token",service="x"`, tokenHost))
				w.WriteHeader(http.StatusUnauthorized)
				return true
			}
			return false
		}
	}
	for _, tc := range []struct {
		name   string
		h      func(w http.ResponseWriter, r *http.Request) bool
		class  error
		reason string
	}{
		{"401 with a body", body(http.StatusUnauthorized), errdefs.ErrFailedPrecondition, ReasonRegistryUnauthorized},
		{"403 with a body", body(http.StatusForbidden), errdefs.ErrFailedPrecondition, ReasonRegistryForbidden},
		{"UNAUTHORIZED code", coded(http.StatusUnauthorized, "UNAUTHORIZED"), errdefs.ErrFailedPrecondition, ReasonRegistryUnauthorized},
		{"DENIED code", coded(http.StatusForbidden, "DENIED"), errdefs.ErrFailedPrecondition, ReasonRegistryForbidden},
		{"token service 401", tokenService(http.StatusUnauthorized), errdefs.ErrFailedPrecondition, ReasonRegistryUnauthorized},
		{"token service 403", tokenService(http.StatusForbidden), errdefs.ErrFailedPrecondition, ReasonRegistryForbidden},
		{"token service 500", tokenService(http.StatusInternalServerError), errdefs.ErrUnavailable, ""},
		{"400 with a body", body(http.StatusBadRequest), errdefs.ErrUnavailable, ""},
		{"500 with a body", body(http.StatusInternalServerError), errdefs.ErrUnavailable, ""},
		{"404 with a code", coded(http.StatusNotFound, "MANIFEST_UNKNOWN"), errdefs.ErrNotFound, ""},
		{"200 with garbage", body(http.StatusOK), errdefs.ErrInvalidArgument, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := testRegistry(t, tc.h)
			tokenHost = reg.host()
			s := newStore(t, t.TempDir(), insecure(reg.host()))
			_, err := s.Pull(context.Background(), reg.host()+"/test/img:latest")
			noSecret(t, err)
			t.Log(err)
			if !errors.Is(err, tc.class) {
				t.Errorf("Pull = %v, want %v", err, tc.class)
			}
			// Never berth's own 401 and 403.
			if errors.Is(err, errdefs.ErrUnauthenticated) || errors.Is(err, errdefs.ErrPermissionDenied) {
				t.Errorf("Pull = %v: a registry's refusal became berth's own", err)
			}
			var p *api.Problem
			if tc.reason != "" {
				if !errors.As(err, &p) || p.Reason != tc.reason || p.Status == http.StatusUnauthorized || p.Status == http.StatusForbidden {
					t.Errorf("problem %+v, want reason %s and not a 401/403", p, tc.reason)
				}
			} else if errors.As(err, &p) {
				t.Errorf("problem %+v, want none", p)
			}
		})
	}
}
