// Package errdefs defines the small set of error classes berth uses across
// packages. Callers wrap a class with fmt.Errorf("...: %w", errdefs.ErrNotFound)
// and check it with errors.Is; the HTTP layer maps each class to one status in
// one place (api/server/problem.go).
package errdefs

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrInvalidArgument: the request itself is wrong; retrying it unchanged fails again.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotFound: the named object does not exist (or the caller may not see it).
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: an object with that identity exists with different content.
	ErrAlreadyExists = errors.New("already exists")
	// ErrFailedPrecondition: the object is in a state that does not allow the operation.
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrConflict: the operation collides with another one (a name, a port).
	ErrConflict = errors.New("conflict")
	// ErrResourceExhausted: the node has no room for the request.
	ErrResourceExhausted = errors.New("resource exhausted")
	// ErrTooManyRequests: a cap on what may be open at once (exec
	// sessions) is reached; retry once some end.
	ErrTooManyRequests = errors.New("too many at once")
	// ErrDenied: policy forbids the request.
	ErrDenied = errors.New("denied by policy")
	// ErrUnavailable: a dependency (driver, registry) cannot serve right now; retry later.
	ErrUnavailable = errors.New("unavailable")
	// ErrNotImplemented: the feature is not available on this node or build.
	ErrNotImplemented = errors.New("not implemented")
	// ErrUnauthenticated: no or bad credentials.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: credentials are fine but do not allow the operation.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrCordoned: the node takes no new workloads (an operator cordoned
	// or is draining it); submit elsewhere or later. It is an
	// ErrUnavailable too.
	ErrCordoned = fmt.Errorf("node cordoned: %w", ErrUnavailable)
	// ErrImageNotFound: a workload names an image the node does not hold
	// (pull or import it first). It is an ErrInvalidArgument too.
	ErrImageNotFound = fmt.Errorf("image not on this node: %w", ErrInvalidArgument)
)

// FieldError names one offending field of an invalid request, as a JSON path
// such as "resources.memory_mb" or "labels[\"a b\"]".
type FieldError struct {
	Field  string `json:"field"`
	Detail string `json:"detail"`
}

func (e FieldError) Error() string { return e.Field + ": " + e.Detail }

// ValidationError collects every FieldError of a request so a client can fix
// them all at once. It is an ErrInvalidArgument.
type ValidationError struct {
	Fields []FieldError
	// Class, when set, is a narrower class than ErrInvalidArgument that
	// wraps it (ErrImageNotFound): clients get its own reason.
	Class error
}

// Add records a field problem.
func (v *ValidationError) Add(field, format string, args ...any) {
	v.Fields = append(v.Fields, FieldError{Field: field, Detail: fmt.Sprintf(format, args...)})
}

// Err returns nil when nothing was recorded, so callers can `return v.Err()`.
func (v *ValidationError) Err() error {
	if v == nil || len(v.Fields) == 0 {
		return nil
	}
	return v
}

func (v *ValidationError) Error() string {
	parts := make([]string, len(v.Fields))
	for i, f := range v.Fields {
		parts[i] = f.Error()
	}
	return "invalid request: " + strings.Join(parts, "; ")
}

func (v *ValidationError) Unwrap() error {
	if v.Class != nil {
		return v.Class
	}
	return ErrInvalidArgument
}

// Invalid returns an ErrInvalidArgument naming a single field.
func Invalid(field, format string, args ...any) error {
	v := &ValidationError{}
	v.Add(field, format, args...)
	return v
}

// StateError is an ErrConflict about a resource's state: the operation
// needs another one. State is named in the problem document (state).
type StateError struct {
	State string
	Msg   string
}

func (e *StateError) Error() string { return e.Msg }

// Unwrap makes a StateError an ErrConflict.
func (e *StateError) Unwrap() error { return ErrConflict }
