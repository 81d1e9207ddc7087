package driver

import (
	"context"
	"errors"
	"io"
)

// AttachReplayMax is the most of a task's earlier output an attach with
// Replay sends first: the start of a shell's session (its prompt) for a
// client that attaches right after the submit (`berth run -it`).
const AttachReplayMax = 64 << 10

// Attacher is implemented by drivers that connect a client to a running
// task's own standard streams (`berth attach`, `berth run -it`): the main
// process's terminal when the task was started with TaskConfig.TTY, its
// stdin pipe when with TaskConfig.Stdin, and its output as it is written.
// A container's monitor holds the terminal or pipe (it outlives the
// agent); inside a VM, berth-init does. Any number of sessions may be
// attached at once; each sees the output written while it is attached,
// and input from each goes to the process.
type Attacher interface {
	// Attach connects to task id. An unknown task is errdefs.ErrNotFound,
	// a task that does not run errdefs.ErrConflict, opts.Stdin on a task
	// started without TaskConfig.Stdin errdefs.ErrInvalidArgument. ctx
	// bounds the attach only: the session lives until Close or the end of
	// the task.
	Attach(ctx context.Context, id string, opts AttachOptions) (AttachSession, error)
}

// AttachOptions say what an attach session carries.
type AttachOptions struct {
	// Stdin: the session's Stdin writes to the task's standard input.
	Stdin bool
	// Replay: the session's output begins with what the task wrote before
	// the attach, up to AttachReplayMax bytes (the newest), each byte
	// once: nothing is lost or repeated between the replay and what
	// follows.
	Replay bool
	// Size, when set, resizes the task's terminal on attach.
	Size *TermSize
}

// AttachSession is one client attached to a task's streams. Ending the
// session (Close, or the client leaving) detaches: the task runs on.
type AttachSession interface {
	// Stdin writes to the task's standard input; nil unless
	// AttachOptions.Stdin. Closing it closes the task's standard input
	// (the process reads end of file), for every session: input that
	// ends, as in `echo x | berth run -i IMAGE cat`. Close of the session
	// alone leaves the task's input open.
	Stdin() io.WriteCloser
	// Stdout is the task's output from the attach on (with a terminal,
	// the terminal's output). It ends (io.EOF) when the task ended and
	// everything it wrote was read, or when the session is closed. A
	// session that does not keep up is ended rather than slow the task:
	// its Stdout then fails with ErrAttachSlow.
	Stdout() io.Reader
	// Stderr is the task's standard error; nil with a terminal.
	Stderr() io.Reader
	// Resize changes the terminal's size; without a terminal it does
	// nothing.
	Resize(TermSize) error
	// Close detaches. It is idempotent.
	Close() error
}

// ErrAttachSlow ends an attach session that fell too far behind the task's
// output: a stalled client never blocks the workload or its logs.
var ErrAttachSlow = errors.New("attach session fell behind the task's output and was detached")
