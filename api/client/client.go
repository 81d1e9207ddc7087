// Package client is a Go client for berth's HTTP API, for the berth CLI,
// fleet controllers and integrations. Errors from the agent are returned as
// *api.Problem, so callers can switch on their Reason.
package client

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/berthd/berth/api"
)

// DefaultAddr is the agent's default listen address.
const DefaultAddr = "127.0.0.1:7470"

// IndexHeader carries the state index of a response.
const IndexHeader = "X-Berth-Index"

// Client talks to one berth agent.
type Client struct {
	base *url.URL
	http *http.Client
	// tr is the innermost transport, whose idle connections
	// CloseIdleConnections closes whatever wraps it.
	tr *http.Transport
}

// Option configures a client.
type Option func(*options)

type options struct {
	token string
	tls   *tls.Config
	wrap  func(http.RoundTripper) http.RoundTripper
}

// WithToken sends token as the bearer credential of every request.
func WithToken(token string) Option { return func(o *options) { o.token = token } }

// WithTLS talks TLS with cfg (its RootCAs for an agent with a private CA,
// its Certificates for a client certificate). A HOST:PORT address then
// means https://HOST:PORT.
func WithTLS(cfg *tls.Config) Option { return func(o *options) { o.tls = cfg } }

// WithRoundTripper wraps the client's transport (the innermost one, which
// sees requests as they go out, credentials included): for tracing, or for
// tests that check every exchange.
func WithRoundTripper(wrap func(http.RoundTripper) http.RoundTripper) Option {
	return func(o *options) { o.wrap = wrap }
}

// New returns a client for addr: "HOST:PORT", "http://HOST:PORT",
// "https://HOST:PORT" or "unix:///path/to/berth.sock".
func New(addr string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if addr == "" {
		addr = DefaultAddr
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if o.tls != nil {
		tr.TLSClientConfig = o.tls.Clone()
	}
	base := &url.URL{Scheme: "http"}
	switch {
	case strings.HasPrefix(addr, "unix://"):
		path := strings.TrimPrefix(addr, "unix://")
		if path == "" {
			return nil, fmt.Errorf("berth address %q has no socket path", addr)
		}
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		base.Host = "berth"
	case strings.HasPrefix(addr, "http://"), strings.HasPrefix(addr, "https://"):
		u, err := url.Parse(addr)
		if err != nil {
			return nil, fmt.Errorf("berth address %q: %w", addr, err)
		}
		base = u
	default:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return nil, fmt.Errorf("berth address %q: want HOST:PORT, http://HOST:PORT or unix:///PATH", addr)
		}
		base.Host = addr
		if o.tls != nil {
			base.Scheme = "https"
		}
	}
	var rt http.RoundTripper = tr
	if o.wrap != nil {
		rt = o.wrap(rt)
	}
	if o.token != "" {
		rt = &bearer{token: o.token, host: base.Host, next: rt}
	}
	return &Client{base: base, http: &http.Client{Transport: rt}, tr: tr}, nil
}

// bearer adds the token to every request to the agent, streams and
// blocking queries included, and to nothing else.
type bearer struct {
	token string
	host  string
	next  http.RoundTripper
}

func (b *bearer) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Host != b.host {
		return b.next.RoundTrip(req)
	}
	req = req.Clone(req.Context())
	req.Header.Set("Authorization", "Bearer "+b.token)
	return b.next.RoundTrip(req)
}

// url joins path, which is escaped (a workload reference goes through
// url.PathEscape, so TENANT/NAME is one segment, with %2F), to the base.
func (c *Client) url(path string, q url.Values) string {
	u := *c.base
	raw := strings.TrimSuffix(u.EscapedPath(), "/") + path
	if p, err := url.PathUnescape(raw); err == nil {
		u.Path, u.RawPath = p, raw
	} else {
		u.Path, u.RawPath = strings.TrimSuffix(u.Path, "/")+path, ""
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// do sends a request and decodes a 2xx JSON answer into out (unless nil).
// It returns the response's state index.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, body io.Reader, contentType string, out any) (uint64, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.url(path, q), body)
	if err != nil {
		return 0, err
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return 0, fmt.Errorf("berth agent at %s: %w", c.base.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return 0, decodeProblem(resp)
	}
	index, _ := strconv.ParseUint(resp.Header.Get(IndexHeader), 10, 64)
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return 0, fmt.Errorf("decode %s %s answer: %w", method, path, err)
		}
	}
	return index, nil
}

func decodeProblem(resp *http.Response) error {
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var p api.Problem
	if err := json.Unmarshal(data, &p); err != nil || p.Status == 0 {
		return &api.Problem{Status: resp.StatusCode, Reason: api.ReasonInternal, Title: resp.Status, Detail: strings.TrimSpace(string(data))}
	}
	return &p
}

func (c *Client) doJSON(ctx context.Context, method, path string, q url.Values, in, out any) (uint64, error) {
	var body io.Reader
	ct := ""
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return 0, err
		}
		body, ct = bytes.NewReader(data), "application/json"
	}
	return c.do(ctx, method, path, q, body, ct, out)
}

// IsReason reports whether err is a problem with the given reason.
func IsReason(err error, reason string) bool {
	var p *api.Problem
	return errors.As(err, &p) && p.Reason == reason
}

// Submit creates a workload (or returns the existing one of the same name
// and spec).
func (c *Client) Submit(ctx context.Context, spec api.WorkloadSpec) (*api.Workload, error) {
	var w api.Workload
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/workloads", nil, spec, &w)
	return &w, err
}

// QueryOptions make a read a blocking query: it returns once the state
// index passes WaitIndex, or after WaitTime.
type QueryOptions struct {
	WaitIndex uint64
	WaitTime  time.Duration
	// UntilEnded waits, up to WaitTime, for the workload's run to end
	// (GET /v1/workloads/{id}?until=ended); WaitIndex is not needed.
	UntilEnded bool
}

func (o *QueryOptions) values(q url.Values) url.Values {
	if q == nil {
		q = url.Values{}
	}
	if o != nil && o.UntilEnded {
		q.Set("until", "ended")
	}
	if o != nil && (o.WaitIndex > 0 || o.UntilEnded) {
		if o.WaitIndex > 0 {
			q.Set("index", strconv.FormatUint(o.WaitIndex, 10))
		}
		if o.WaitTime > 0 {
			q.Set("wait", o.WaitTime.String())
		}
	}
	return q
}

// Get returns a workload by id or name, and its modify index.
func (c *Client) Get(ctx context.Context, ref string, opts *QueryOptions) (*api.Workload, uint64, error) {
	var w api.Workload
	idx, err := c.doJSON(ctx, http.MethodGet, "/v1/workloads/"+url.PathEscape(ref), opts.values(nil), nil, &w)
	return &w, idx, err
}

// List returns the workloads that match f, and the state index.
func (c *Client) List(ctx context.Context, f api.ListFilter, opts *QueryOptions) ([]api.Workload, uint64, error) {
	q := url.Values{}
	if f.State != "" {
		q.Set("state", string(f.State))
	}
	if f.Isolation != "" {
		q.Set("isolation", string(f.Isolation))
	}
	for k, v := range f.Labels {
		if v == "" {
			q.Add("label", k)
		} else {
			q.Add("label", k+"="+v)
		}
	}
	var list api.WorkloadList
	idx, err := c.doJSON(ctx, http.MethodGet, "/v1/workloads", opts.values(q), nil, &list)
	return list.Workloads, idx, err
}

// Stop stops a workload and returns it once it has ended. A zero timeout
// uses the agent's default grace period. The stop goes on if ctx ends
// first: the agent owns it once asked.
func (c *Client) Stop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	q := url.Values{}
	if timeout > 0 {
		q.Set("timeout", timeout.String())
	}
	var w api.Workload
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(ref)+"/stop", q, nil, &w)
	return &w, err
}

// RequestStop asks for a stop and returns the workload (stopping) at once;
// the agent carries the stop out.
func (c *Client) RequestStop(ctx context.Context, ref string, timeout time.Duration) (*api.Workload, error) {
	q := url.Values{"wait": {"false"}}
	if timeout > 0 {
		q.Set("timeout", timeout.String())
	}
	var w api.Workload
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/workloads/"+url.PathEscape(ref)+"/stop", q, nil, &w)
	return &w, err
}

// Delete removes a workload and returns once it is gone; force kills it
// first if it still runs. The agent finishes a delete whose caller gave up
// waiting; meanwhile the workload reads as deleting.
func (c *Client) Delete(ctx context.Context, ref string, force bool) error {
	q := url.Values{}
	if force {
		q.Set("force", "true")
	}
	_, err := c.doJSON(ctx, http.MethodDelete, "/v1/workloads/"+url.PathEscape(ref), q, nil, nil)
	return err
}

// RequestDelete asks for a delete and returns the workload (deleting) at
// once; the agent carries the delete out.
func (c *Client) RequestDelete(ctx context.Context, ref string, force bool) (*api.Workload, error) {
	q := url.Values{"wait": {"false"}}
	if force {
		q.Set("force", "true")
	}
	var w api.Workload
	_, err := c.doJSON(ctx, http.MethodDelete, "/v1/workloads/"+url.PathEscape(ref), q, nil, &w)
	return &w, err
}

// Stats reads a running workload's resource usage.
func (c *Client) Stats(ctx context.Context, ref string) (*api.Stats, error) {
	var st api.Stats
	_, err := c.doJSON(ctx, http.MethodGet, "/v1/workloads/"+url.PathEscape(ref)+"/stats", nil, nil, &st)
	return &st, err
}

// Logs calls fn for each line of a workload's output until the output ends
// (or, with Follow, until the workload has ended) or ctx is done.
func (c *Client) Logs(ctx context.Context, ref string, opts api.LogOptions, fn func(api.LogLine) error) error {
	q := url.Values{"format": {"ndjson"}}
	if opts.Stream != "" {
		q.Set("stream", opts.Stream)
	}
	if opts.Tail >= 0 {
		q.Set("tail", strconv.Itoa(opts.Tail))
	}
	if opts.Follow {
		q.Set("follow", "true")
	}
	if !opts.Since.IsZero() {
		q.Set("since", opts.Since.UTC().Format(time.RFC3339Nano))
	}
	if opts.Timestamps {
		q.Set("timestamps", "true")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url("/v1/workloads/"+url.PathEscape(ref)+"/logs", q), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("berth agent at %s: %w", c.base.Host, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeProblem(resp)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l api.LogLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return fmt.Errorf("decode log line: %w", err)
		}
		if err := fn(l); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}

// Images lists the node's images.
func (c *Client) Images(ctx context.Context) ([]api.Image, error) {
	var list api.ImageList
	_, err := c.doJSON(ctx, http.MethodGet, "/v1/images", nil, nil, &list)
	return list.Images, err
}

// ImportImage uploads an OCI-layout or docker-archive tarball; ref tags a
// single-image archive that names none.
func (c *Client) ImportImage(ctx context.Context, archive io.Reader, ref string) ([]api.Image, error) {
	q := url.Values{}
	if ref != "" {
		q.Set("ref", ref)
	}
	var list api.ImageList
	_, err := c.do(ctx, http.MethodPost, "/v1/images", q, archive, "application/x-tar", &list)
	return list.Images, err
}

// PullImage makes the agent pull an image from its registry.
func (c *Client) PullImage(ctx context.Context, ref string) (*api.Image, error) {
	return c.PullImageWith(ctx, api.PullRequest{Ref: ref})
}

// PullImageWith is PullImage with the request's options (credentials).
func (c *Client) PullImageWith(ctx context.Context, req api.PullRequest) (*api.Image, error) {
	var img api.Image
	_, err := c.doJSON(ctx, http.MethodPost, "/v1/images/pull", nil, req, &img)
	return &img, err
}

// RemoveImage removes an image no workload uses.
func (c *Client) RemoveImage(ctx context.Context, ref string) error {
	_, err := c.doJSON(ctx, http.MethodDelete, "/v1/images", url.Values{"ref": {ref}}, nil, nil)
	return err
}

// Ready returns nil when the agent takes workloads.
func (c *Client) Ready(ctx context.Context) error {
	var h api.Health
	_, err := c.doJSON(ctx, http.MethodGet, "/readyz", nil, nil, &h)
	return err
}

// WaitExit blocks (with blocking queries, not busy polling) until the
// workload has ended and returns it.
func (c *Client) WaitExit(ctx context.Context, ref string) (*api.Workload, error) {
	var index uint64
	for {
		// until=ended answers once, at the end; an agent from before it
		// answers at once and then at each change past index.
		w, idx, err := c.Get(ctx, ref, &QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute, UntilEnded: true})
		if err != nil {
			return nil, err
		}
		if w.State.Terminal() {
			return w, nil
		}
		index = idx
	}
}
