package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/berthd/berth/api/client"
)

// newClient returns a berth client for addr. berth's Go client has no
// way to send a token, so with a token the driver talks to the agent
// through a private in-process proxy (a unix socket in a 0700 directory)
// that adds the bearer header. closer stops that proxy.
func newClient(addr, token string) (c *client.Client, closer func(), err error) {
	if addr == "" {
		addr = "unix:///run/berth/berth.sock"
	}
	if token == "" {
		c, err := client.New(addr)
		return c, func() {}, err
	}
	target, transport, err := upstream(addr)
	if err != nil {
		return nil, nil, err
	}
	dir, err := os.MkdirTemp("", "nomad-driver-berth-")
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		os.RemoveAll(dir)
		return nil, nil, err
	}
	proxy := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(target)
			r.Out.Host = target.Host
			r.Out.Header.Set("Authorization", "Bearer "+token)
		},
		Transport: transport,
		// Log and event streams: pass every write through at once.
		FlushInterval: -1,
	}
	srv := &http.Server{Handler: proxy}
	go srv.Serve(ln)
	c, err = client.New("unix://" + sock)
	if err != nil {
		srv.Close()
		os.RemoveAll(dir)
		return nil, nil, err
	}
	return c, func() { srv.Close(); os.RemoveAll(dir) }, nil
}

// upstream is the agent's base URL and a transport that reaches it.
func upstream(addr string) (*url.URL, http.RoundTripper, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	switch {
	case strings.HasPrefix(addr, "unix://"):
		path := strings.TrimPrefix(addr, "unix://")
		if path == "" {
			return nil, nil, errors.New("berth address has no socket path")
		}
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		return &url.URL{Scheme: "http", Host: "berth"}, tr, nil
	case strings.HasPrefix(addr, "http://"), strings.HasPrefix(addr, "https://"):
		u, err := url.Parse(addr)
		if err != nil {
			return nil, nil, fmt.Errorf("berth address %q: %w", addr, err)
		}
		return u, tr, nil
	default:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, nil, fmt.Errorf("berth address %q: want HOST:PORT, http://HOST:PORT or unix:///PATH", addr)
		}
		return &url.URL{Scheme: "http", Host: addr}, tr, nil
	}
}
