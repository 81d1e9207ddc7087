package api

import (
	"fmt"
	"strings"
)

// Problem is an RFC 9457 problem details document, the body of every error
// response (media type application/problem+json). Reason is stable and
// machine readable: clients switch on it, never on Detail.
type Problem struct {
	Type     string       `json:"type"`
	Title    string       `json:"title"`
	Status   int          `json:"status"`
	Detail   string       `json:"detail,omitempty"`
	Instance string       `json:"instance,omitempty"`
	Reason   string       `json:"reason"`
	Fields   []FieldError `json:"fields,omitempty"`
	// State is the resource's state when it is what conflicts (409
	// conflict: exec into a workload that is not running).
	State string `json:"state,omitempty"`
}

// FieldError names one offending field of a request by its JSON path.
type FieldError struct {
	Field  string `json:"field"`
	Detail string `json:"detail"`
}

// ProblemMediaType is the Content-Type of problem documents.
const ProblemMediaType = "application/problem+json"

// ReasonImageNotFound (400): a workload names an image the node does not
// hold; pull or import it first. The problem's fields name "image".
const ReasonImageNotFound = "image_not_found"

// ProblemTypeBase prefixes the type URI of each reason.
const ProblemTypeBase = "https://berth.dev/problems/"

// Error makes a Problem usable as a Go error in clients.
func (p *Problem) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s (%d %s)", p.Title, p.Status, p.Reason)
	if p.Detail != "" {
		b.WriteString(": " + p.Detail)
	}
	for _, f := range p.Fields {
		b.WriteString("; " + f.Field + ": " + f.Detail)
	}
	return b.String()
}

// Stable reasons.
const (
	ReasonInvalidArgument    = "invalid_argument"
	ReasonMalformedBody      = "malformed_body"
	ReasonBodyTooLarge       = "body_too_large"
	ReasonUnsupportedMedia   = "unsupported_media_type"
	ReasonNotFound           = "not_found"
	ReasonRouteNotFound      = "route_not_found"
	ReasonMethodNotAllowed   = "method_not_allowed"
	ReasonAlreadyExists      = "already_exists"
	ReasonConflict           = "conflict"
	ReasonFailedPrecondition = "failed_precondition"
	ReasonResourceExhausted  = "resource_exhausted"
	ReasonTooManyRequests    = "too_many_requests"
	ReasonDenied             = "denied_by_policy"
	ReasonUnavailable        = "unavailable"
	ReasonNotImplemented     = "not_implemented"
	ReasonUnauthenticated    = "unauthenticated"
	ReasonPermissionDenied   = "permission_denied"
	ReasonTimeout            = "timeout"
	ReasonInternal           = "internal"
)
