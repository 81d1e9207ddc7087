package image

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/errdefs"
)

// Reasons of a registry's refusal. They are not berth's own 401 and 403:
// the client of the agent is authenticated; the node's credentials for the
// registry are not enough.
const (
	ReasonRegistryUnauthorized = "registry_unauthorized"
	ReasonRegistryForbidden    = "registry_forbidden"
)

// statusRegistryRefused is the HTTP status of a registry's refusal: the
// request failed because the request it depended on (to the registry)
// did, which is neither the client's credentials (401, 403) nor the
// agent's fault (5xx).
const statusRegistryRefused = http.StatusFailedDependency

// remoteRef parses a canonical reference for talking to its registry:
// registries listed in images.insecure_registries are reached over plain
// HTTP, every other one over HTTPS (see guard).
func (s *Store) remoteRef(canon string) (name.Reference, error) {
	r, err := parse(canon)
	if err != nil {
		return nil, err
	}
	if s.policy.isInsecure(r.Context().RegistryStr()) {
		return name.ParseReference(canon, name.Insecure)
	}
	return r, nil
}

// pullError is a failed pull as a client of the agent may read it: berth's
// own words with the registry's HTTP status and known error codes, never a
// byte of a response body (a registry on a service the submitter cannot
// reach otherwise must not become a way to read it). The full error is
// logged.
type pullError struct {
	msg     string
	classes []error // errdefs classes, and an *api.Problem for its own reason
}

func (e *pullError) Error() string   { return e.msg }
func (e *pullError) Unwrap() []error { return e.classes }

// remoteError gives a failed exchange with a registry its error class and
// a hint, in words that carry nothing the registry sent.
func (s *Store) remoteError(ctx context.Context, canon string, g *guard, err error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("pull %s: %w", canon, context.Cause(ctx))
	}
	if refusal := g.refused(); refusal != nil {
		return fmt.Errorf("pull %s: %w", canon, refusal)
	}
	s.logFailure(canon, err)
	if ggcrRefusal(err) {
		return fmt.Errorf("pull %s: %w", canon, &refusedError{msg: "the registry sent berth on to another host (a redirect or a token service) on a loopback, private or link-local address, or over plain HTTP; berth does not follow it"})
	}
	var terr *transport.Error
	if errors.As(err, &terr) {
		return registryAnswer(canon, terr)
	}
	// berth's own checks (a digest that does not match, a budget, the
	// floor, a full disk) speak for themselves.
	for _, class := range []error{errdefs.ErrInvalidArgument, errdefs.ErrResourceExhausted} {
		if errors.Is(err, class) {
			return fmt.Errorf("pull %s: %w", canon, err)
		}
	}
	var nerr net.Error
	if errors.As(err, &nerr) {
		return &pullError{
			msg:     fmt.Sprintf("pull %s: %v: cannot reach the registry: %s", canon, errdefs.ErrUnavailable, netCause(err)),
			classes: []error{errdefs.ErrUnavailable},
		}
	}
	var errno syscall.Errno
	var perr *fs.PathError
	if errors.As(err, &errno) || errors.As(err, &perr) {
		return fmt.Errorf("pull %s: %w", canon, err) // the node's own failure (paths and errno)
	}
	return &pullError{
		msg:     fmt.Sprintf("pull %s: %v: the registry sent content berth cannot use (the agent's log has the details)", canon, errdefs.ErrInvalidArgument),
		classes: []error{errdefs.ErrInvalidArgument},
	}
}

// logFailure records the whole error of a failed pull for the operator;
// what a registry sent is cut short.
func (s *Store) logFailure(canon string, err error) {
	msg := err.Error()
	if len(msg) > 512 {
		msg = msg[:512] + "..."
	}
	s.log.Warn("pull failed", "ref", canon, "err", msg)
}

// registryAnswer turns a registry's error answer into berth's error: the
// class by its error code first and its HTTP status second, the message
// from the status and the codes alone.
func registryAnswer(canon string, terr *transport.Error) error {
	answered := fmt.Sprintf("the registry answered %d %s", terr.StatusCode, http.StatusText(terr.StatusCode))
	if codes := knownCodes(terr); len(codes) > 0 {
		answered += " (" + strings.Join(codes, ", ") + ")"
	}
	class, hint := registryClass(terr)
	msg := fmt.Sprintf("pull %s: %s: %s", canon, answered, hint)
	e := &pullError{msg: msg}
	switch class {
	case errRegistryUnauthorized:
		e.classes = []error{
			&api.Problem{Status: statusRegistryRefused, Reason: ReasonRegistryUnauthorized, Title: "The registry wants credentials", Detail: msg},
			errdefs.ErrFailedPrecondition,
		}
	case errRegistryForbidden:
		e.classes = []error{
			&api.Problem{Status: statusRegistryRefused, Reason: ReasonRegistryForbidden, Title: "The registry denies access", Detail: msg},
			errdefs.ErrFailedPrecondition,
		}
	default:
		e.classes = []error{class}
	}
	return e
}

// Markers of a registry's 401 and 403 inside this package; callers see
// the reasons above and errdefs.ErrFailedPrecondition.
var (
	errRegistryUnauthorized = errors.New("registry unauthorized")
	errRegistryForbidden    = errors.New("registry forbidden")
)

// registryClass maps a registry's answer to a class and what to do about
// it, by its error code first and its HTTP status second.
func registryClass(terr *transport.Error) (error, string) {
	const (
		notFound = "the registry has no such image; check the name and tag"
		login    = "give berth the registry's credentials (images.auth_file, or the pull's own), or check that the repository is spelled right"
		denied   = "the registry denies this node's credentials access to the repository"
		later    = "the registry is rate limiting or failing; retry later"
		other    = "the registry refused the request; check the reference and the registry"
	)
	for _, d := range terr.Errors {
		switch d.Code {
		case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
			return errdefs.ErrNotFound, notFound
		case transport.UnauthorizedErrorCode:
			return errRegistryUnauthorized, login
		case transport.DeniedErrorCode:
			return errRegistryForbidden, denied
		case transport.TooManyRequestsErrorCode, transport.UnavailableErrorCode:
			return errdefs.ErrUnavailable, later
		}
	}
	switch {
	case terr.StatusCode == http.StatusNotFound:
		return errdefs.ErrNotFound, notFound
	case terr.StatusCode == http.StatusUnauthorized:
		return errRegistryUnauthorized, login
	case terr.StatusCode == http.StatusForbidden:
		return errRegistryForbidden, denied
	case terr.StatusCode == http.StatusTooManyRequests || terr.StatusCode >= 500:
		return errdefs.ErrUnavailable, later
	}
	return errdefs.ErrUnavailable, other
}

// registryCodes are the error codes of the distribution spec: the only
// text of a registry's answer that reaches a client, and only these.
var registryCodes = map[transport.ErrorCode]bool{
	transport.BlobUnknownErrorCode: true, transport.BlobUploadInvalidErrorCode: true, transport.BlobUploadUnknownErrorCode: true,
	transport.DigestInvalidErrorCode: true, transport.ManifestBlobUnknownErrorCode: true, transport.ManifestInvalidErrorCode: true,
	transport.ManifestUnknownErrorCode: true, transport.ManifestUnverifiedErrorCode: true, transport.NameInvalidErrorCode: true,
	transport.NameUnknownErrorCode: true, transport.SizeInvalidErrorCode: true, transport.TagInvalidErrorCode: true,
	transport.UnauthorizedErrorCode: true, transport.DeniedErrorCode: true, transport.UnsupportedErrorCode: true,
	transport.TooManyRequestsErrorCode: true, transport.UnknownErrorCode: true, transport.UnavailableErrorCode: true,
}

func knownCodes(terr *transport.Error) []string {
	var out []string
	for _, d := range terr.Errors {
		if registryCodes[d.Code] && len(out) < 4 {
			out = append(out, string(d.Code))
		}
	}
	return out
}

// netCause says why a connection failed, in berth's words: the host it
// tried and the kind of failure.
func netCause(err error) string {
	host := ""
	var uerr *url.Error
	if errors.As(err, &uerr) {
		if u, perr := url.Parse(uerr.URL); perr == nil {
			host = u.Host
		}
	}
	at := ""
	if host != "" {
		at = " (" + host + ")"
	}
	var dnsErr *net.DNSError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var certErr x509.CertificateInvalidError
	var recErr tls.RecordHeaderError
	var nerr net.Error
	switch {
	case errors.As(err, &dnsErr):
		return fmt.Sprintf("cannot resolve %s; check the registry's name", dnsErr.Name)
	case errors.Is(err, syscall.ECONNREFUSED):
		return "the connection was refused" + at + "; check the registry address and that it is up"
	case errors.Is(err, syscall.ECONNRESET):
		return "the connection was reset" + at + "; retry later"
	case errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH):
		return "no route to the registry" + at
	case errors.As(err, &unknownCA):
		return "its TLS certificate is signed by an authority this node does not trust" + at
	case errors.As(err, &hostErr):
		return "its TLS certificate is not valid for its name" + at
	case errors.As(err, &certErr):
		return "its TLS certificate is invalid or expired" + at
	case errors.As(err, &recErr) || strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		return "it does not speak HTTPS" + at + "; berth speaks plain HTTP only to registries listed in images.insecure_registries"
	case errors.As(err, &nerr) && nerr.Timeout():
		return "the connection timed out" + at
	}
	return "the connection failed" + at + "; check the registry address and that it is up (berth speaks HTTPS to every registry not listed in images.insecure_registries)"
}

// quoteShort quotes a string a registry sent (a media type), cut short.
func quoteShort(s string) string {
	if len(s) > 80 {
		s = s[:80] + "..."
	}
	return fmt.Sprintf("%q", s)
}

// ggcrRefusal recognizes go-containerregistry's own refusals to follow a
// registry elsewhere (literal private addresses in redirects and token
// realms, plain-HTTP realms of HTTPS registries), which it reports as
// plain errors.
func ggcrRefusal(err error) bool {
	msg := err.Error()
	return strings.Contains(msg, "SSRF protection:") || strings.Contains(msg, "is a private or link-local address") || strings.Contains(msg, "realm scheme")
}
