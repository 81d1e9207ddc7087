package guest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/berthd/berth/errdefs"
	"github.com/berthd/berth/internal/attachio"
)

// The exec channel carries exec sessions and signals for the workload
// between the host and berth-init over one byte stream: a virtio-serial
// port here (ExecPort), any io.ReadWriteCloser in general (an AF_VSOCK
// connection would do). Messages are frames:
//
//	type (1 byte) | session id (4 bytes, big endian) | length (4 bytes) | payload
//
// A frame is at most MaxExecFrame bytes, so the guest writes each with a
// single write(2), which virtio-serial delivers whole. The host opens each
// connection with a hello frame; berth-init discards everything before it
// (the tail of a previous connection) and answers with its own hello. See
// docs/vm-exec.md for the whole protocol.

// ExecProtocolVersion is the version the hello frames carry.
const ExecProtocolVersion = 1

const (
	execHeaderLen = 9
	// MaxExecFrame bounds a frame, header included: the guest's
	// virtio-serial driver sends at most 32 KiB per write.
	MaxExecFrame = 32 << 10
	// MaxExecPayload is the largest payload of a frame.
	MaxExecPayload = MaxExecFrame - execHeaderLen
	// ExecWindow is how many bytes of a session's stream the sender may
	// have in flight before the receiver grants more (a window frame): a
	// slow reader holds back its own session only, and neither side
	// buffers more than this per stream.
	ExecWindow = 256 << 10
	// MaxExecSessions bounds the sessions of one connection.
	MaxExecSessions = 1024
)

// Frame types. h>g: host to guest; g>h: guest to host.
const (
	frameHello      byte = 1  // both: magic and version; session 0
	frameOpen       byte = 2  // h>g: JSON ExecRequest
	frameStarted    byte = 3  // g>h: the process runs
	frameFailed     byte = 4  // g>h: JSON ExecError, answer to open or signal-main
	frameStdin      byte = 5  // h>g: data
	frameStdinEOF   byte = 6  // h>g: end of stdin
	frameResize     byte = 7  // h>g: rows, cols (2 bytes each)
	frameSignal     byte = 8  // h>g: signal number (4 bytes) for the session's process
	frameClose      byte = 9  // h>g: kill the session's process group, forget it
	frameStdout     byte = 10 // g>h: data; empty means end of stdout
	frameStderr     byte = 11 // g>h: data; empty means end of stderr
	frameWindow     byte = 12 // both: stream (1 byte), increment (4 bytes)
	frameExit       byte = 13 // g>h: exit code, signal (4 bytes each)
	frameSignalMain byte = 14 // h>g: signal number for the workload's main process
	frameDone       byte = 15 // g>h: answer to signal-main
	frameAttach     byte = 16 // h>g: JSON AttachRequest; answered like open
	frameEnded      byte = 17 // g>h: JSON ExecError: berth-init ended the session (an attach that fell behind)
	frameMax             = frameEnded
)

// Streams named by window frames.
const (
	streamStdin  byte = 0
	streamStdout byte = 1
	streamStderr byte = 2
)

// execMagic starts every hello payload, followed by the version.
var execMagic = []byte("BERTHEXC")

// helloPattern is the start of a hello frame as it appears on the wire:
// what berth-init scans for to find the start of a connection.
var helloPattern = func() []byte {
	b := appendHeader(nil, frameHello, 0, len(execMagic)+4)
	return append(b, execMagic...)
}()

// ErrBadFrame is a frame that breaks the protocol: an unknown type or a
// length beyond MaxExecPayload.
var ErrBadFrame = errors.New("bad exec channel frame")

type frame struct {
	typ  byte
	sid  uint32
	data []byte
}

func appendHeader(b []byte, typ byte, sid uint32, n int) []byte {
	b = append(b, typ)
	b = binary.BigEndian.AppendUint32(b, sid)
	return binary.BigEndian.AppendUint32(b, uint32(n))
}

// encodeFrame returns the wire form of one frame.
func encodeFrame(typ byte, sid uint32, data []byte) []byte {
	b := make([]byte, 0, execHeaderLen+len(data))
	return append(appendHeader(b, typ, sid, len(data)), data...)
}

// readFrame reads one frame. Its payload is freshly allocated.
func readFrame(r io.Reader) (frame, error) {
	var h [execHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return frame{}, err
	}
	f := frame{typ: h[0], sid: binary.BigEndian.Uint32(h[1:5])}
	n := binary.BigEndian.Uint32(h[5:9])
	if f.typ == 0 || f.typ > frameMax {
		return f, fmt.Errorf("%w: type %d", ErrBadFrame, f.typ)
	}
	if n > MaxExecPayload {
		return f, fmt.Errorf("%w: length %d exceeds %d", ErrBadFrame, n, MaxExecPayload)
	}
	f.data = make([]byte, n)
	if _, err := io.ReadFull(r, f.data); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return f, err
	}
	return f, nil
}

func helloPayload() []byte {
	return binary.BigEndian.AppendUint32(append([]byte(nil), execMagic...), ExecProtocolVersion)
}

// checkHello validates a hello payload.
func checkHello(data []byte) error {
	if len(data) != len(execMagic)+4 || !bytes.Equal(data[:len(execMagic)], execMagic) {
		return fmt.Errorf("%w: hello without berth's magic", ErrBadFrame)
	}
	if v := binary.BigEndian.Uint32(data[len(execMagic):]); v != ExecProtocolVersion {
		return fmt.Errorf("exec channel protocol version %d, this side speaks %d", v, ExecProtocolVersion)
	}
	return nil
}

func u32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func windowPayload(stream byte, inc int) []byte {
	return binary.BigEndian.AppendUint32([]byte{stream}, uint32(inc))
}

func parseWindow(data []byte) (stream byte, inc int, ok bool) {
	if len(data) != 5 {
		return 0, 0, false
	}
	return data[0], int(binary.BigEndian.Uint32(data[1:])), true
}

// ExecRequest is what an open frame asks berth-init to run: an
// ExecConfig of the driver contract.
type ExecRequest struct {
	Args []string `json:"args"`
	// Env is added to the workload's environment; a key given here wins.
	Env []string `json:"env,omitempty"`
	// Workdir is an absolute path that must exist; empty means the
	// workload's.
	Workdir string `json:"workdir,omitempty"`
	// User is "uid[:gid]", numeric; empty means the workload's.
	User  string `json:"user,omitempty"`
	Stdin bool   `json:"stdin,omitempty"`
	TTY   bool   `json:"tty,omitempty"`
	Rows  uint16 `json:"rows,omitempty"`
	Cols  uint16 `json:"cols,omitempty"`
}

// ExecErrorKind classifies an ExecError for the host.
type ExecErrorKind string

const (
	// ExecInvalid: the request cannot run (bad or missing workdir, user
	// or command); nothing was started.
	ExecInvalid ExecErrorKind = "invalid"
	// ExecConflict: the workload is in no state for it (its main process
	// has not started or has ended).
	ExecConflict ExecErrorKind = "conflict"
	// ExecExhausted: too many sessions.
	ExecExhausted ExecErrorKind = "exhausted"
	// ExecInternal: berth-init failed.
	ExecInternal ExecErrorKind = "internal"
	// ExecSlow: an attach session fell further behind the workload's
	// output than berth-init holds for it, and was ended (frameEnded).
	ExecSlow ExecErrorKind = "slow"
)

// ExecError is berth-init's refusal of an exec or signal request.
type ExecError struct {
	Kind    ExecErrorKind `json:"kind"`
	Message string        `json:"message"`
}

func (e *ExecError) Error() string { return e.Message }

// Unwrap maps the kind to berth's error classes.
func (e *ExecError) Unwrap() error {
	switch e.Kind {
	case ExecInvalid:
		return errdefs.ErrInvalidArgument
	case ExecConflict:
		return errdefs.ErrConflict
	case ExecExhausted:
		return errdefs.ErrResourceExhausted
	case ExecSlow:
		return attachio.ErrSlow
	}
	return nil
}
