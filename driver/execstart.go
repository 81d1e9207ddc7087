package driver

import "context"

type execStartKey struct{}

// WithExecStart returns ctx carrying fn, which the agent calls once an
// exec passed every check (state, policy, caps, user), just before the
// driver starts the process: the API writes its audit record there.
func WithExecStart(ctx context.Context, fn func()) context.Context {
	return context.WithValue(ctx, execStartKey{}, fn)
}

// ExecStarting calls the function WithExecStart put in ctx, if any.
func ExecStarting(ctx context.Context) {
	if fn, ok := ctx.Value(execStartKey{}).(func()); ok {
		fn()
	}
}
