package guest

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"testing"
	"time"
)

// TestExecExitAfterFail delivers a session's exit frame after the
// connection failed (the read loop had looked the session up before Close
// of the client ran): no panic, and the waiter gets the failure.
func TestExecExitAfterFail(t *testing.T) {
	host, other := net.Pipe()
	defer other.Close()
	c := &ExecClient{rwc: host, sessions: map[uint32]*ExecSession{}, done: make(chan struct{})}
	s := newSession(c, nil)
	if err := c.register(s); err != nil {
		t.Fatal(err)
	}
	c.fail(ErrExecChannelClosed)
	exit := make([]byte, 8)
	binary.BigEndian.PutUint32(exit, 3)
	if err := s.handle(frame{typ: frameExit, sid: s.id, data: exit}); err != nil {
		t.Fatalf("handle exit: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := s.Wait(ctx); !errors.Is(err, ErrExecChannelClosed) {
		t.Fatalf("Wait after the connection failed = %v, want %v", err, ErrExecChannelClosed)
	}
	// A second exit (a duplicate from the guest) is harmless too.
	if err := s.handle(frame{typ: frameExit, sid: s.id, data: exit}); err != nil {
		t.Fatalf("handle second exit: %v", err)
	}
}

// panicReader panics on its first read, as a bug in the read loop would.
type panicReader struct{ net.Conn }

func (panicReader) Read([]byte) (int, error) { panic("bug in frame handling") }

// TestExecReadLoopPanicFailsClient: a panic in the read loop fails the
// connection (its sessions end with an error) instead of the agent.
func TestExecReadLoopPanicFailsClient(t *testing.T) {
	host, other := net.Pipe()
	defer other.Close()
	c := &ExecClient{rwc: panicReader{host}, sessions: map[uint32]*ExecSession{}, done: make(chan struct{})}
	s := newSession(c, nil)
	if err := c.register(s); err != nil {
		t.Fatal(err)
	}
	go c.readLoop()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the client did not fail after a panic in the read loop")
	}
	if !errors.Is(c.Err(), ErrExecChannelClosed) {
		t.Fatalf("Err = %v, want %v", c.Err(), ErrExecChannelClosed)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, _, err := s.Wait(ctx); !errors.Is(err, ErrExecChannelClosed) {
		t.Fatalf("Wait = %v, want %v", err, ErrExecChannelClosed)
	}
}

// TestExecSendToStuckGuest: a guest that stops reading its port fails the
// connection after ExecSendTimeout instead of wedging the request, and a
// session's Close behind it returns.
func TestExecSendToStuckGuest(t *testing.T) {
	old := ExecSendTimeout
	ExecSendTimeout = 50 * time.Millisecond
	defer func() { ExecSendTimeout = old }()
	host, stuck := net.Pipe() // nobody reads stuck: every write blocks
	defer stuck.Close()
	c := &ExecClient{rwc: host, sessions: map[uint32]*ExecSession{}, done: make(chan struct{})}
	go c.readLoop()
	open := newSession(c, nil)
	if err := c.register(open); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() { _ = open.Close(); close(closed) }()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Exec(ctx, &ExecRequest{Args: []string{"true"}}); !errors.Is(err, ErrExecChannelClosed) {
		t.Fatalf("Exec to a guest that reads nothing = %v, want %v", err, ErrExecChannelClosed)
	}
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("a session's Close stayed blocked behind a stuck send")
	}
	if _, err := c.Exec(ctx, &ExecRequest{Args: []string{"true"}}); !errors.Is(err, ErrExecChannelClosed) {
		t.Fatalf("Exec on the failed client = %v, want %v", err, ErrExecChannelClosed)
	}
}
