package guest

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Event is the kind of a Status record.
type Event string

const (
	// EventStarted: the command was executed; PID is its pid in the guest.
	EventStarted Event = "started"
	// EventExited: the command ended; ExitCode (and Signal) say how.
	EventExited Event = "exited"
	// EventError: berth-init could not run the command; Message says why.
	EventError Event = "error"
)

// Exit codes berth-init reports in error records, following the shell's
// and Docker's conventions so a VM workload fails like a container would.
const (
	// ExitCodeInitFailure: berth-init itself failed (config, devices,
	// mounts), before anything of the workload ran.
	ExitCodeInitFailure = 125
	// ExitCodeCannotExec: the command was found but could not be executed.
	ExitCodeCannotExec = 126
	// ExitCodeNotFound: the command was not found.
	ExitCodeNotFound = 127
)

// Status is one record of the status channel.
type Status struct {
	Event Event `json:"event"`
	// PID is set for EventStarted.
	PID int `json:"pid,omitempty"`
	// ExitCode is set for EventExited and EventError.
	ExitCode int `json:"exit_code"`
	// Signal is the signal that killed the command, for EventExited; then
	// ExitCode is 128+Signal.
	Signal int `json:"signal,omitempty"`
	// Message explains an EventError.
	Message string `json:"message,omitempty"`
}

// Terminal reports whether s ends the workload (exited or error).
func (s Status) Terminal() bool { return s.Event == EventExited || s.Event == EventError }

// MarshalJSON writes exit_code only for the events that have one, so a
// started record cannot be misread as a successful exit.
func (s Status) MarshalJSON() ([]byte, error) {
	type plain Status // no methods: avoids recursion
	if s.Terminal() {
		return json.Marshal(plain(s))
	}
	return json.Marshal(struct {
		Event   Event  `json:"event"`
		PID     int    `json:"pid,omitempty"`
		Message string `json:"message,omitempty"`
	}{s.Event, s.PID, s.Message})
}

// AppendLine returns s as one status-channel line: JSON and a newline.
func (s Status) AppendLine(b []byte) []byte {
	data, err := json.Marshal(s)
	if err != nil {
		// Status has only plain fields; Marshal cannot fail on it.
		panic(fmt.Sprintf("guest: marshal status: %v", err))
	}
	return append(append(b, data...), '\n')
}

// ExitCodeForSignal is the exit code reported for a command killed by sig,
// 128+sig as shells and runc report it.
func ExitCodeForSignal(sig int) int { return 128 + sig }

// ErrNoResult is returned by ReadLastStatus when the channel holds no
// terminal record: the guest died (kernel panic, forced power-off) before
// berth-init could report how the workload ended.
var ErrNoResult = errors.New("guest reported no result")

// ParseStatus decodes one status line.
func ParseStatus(line []byte) (Status, error) {
	var s Status
	if err := json.Unmarshal(bytes.TrimSpace(line), &s); err != nil {
		return Status{}, fmt.Errorf("parse guest status %q: %w", line, err)
	}
	switch s.Event {
	case EventStarted, EventExited, EventError:
		return s, nil
	default:
		return Status{}, fmt.Errorf("parse guest status %q: unknown event %q", line, s.Event)
	}
}

// ReadLastStatus reads a whole status channel and returns its last record,
// which is the workload's result when it is terminal. started is the last
// started record seen, if any, so the host can report the guest pid even
// when the result is missing. A torn last line (the domain was forced off
// mid-write) is ignored; any other malformed line is an error.
func ReadLastStatus(r io.Reader) (last, started *Status, err error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	var pending error
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		if pending != nil {
			return nil, nil, pending
		}
		s, perr := ParseStatus(sc.Bytes())
		if perr != nil {
			pending = perr
			continue
		}
		last = &s
		if s.Event == EventStarted {
			started = &s
		}
	}
	if err := sc.Err(); err != nil {
		return nil, nil, fmt.Errorf("read guest status: %w", err)
	}
	if last == nil || !last.Terminal() {
		return last, started, ErrNoResult
	}
	return last, started, nil
}
