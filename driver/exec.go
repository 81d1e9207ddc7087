package driver

import (
	"context"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/errdefs"
)

// Execer is implemented by drivers that can start a further process in a
// running task (exec). Both of berth's drivers implement it: a container
// through `runc exec` with the container's own hardening, a VM through
// berth-init, which serves exec sessions over a host-to-guest channel.
//
// The agent relays a session to its client (one relay for every driver),
// checks who may exec and audits it; a driver only starts the process and
// carries its streams.
type Execer interface {
	// Exec starts cfg in the running task id. ctx bounds the start only:
	// the session lives until Close. An unknown task is errdefs.ErrNotFound;
	// a task that does not run is errdefs.ErrConflict; an invalid
	// ExecConfig (see CheckExecConfig), a workdir that does not exist in
	// the task or a command that cannot be started (not found, not
	// executable) is errdefs.ErrInvalidArgument, and nothing is left
	// behind. The conformance cases are in driver/drivertest.
	Exec(ctx context.Context, id string, cfg *ExecConfig) (ExecSession, error)
}

// Signaler is implemented by drivers that can deliver a signal to a task's
// main process (a container's init; inside a VM, berth-init forwards it to
// the workload's process).
type Signaler interface {
	// Signal delivers sig to task id's main process. An unknown task is
	// errdefs.ErrNotFound, a task that does not run errdefs.ErrConflict.
	Signal(ctx context.Context, id string, sig syscall.Signal) error
}

// ExecConfig is the process an exec session runs.
type ExecConfig struct {
	Args []string
	// Env is added to the task's own environment (KEY=VALUE; a key given
	// here wins).
	Env []string
	// Workdir is an absolute path in the task; empty means the task's.
	Workdir string
	// User is "uid[:gid]", resolved by the agent; empty means the task's.
	User string
	// Stdin: the session's Stdin is connected to the process.
	Stdin bool
	// TTY: the process runs on a terminal of its own (stdout and stderr
	// are the terminal's output, read from Stdout).
	TTY bool
	// Size is the terminal's initial size when TTY is set.
	Size TermSize
}

// TermSize is a terminal's size in characters.
type TermSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExecSession is one running exec'd process.
type ExecSession interface {
	// Stdin is the process's standard input, nil unless ExecConfig.Stdin.
	// Closing it gives the process end of file.
	Stdin() io.WriteCloser
	// Stdout is the process's standard output (with TTY, the terminal's
	// output). It ends (io.EOF) once the process ended and every byte it
	// wrote has been read.
	Stdout() io.Reader
	// Stderr is the process's standard error; nil with TTY.
	Stderr() io.Reader
	// Resize changes the terminal's size; without TTY it does nothing.
	Resize(TermSize) error
	// Signal delivers sig to the exec'd process.
	Signal(sig syscall.Signal) error
	// Wait blocks until the process ended and returns how: ExitCode, or
	// Signal with ExitCode 128+signal, as for a task. ctx bounds the wait.
	Wait(ctx context.Context) (*ExitResult, error)
	// Close kills the process if it still runs (and everything it
	// started in the session: its process group and session, short of
	// what detached itself with setsid) and releases what the session
	// holds. When it returns, none of those processes runs any more. It
	// is idempotent and safe after Wait; Wait after Close reports the
	// killed process's end.
	Close() error
}

// CheckExecConfig is the validation every driver applies to an exec
// before it starts anything: a command, an absolute workdir and a numeric
// user. Each failure is errdefs.ErrInvalidArgument.
func CheckExecConfig(cfg *ExecConfig) error {
	if cfg == nil || len(cfg.Args) == 0 || cfg.Args[0] == "" {
		return fmt.Errorf("exec needs a command: %w", errdefs.ErrInvalidArgument)
	}
	if cfg.Workdir != "" && !path.IsAbs(cfg.Workdir) {
		return fmt.Errorf("exec workdir %q is not an absolute path: %w", cfg.Workdir, errdefs.ErrInvalidArgument)
	}
	if cfg.User != "" {
		if _, _, err := ParseExecUser(cfg.User); err != nil {
			return err
		}
	}
	for _, kv := range cfg.Env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return fmt.Errorf("exec env %q is not KEY=VALUE: %w", kv, errdefs.ErrInvalidArgument)
		}
	}
	return nil
}

// ParseExecUser parses ExecConfig.User, "uid[:gid]" (gid 0 when absent):
// names were resolved by the agent, so a driver never sees one.
func ParseExecUser(user string) (uid, gid uint32, err error) {
	u, g, hasGID := strings.Cut(user, ":")
	uid64, err := strconv.ParseUint(u, 10, 32)
	if err != nil {
		return 0, 0, fmt.Errorf("exec user %q: want uid[:gid], numeric: %w", user, errdefs.ErrInvalidArgument)
	}
	var gid64 uint64
	if hasGID {
		if gid64, err = strconv.ParseUint(g, 10, 32); err != nil {
			return 0, 0, fmt.Errorf("exec user %q: want uid[:gid], numeric: %w", user, errdefs.ErrInvalidArgument)
		}
	}
	return uint32(uid64), uint32(gid64), nil
}

// SignalExit is the ExitResult of a process killed by sig, as a shell
// reports it (128+sig).
func SignalExit(sig syscall.Signal) *ExitResult {
	return &ExitResult{ExitCode: 128 + int(sig), Signal: int(sig)}
}

// MergeEnv returns base with extra's variables added, a key of extra
// replacing base's (each key once: a C program's getenv sees the first).
func MergeEnv(base, extra []string) []string {
	out := make([]string, 0, len(base)+len(extra))
	index := map[string]int{}
	for _, kv := range append(append([]string(nil), base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := index[k]; ok {
			out[i] = kv
			continue
		}
		index[k] = len(out)
		out = append(out, kv)
	}
	return out
}

// ParseSignal reads a signal name (HUP, SIGHUP, hup) or number (1-64).
func ParseSignal(s string) (syscall.Signal, error) {
	if s == "" {
		return 0, fmt.Errorf("no signal given: a name such as HUP or TERM, or a number: %w", errdefs.ErrInvalidArgument)
	}
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 64 {
			return 0, fmt.Errorf("signal number %d is not between 1 and 64: %w", n, errdefs.ErrInvalidArgument)
		}
		return syscall.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("%q is not a signal name (HUP, INT, TERM, KILL, USR1, ...) or number: %w", s, errdefs.ErrInvalidArgument)
}
