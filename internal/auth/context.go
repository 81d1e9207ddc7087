package auth

import "context"

type identityKey struct{}

// NewContext returns ctx carrying id, the caller of a request.
func NewContext(ctx context.Context, id *Identity) context.Context {
	return context.WithValue(ctx, identityKey{}, id)
}

// FromContext returns the caller NewContext put in ctx, or nil: a call
// from within the node (the agent itself, its tests).
func FromContext(ctx context.Context) *Identity {
	id, _ := ctx.Value(identityKey{}).(*Identity)
	return id
}
