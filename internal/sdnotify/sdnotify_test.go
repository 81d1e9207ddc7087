package sdnotify

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// listen makes a fake service manager socket and returns a function that
// reads the next datagram.
func listen(t *testing.T, name string) func() string {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return func() string {
		buf := make([]byte, 4096)
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		return string(buf[:n])
	}
}

func TestNotify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify.sock")
	read := listen(t, path)
	t.Setenv(Env, path)
	sent, err := Notify(Ready, Status("serving\non 127.0.0.1:7470"))
	if err != nil || !sent {
		t.Fatalf("Notify: %v %v", sent, err)
	}
	if got := read(); got != "READY=1\nSTATUS=serving on 127.0.0.1:7470" {
		t.Errorf("got %q", got)
	}
}

func TestNotifyAbstract(t *testing.T) {
	name := "berth-test-" + strings.ReplaceAll(t.Name(), "/", "-") + filepath.Base(t.TempDir())
	read := listen(t, "\x00"+name)
	t.Setenv(Env, "@"+name)
	if sent, err := Notify(Stopping); err != nil || !sent {
		t.Fatalf("Notify: %v %v", sent, err)
	}
	if got := read(); got != "STOPPING=1" {
		t.Errorf("got %q", got)
	}
}

func TestNotifyWithoutManager(t *testing.T) {
	t.Setenv(Env, "")
	if sent, err := Notify(Ready); sent || err != nil {
		t.Errorf("without %s: %v %v, want nothing sent and no error", Env, sent, err)
	}
	t.Setenv(Env, "relative/path")
	if sent, err := Notify(Ready); sent || err == nil {
		t.Errorf("with a bad %s: %v %v, want an error", Env, sent, err)
	}
	// A manager that went away is an error the caller logs, not a hang.
	t.Setenv(Env, filepath.Join(t.TempDir(), "gone.sock"))
	if sent, err := Notify(Ready); sent || err == nil {
		t.Errorf("with no socket: %v %v, want an error", sent, err)
	}
}
