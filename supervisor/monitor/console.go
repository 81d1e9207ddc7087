package monitor

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ConsoleResult is the terminal master runc sent to a console socket, or
// why none came.
type ConsoleResult struct {
	Master *os.File
	Err    error
}

// ListenConsole listens on path for runc's --console-socket and receives
// the terminal's master from the first connection, within timeout.
func ListenConsole(path string, timeout time.Duration) (<-chan ConsoleResult, error) {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("console socket: %w", err)
	}
	ch := make(chan ConsoleResult, 1)
	go func() {
		defer ln.Close()
		_ = ln.SetDeadline(time.Now().Add(timeout))
		conn, err := ln.AcceptUnix()
		if err != nil {
			ch <- ConsoleResult{Err: err}
			return
		}
		defer conn.Close()
		master, err := RecvFd(conn)
		ch <- ConsoleResult{Master: master, Err: err}
	}()
	return ch, nil
}

// RecvFd reads one file descriptor sent with SCM_RIGHTS (as runc sends a
// terminal's master), made non-blocking so a Close ends a pending read.
func RecvFd(conn *net.UnixConn) (*os.File, error) {
	buf := make([]byte, 4096) // runc sends the terminal's name along
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, err
	}
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil || len(fds) == 0 {
			continue
		}
		for _, extra := range fds[1:] {
			unix.Close(extra)
		}
		if err := unix.SetNonblock(fds[0], true); err != nil {
			unix.Close(fds[0])
			return nil, err
		}
		return os.NewFile(uintptr(fds[0]), string(buf[:n])), nil
	}
	return nil, errors.New("no file descriptor in the console socket's message")
}
