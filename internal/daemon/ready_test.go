package daemon_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/sdnotify"
)

// TestServiceManagerNotification: with $NOTIFY_SOCKET set (systemd's
// Type=notify), the agent sends READY=1 once, after its API answers,
// and STOPPING=1 when it shuts down; on the unix socket and, without
// one, on TCP.
func TestServiceManagerNotification(t *testing.T) {
	certFile, keyFile, ca := serverCert(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, ca.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	tokens, _ := tokensFile(t)
	for _, tc := range []struct {
		name   string
		modify func(*config.Config)
	}{
		{"unix socket", nil},
		{"tcp only", func(c *config.Config) { c.ListenUnix = "" }},
		{"tls only", func(c *config.Config) {
			c.ListenUnix, c.Listen, c.Auth.TokensFile = "", "0.0.0.0:0", tokens
			c.TLS = config.TLS{CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "notify.sock")
			mgr, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer mgr.Close()
			t.Setenv(sdnotify.Env, sock)
			read := func(wait time.Duration) (string, error) {
				_ = mgr.SetReadDeadline(time.Now().Add(wait))
				buf := make([]byte, 4096)
				n, err := mgr.Read(buf)
				return string(buf[:n]), err
			}

			d, err := newFakeAgent(t, tc.modify)
			if err != nil {
				t.Fatal(err)
			}
			// Listening is not answering: nothing before Serve.
			if msg, err := read(300 * time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("before Serve the manager got %q (%v)", msg, err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- d.Serve(ctx) }()
			defer func() {
				cancel()
				<-done
			}()

			msg, err := read(30 * time.Second)
			if err != nil {
				t.Fatalf("no READY=1: %v", err)
			}
			lines := strings.Split(msg, "\n")
			if lines[0] != sdnotify.Ready || len(lines) != 2 || !strings.HasPrefix(lines[1], "STATUS=serving the API on ") {
				t.Fatalf("manager got %q, want READY=1 and a status", msg)
			}
			// The promise of READY=1: the API answers now.
			addr, opts := d.Addr(), []client.Option(nil)
			if strings.HasPrefix(tc.name, "tls") {
				_, port, _ := net.SplitHostPort(addr)
				roots := x509.NewCertPool()
				roots.AddCert(ca.cert)
				addr, opts = "127.0.0.1:"+port, []client.Option{client.WithTLS(&tls.Config{RootCAs: roots})}
			}
			c, err := client.New(addr, opts...)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Ready(context.Background()); err != nil {
				t.Fatalf("the API does not answer after READY=1: %v", err)
			}

			cancel()
			msg, err = read(30 * time.Second)
			if err != nil || msg != sdnotify.Stopping {
				t.Fatalf("at shutdown the manager got %q (%v), want STOPPING=1", msg, err)
			}
			if err := <-done; err != nil {
				t.Errorf("agent: %v", err)
			}
			done <- nil // for the deferred wait
			// READY=1 was sent once.
			if msg, err := read(100 * time.Millisecond); err == nil {
				t.Errorf("the manager got %q after STOPPING=1", msg)
			}
		})
	}
}
