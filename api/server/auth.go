package server

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/auth"
)

// Authenticator maps credentials to identities (auth.Store is one).
type Authenticator interface {
	Lookup(token string) (*auth.Identity, bool)
	LookupCert(cert *x509.Certificate) (*auth.Identity, bool)
}

type ctxKey int

const (
	peerKey ctxKey = iota
	requestKey
)

// peer is what the connection says about the client before any request.
type peer struct {
	unix bool
	uid  int // -1 when unknown
}

// ConnContext records, for http.Server.ConnContext, who is at the other
// end of a unix socket (SO_PEERCRED), so a root peer can be trusted the
// way its access to the data directory already is.
func ConnContext(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	p := &peer{unix: true, uid: -1}
	if raw, err := uc.SyscallConn(); err == nil {
		_ = raw.Control(func(fd uintptr) {
			if cred, err := syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED); err == nil {
				p.uid = int(cred.Uid)
			}
		})
	}
	return context.WithValue(ctx, peerKey, p)
}

// request is the per-request state the guard shares with the handlers
// (through the scoped backend) and the audit record.
type request struct {
	id      *auth.Identity
	route   string
	backend Backend
	// Filled in by the scoped backend, for the audit log.
	workload  string
	tenant    string
	placement *api.Placement
	image     string
	exec      *execAudit // an exec session's command and end
	signal    string     // a signal sent to the workload
	attach    *api.AttachRequest
}

func requestState(r *http.Request) *request {
	st, _ := r.Context().Value(requestKey).(*request)
	return st
}

// be is the backend a handler uses: the agent as the caller may see it.
func (s *Server) be(r *http.Request) Backend {
	if st := requestState(r); st != nil && st.backend != nil {
		return st.backend
	}
	return s.b
}

// identify returns the caller's identity, or nil when it gave no valid
// credential. A bearer token, when present, decides alone: a wrong token
// is a failure even on a connection that would be trusted without one.
func (s *Server) identify(r *http.Request) *auth.Identity {
	if s.opts.Auth == nil {
		return auth.Anonymous
	}
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, token, ok := strings.Cut(h, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			return nil
		}
		id, ok := s.opts.Auth.Lookup(strings.TrimSpace(token))
		if !ok {
			return nil
		}
		return id
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		if id, ok := s.opts.Auth.LookupCert(r.TLS.VerifiedChains[0][0]); ok {
			return id
		}
	}
	if p, ok := r.Context().Value(peerKey).(*peer); ok && p.unix && p.uid == 0 && s.opts.TrustUnixRoot {
		return auth.UnixRoot
	}
	return nil
}

// guard authenticates and authorizes every request, sets its deadlines,
// scopes what it may see, and writes the audit record.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		path := r.URL.RawPath // as chi routes
		if path == "" {
			path = r.URL.Path
		}
		pattern := s.mux.Find(chi.NewRouteContext(), r.Method, path)
		if len(pattern) > 1 {
			pattern = strings.TrimSuffix(pattern, "/")
		}
		info := routeInfo{action: auth.ActUnknown}
		if known, ok := routeTable[r.Method+" "+pattern]; ok {
			info = known
		}
		id := s.identify(r)
		st := &request{id: id, route: pattern}
		if pattern == "" {
			// No such route: a caller with a valid identity learns that
			// (404 or 405); anyone else learns nothing.
			info = routeInfo{action: auth.ActPublic}
			if id == nil {
				info.action = auth.ActUnknown
			}
			st.route = "(none)"
		}
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		defer func() {
			if info.mutating || ww.Status() == http.StatusUnauthorized || ww.Status() == http.StatusForbidden {
				s.auditLog(r, st, ww.Status(), time.Since(start))
			}
		}()
		if s.opts.Auth == nil && info.action != auth.ActPublic && !fromUnix(r) && !loopbackHost(r.Host) {
			// Without tokens every caller is an admin, on loopback only. A
			// web page that points its own name at 127.0.0.1 (DNS
			// rebinding) is same-origin with what it reaches: its
			// requests say its name in Host, never a loopback one.
			writeProblem(ww, r, s.log, &api.Problem{Status: http.StatusForbidden, Reason: api.ReasonPermissionDenied, Title: "Not a loopback address",
				Detail: fmt.Sprintf("Host %q: without a tokens file the agent answers only requests addressed to localhost, 127.0.0.1 or ::1", r.Host)})
			return
		}
		if info.mutating && !sameOrigin(r) {
			// A web page of another origin (a browser sends Origin on
			// every cross-origin POST and WebSocket) must not act with the
			// browser's credentials or the loopback's trust.
			writeProblem(ww, r, s.log, &api.Problem{Status: http.StatusForbidden, Reason: api.ReasonPermissionDenied, Title: "Cross-origin request refused",
				Detail: fmt.Sprintf("Origin %q is not this agent (%s): the API takes requests that change something only from its own pages and from clients that are not browsers", r.Header.Get("Origin"), r.Host)})
			return
		}
		if info.mutating && r.Method != http.MethodGet && formMediaType(r) {
			// What an HTML form (or a no-cors fetch) sends: no route of
			// berth's takes it, and a cross-site form must not reach a
			// handler even where the body is optional.
			writeProblem(ww, r, s.log, &api.Problem{Status: http.StatusUnsupportedMediaType, Reason: api.ReasonUnsupportedMedia, Title: "Unsupported media type",
				Detail: fmt.Sprintf("Content-Type %q: send JSON bodies as application/json, or no body", r.Header.Get("Content-Type"))})
			return
		}
		if !auth.Authorize(id, info.action) {
			if id == nil {
				ww.Header().Set("WWW-Authenticate", `Bearer realm="berth"`)
				writeProblem(ww, r, s.log, &api.Problem{Status: http.StatusUnauthorized, Reason: api.ReasonUnauthenticated, Title: "Authentication required",
					Detail: "send a valid token as Authorization: Bearer TOKEN (berth --token or BERTH_TOKEN), or a client certificate the agent maps to a role"})
				return
			}
			writeProblem(ww, r, s.log, &api.Problem{Status: http.StatusForbidden, Reason: api.ReasonPermissionDenied, Title: "Permission denied",
				Detail: "role " + string(id.Role) + " may not " + string(info.action) + " (" + r.Method + " " + r.URL.Path + ")"})
			return
		}
		if id != nil {
			st.backend = &scoped{Backend: s.b, id: id, st: st}
		}
		out := s.setDeadlines(ww, r, info.class)
		ctx := context.WithValue(r.Context(), requestKey, st)
		if id != nil {
			ctx = auth.NewContext(ctx, id)
		}
		next.ServeHTTP(out, r.WithContext(ctx))
	})
}

// auditLog writes one record of a mutating request or an auth failure. It
// names the identity by its tokens-file entry, never by its credential.
func (s *Server) auditLog(r *http.Request, st *request, status int, took time.Duration) {
	if s.opts.Audit == nil {
		return
	}
	attrs := append(requestAttrs(r, st), slog.Int("status", status), slog.Duration("duration", took))
	attrs = st.auditAttrs(attrs)
	msg := "api request"
	if status == http.StatusUnauthorized || status == http.StatusForbidden {
		msg = "api request refused"
	}
	s.opts.Audit.LogAttrs(context.Background(), slog.LevelInfo, msg, attrs...)
}

// auditExecStart writes the record of an exec session about to start:
// who runs what in which workload, before the process exists (the
// request's own record follows at its end, with the exit code).
func (s *Server) auditExecStart(r *http.Request, st *request) {
	s.auditStart(r, st, "exec started")
}

// auditStart writes the record of a session (exec, attach) about to
// start.
func (s *Server) auditStart(r *http.Request, st *request, msg string) {
	if s.opts.Audit == nil || st == nil {
		return
	}
	attrs := requestAttrs(r, st)
	if st.workload == "" {
		attrs = append(attrs, slog.String("workload", refParam(r)))
	}
	s.opts.Audit.LogAttrs(context.Background(), slog.LevelInfo, msg, st.auditAttrs(attrs)...)
}

// requestAttrs are what every audit record says of its request.
func requestAttrs(r *http.Request, st *request) []slog.Attr {
	return []slog.Attr{
		slog.Bool("audit", true),
		slog.String("method", r.Method),
		slog.String("route", st.route),
		slog.String("path", r.URL.Path),
		slog.String("remote", r.RemoteAddr),
	}
}

// auditAttrs appends what the request is known to have done, and by
// whom, to attrs.
func (st *request) auditAttrs(attrs []slog.Attr) []slog.Attr {
	if st.id != nil {
		attrs = append(attrs, slog.String("identity", st.id.Name), slog.String("via", string(st.id.Via)), slog.String("role", string(st.id.Role)))
		if len(st.id.Tenants) > 0 {
			attrs = append(attrs, slog.String("identity_tenants", strings.Join(st.id.Tenants, ",")))
		}
	} else {
		attrs = append(attrs, slog.String("identity", ""), slog.String("via", "none"))
	}
	if st.tenant != "" {
		attrs = append(attrs, slog.String("tenant", st.tenant))
	}
	if st.workload != "" {
		attrs = append(attrs, slog.String("workload", st.workload))
	}
	if st.image != "" {
		attrs = append(attrs, slog.String("image", st.image))
	}
	if p := st.placement; p != nil {
		attrs = append(attrs, slog.String("isolation", string(p.Isolation)), slog.Bool("denied", p.Denied),
			slog.String("deciding_rule", p.DecidingRule), slog.String("policy_version", p.PolicyVersion))
	}
	if e := st.exec; e != nil {
		attrs = append(attrs, slog.Any("command", e.command), slog.Bool("tty", e.tty))
		if e.user != "" {
			attrs = append(attrs, slog.String("user", e.user))
		}
		if e.exitCode != nil {
			attrs = append(attrs, slog.Int("exit_code", *e.exitCode))
		}
	}
	if st.signal != "" {
		attrs = append(attrs, slog.String("signal", st.signal))
	}
	if st.attach != nil {
		attrs = append(attrs, slog.Bool("attach_stdin", st.attach.Stdin))
	}
	return attrs
}

// sameOrigin reports whether r carries no Origin (not a browser's
// cross-origin request) or one whose host is the Host the request was
// sent to.
func sameOrigin(r *http.Request) bool {
	origins := r.Header.Values("Origin")
	if len(origins) == 0 {
		return true
	}
	origin := origins[0]
	if len(origins) > 1 {
		return false
	}
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return false // includes "null" (a sandboxed or file page)
	}
	return strings.EqualFold(u.Host, r.Host)
}

// formMediaType reports whether r's body is of a type a browser sends
// cross-site without asking (CORS's safelisted request types).
func formMediaType(r *http.Request) bool {
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		return false
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false // the route's own check refuses it
	}
	switch mt {
	case "application/x-www-form-urlencoded", "multipart/form-data", "text/plain":
		return true
	}
	return false
}

func fromUnix(r *http.Request) bool {
	p, ok := r.Context().Value(peerKey).(*peer)
	return ok && p.unix
}

// loopbackHost reports whether a Host header names this machine's
// loopback: localhost or a loopback address, with any port.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
