// Package sdnotify tells the service manager (systemd's Type=notify)
// about the agent's state over the datagram socket it names in
// $NOTIFY_SOCKET: READY=1 once the API answers, STOPPING=1 when it shuts
// down. It is the protocol of sd_notify(3), written here because it is a
// single datagram and berth links no libsystemd.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"strings"
)

// Env is the variable systemd sets for a Type=notify service.
const Env = "NOTIFY_SOCKET"

// Ready, Stopping and Status are the states berth sends.
const (
	Ready    = "READY=1"
	Stopping = "STOPPING=1"
)

// Status is a line `systemctl status` shows.
func Status(s string) string { return "STATUS=" + strings.ReplaceAll(s, "\n", " ") }

// Notify sends the states, one a line, to $NOTIFY_SOCKET. Without the
// variable (not started by systemd, or not Type=notify) it does nothing
// and reports false.
func Notify(states ...string) (bool, error) {
	path := os.Getenv(Env)
	if path == "" {
		return false, nil
	}
	// Only a path or an abstract socket (@name) is a socket; systemd
	// sends nothing else, but a stray value must not make us dial it.
	if !strings.HasPrefix(path, "/") && !strings.HasPrefix(path, "@") {
		return false, fmt.Errorf("%s=%q is neither a path nor an abstract socket", Env, path)
	}
	addr := &net.UnixAddr{Name: path, Net: "unixgram"}
	if path[0] == '@' {
		addr.Name = "\x00" + path[1:]
	}
	conn, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return false, fmt.Errorf("notify the service manager: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(strings.Join(states, "\n"))); err != nil {
		return false, fmt.Errorf("notify the service manager: %w", err)
	}
	return true, nil
}
