package monitor

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The attach protocol: a container monitor (protocol 3 on) serves
// AttachSocket in its task directory (mode 0600; the directory is root's
// alone), where the agent connects a client to the container's own
// stdio (`berth attach`, `berth run -it`). Every message is a frame: one
// type byte, a 4-byte big-endian length, and that many bytes. The client
// speaks first, one FrameHello; the monitor answers one FrameReply, and
// then:
//
//	client → monitor: FrameStdin (bytes for the workload's stdin),
//	                  FrameStdinClose (its end of file), FrameResize
//	monitor → client: FrameStdout, FrameStderr (output, in order),
//	                  then FrameEnd (the task ended; that was all its
//	                  output) or FrameSlow (the client fell behind and is
//	                  dropped); the monitor then closes the connection.
//
// The client leaving (closing the connection) detaches it; the task runs
// on.
const (
	FrameHello      byte = 'h'
	FrameStdin      byte = 'i'
	FrameStdinClose byte = 'c'
	FrameResize     byte = 'r'

	FrameReply  byte = 'H'
	FrameStdout byte = 'o'
	FrameStderr byte = 'e'
	FrameEnd    byte = 'E'
	FrameSlow   byte = 'S'
)

// AttachSocket is the monitor's attach socket, in the task directory.
const AttachSocket = "attach.sock"

// AttachVersion is the first protocol version whose container monitors
// serve AttachSocket.
const AttachVersion = 3

// AttachReplayMax is how much of the newest output a monitor keeps to
// replay to a client that asks (driver.AttachReplayMax; the monitor links
// no driver package).
const AttachReplayMax = 64 << 10

// maxFrame bounds a frame's payload: a larger one is a broken peer.
const maxFrame = 1 << 20

// outputChunk is the most output one frame carries.
const outputChunk = 32 << 10

// AttachHello is a client's first frame: what its session carries.
type AttachHello struct {
	Version int `json:"version"`
	// Stdin: the client will write the workload's stdin.
	Stdin bool `json:"stdin,omitempty"`
	// Replay: send the kept output (up to AttachReplayMax) first.
	Replay bool `json:"replay,omitempty"`
	// Rows and Cols, when both set, resize the terminal on attach.
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
}

// Refusal reasons in AttachReply.Reason.
const (
	// RefuseNoStdin: the client asked for stdin, the task has none.
	RefuseNoStdin = "no_stdin"
	// RefuseEnded: the task has ended.
	RefuseEnded = "ended"
	// RefuseBadRequest: the hello was not understood.
	RefuseBadRequest = "bad_request"
)

// AttachReply answers a hello.
type AttachReply struct {
	Version int `json:"version"`
	// TTY: the task runs on a terminal (one output stream, FrameStdout).
	TTY bool `json:"tty,omitempty"`
	// Stdin: the task's stdin is open for attach sessions.
	Stdin bool `json:"stdin,omitempty"`
	// Reason is set when the attach is refused, with Error saying why.
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
}

// writeFrame writes one frame to w.
func writeFrame(w io.Writer, typ byte, payload []byte) error {
	var hdr [5]byte
	hdr[0] = typ
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(payload)))
	if len(payload) == 0 {
		_, err := w.Write(hdr[:])
		return err
	}
	// One write: frames of concurrent writers must not interleave, and
	// a unix socket takes both parts in one call.
	buf := make([]byte, 0, len(hdr)+len(payload))
	_, err := w.Write(append(append(buf, hdr[:]...), payload...))
	return err
}

// readFrame reads one frame from r; a clean end of the stream before a
// frame is io.EOF.
func readFrame(r io.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if n > maxFrame {
		return 0, nil, fmt.Errorf("attach frame of %d bytes: over the %d-byte limit", n, maxFrame)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, unexpected(err)
	}
	return hdr[0], payload, nil
}

func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

func encodeResize(rows, cols uint16) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint16(b, rows)
	binary.BigEndian.PutUint16(b[2:], cols)
	return b
}

func decodeResize(b []byte) (rows, cols uint16, ok bool) {
	if len(b) != 4 {
		return 0, 0, false
	}
	return binary.BigEndian.Uint16(b), binary.BigEndian.Uint16(b[2:]), true
}

// ErrNoAttachSocket: the task directory has no attach socket (its monitor
// predates attach, or is gone).
var ErrNoAttachSocket = errors.New("the task's monitor serves no attach socket")

// AttachConn is a client's connection to a monitor's attach socket.
type AttachConn struct {
	conn  *net.UnixConn
	Reply AttachReply

	wmu sync.Mutex // frames from Stdin and Resize writers
}

// DialAttach connects to the attach socket in taskDir and says hello.
// ctx bounds the connect and the hello. A refusal is returned as the
// reply with a nil connection and a nil error: the caller maps its Reason.
func DialAttach(ctx context.Context, taskDir string, hello AttachHello) (*AttachConn, *AttachReply, error) {
	path := filepath.Join(taskDir, AttachSocket)
	// The socket is reached through an O_PATH descriptor, so a task
	// directory deeper than a socket address's 108 bytes works too.
	fd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, nil, fmt.Errorf("%s: %w", path, ErrNoAttachSocket)
		}
		return nil, nil, fmt.Errorf("open attach socket: %w", err)
	}
	defer unix.Close(fd)
	var dialer net.Dialer
	c, err := dialer.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
	if err != nil {
		if errors.Is(err, unix.ECONNREFUSED) {
			// The socket file is there but nobody listens: the monitor
			// is gone.
			return nil, nil, fmt.Errorf("%s: nobody listens: %w", path, ErrNoAttachSocket)
		}
		return nil, nil, fmt.Errorf("connect to the attach socket: %w", err)
	}
	conn := c.(*net.UnixConn)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	reply, err := handshake(conn, hello)
	if !stop() && err != nil {
		err = errors.Join(ctx.Err(), err)
	}
	_ = conn.SetDeadline(time.Time{})
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if reply.Reason != "" {
		conn.Close()
		return nil, reply, nil
	}
	return &AttachConn{conn: conn, Reply: *reply}, reply, nil
}

func handshake(conn *net.UnixConn, hello AttachHello) (*AttachReply, error) {
	hello.Version = Version
	b, _ := json.Marshal(hello)
	if err := writeFrame(conn, FrameHello, b); err != nil {
		return nil, fmt.Errorf("attach hello: %w", err)
	}
	typ, payload, err := readFrame(conn)
	if err != nil {
		return nil, fmt.Errorf("attach reply: %w", unexpected(err))
	}
	var reply AttachReply
	if typ != FrameReply || json.Unmarshal(payload, &reply) != nil {
		return nil, fmt.Errorf("attach reply: frame %q is not a reply", typ)
	}
	return &reply, nil
}

// ReadFrame reads the monitor's next frame: FrameStdout or FrameStderr
// with output, FrameEnd or FrameSlow last.
func (c *AttachConn) ReadFrame() (byte, []byte, error) { return readFrame(c.conn) }

func (c *AttachConn) write(typ byte, payload []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return writeFrame(c.conn, typ, payload)
}

// WriteStdin sends p to the workload's stdin.
func (c *AttachConn) WriteStdin(p []byte) (int, error) {
	for off := 0; off < len(p); off += outputChunk {
		if err := c.write(FrameStdin, p[off:min(off+outputChunk, len(p))]); err != nil {
			return off, err
		}
	}
	return len(p), nil
}

// CloseStdin ends the workload's stdin.
func (c *AttachConn) CloseStdin() error { return c.write(FrameStdinClose, nil) }

// Resize changes the terminal's size.
func (c *AttachConn) Resize(rows, cols uint16) error {
	return c.write(FrameResize, encodeResize(rows, cols))
}

// Close detaches.
func (c *AttachConn) Close() error { return c.conn.Close() }

// listenUnix binds a unix socket at path (through the directory's
// descriptor when path is longer than an address holds) with mode 0600.
func listenUnix(path string) (*net.UnixListener, error) {
	addr := path
	if len(path) >= len(unix.RawSockaddrUnix{}.Path) {
		dir, err := os.Open(filepath.Dir(path))
		if err != nil {
			return nil, err
		}
		defer dir.Close()
		addr = "/proc/self/fd/" + strconv.Itoa(int(dir.Fd())) + "/" + filepath.Base(path)
	}
	_ = os.Remove(path) // a dead monitor's
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: addr, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(false)
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}
