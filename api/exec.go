package api

// ExecRequest is the body of POST /v1/workloads/{id}/exec: a further
// process started in the running workload (see docs/exec.md).
type ExecRequest struct {
	// Command is the program and its arguments (required).
	Command []string `json:"command"`
	// Env is added to the workload's environment for this process.
	Env map[string]string `json:"env,omitempty"`
	// Workdir is an absolute path in the workload; default its own.
	Workdir string `json:"workdir,omitempty"`
	// User is a name or uid (optionally :group or :gid), resolved
	// against the workload's image; default the workload's user.
	User string `json:"user,omitempty"`
	// Stdin connects the session's input to the process (WebSocket
	// form); the simple form feeds it Input instead.
	Stdin bool `json:"stdin,omitempty"`
	// TTY runs the process on a terminal (WebSocket form only).
	TTY bool `json:"tty,omitempty"`
	// Size is the terminal's initial size.
	Size *TermSize `json:"size,omitempty"`
	// Input is the simple form's standard input, closed after it.
	Input string `json:"input,omitempty"`
	// TimeoutSeconds bounds the simple form: the process is killed when
	// it runs longer (default and maximum in docs/exec.md).
	TimeoutSeconds int `json:"timeout_seconds,omitempty"`
}

// TermSize is a terminal's size in characters.
type TermSize struct {
	Rows uint16 `json:"rows"`
	Cols uint16 `json:"cols"`
}

// ExecResult is the simple form's answer.
type ExecResult struct {
	ExitCode int `json:"exit_code"`
	// Signal is the signal that killed the process, if one did.
	Signal int    `json:"signal,omitempty"`
	Stdout string `json:"stdout"`
	Stderr string `json:"stderr"`
	// StdoutTruncated and StderrTruncated say output past the cap was
	// dropped (the process still ran to its end).
	StdoutTruncated bool `json:"stdout_truncated,omitempty"`
	StderrTruncated bool `json:"stderr_truncated,omitempty"`
	// TimedOut says the process was killed at the timeout.
	TimedOut bool `json:"timed_out,omitempty"`
}

// SignalRequest is the body of POST /v1/workloads/{id}/signal.
type SignalRequest struct {
	// Signal is a name (HUP, SIGHUP) or a number (1).
	Signal string `json:"signal"`
}

// ExecSubprotocol is the WebSocket subprotocol of exec sessions
// (docs/exec.md): binary messages carry a stream byte and data, text
// messages carry control messages.
const ExecSubprotocol = "berth.exec.v1"

// Streams of the exec protocol: the first byte of a binary message.
const (
	StreamStdin  byte = 0
	StreamStdout byte = 1
	StreamStderr byte = 2
)

// ExecControl is a text message of the exec protocol. The client sends
// resize (rows, cols), signal (signal) and stdin_close; the agent ends the
// session with exit (exit_code, signal), or error (problem) when the
// session broke.
type ExecControl struct {
	Type string `json:"type"`
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// Signal is a name or number from the client, and the name of the
	// signal that killed the process in exit.
	Signal   string   `json:"signal,omitempty"`
	ExitCode *int     `json:"exit_code,omitempty"`
	Problem  *Problem `json:"problem,omitempty"`
}

// Control message types.
const (
	ControlResize     = "resize"
	ControlSignal     = "signal"
	ControlStdinClose = "stdin_close"
	ControlExit       = "exit"
	ControlError      = "error"
)

// AttachSubprotocol is the WebSocket subprotocol of attach sessions
// (GET /v1/workloads/{id}/attach, docs/exec.md): the exec protocol's
// framing, where the process is the workload's own. The client may send
// stdin (with stdin=true), resize, signal (to the workload's main
// process) and stdin_close (the workload reads end of file); it detaches
// by closing the WebSocket, and the workload runs on. When the workload
// ends, the agent sends its exit (exit_code, signal) after the last
// output; error (problem) ends a session that broke or fell behind.
const AttachSubprotocol = "berth.attach.v1"

// AttachRequest is an attach session's request (the handshake's query:
// stdin, logs, rows, cols).
type AttachRequest struct {
	// Stdin: the session types into the workload (its spec must have
	// stdin).
	Stdin bool `json:"stdin,omitempty"`
	// Logs: the session's output begins with the workload's newest
	// output from before the attach (up to 64 KiB), each byte once.
	Logs bool `json:"logs,omitempty"`
	// Size resizes the workload's terminal on attach.
	Size *TermSize `json:"size,omitempty"`
}
