package daemon

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/berthd/berth/api/server"
	"github.com/berthd/berth/internal/auth"
	"github.com/berthd/berth/internal/config"
)

// unixSocketMode lets the socket's owner and group use the API.
const unixSocketMode = 0o660

// security builds what the API server needs to authenticate and audit:
// the tokens store (nil when auth is off) and the audit logger.
func (d *Daemon) security() (server.Options, error) {
	cfg := d.cfg
	opts := server.Options{
		Logger:         d.log,
		MaxBodyBytes:   cfg.API.MaxBodyBytes,
		TrustUnixRoot:  cfg.Auth.TrustUnixRoot,
		RequestTimeout: cfg.API.RequestTimeout,
		StreamIdle:     cfg.API.StreamIdleTimeout,
	}
	if cfg.Auth.TokensFile != "" {
		store, err := auth.Open(cfg.Auth.TokensFile, d.log)
		if err != nil {
			return opts, err
		}
		d.tokens = store
		opts.Auth = store
	}
	switch cfg.Audit.File {
	case "-":
		opts.Audit = slog.New(slog.NewJSONHandler(os.Stderr, nil))
	default:
		file := cfg.Audit.File
		if file == "" {
			file = filepath.Join(cfg.DataDir, "audit.log")
		}
		f, err := os.OpenFile(file, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return opts, fmt.Errorf("audit log: %w", err)
		}
		d.audit = f
		opts.Audit = slog.New(slog.NewJSONHandler(f, nil))
	}
	return opts, nil
}

// listen opens the TCP listener (with TLS when configured) and the unix
// socket. It refuses, whatever the configuration says, to serve a TCP
// address other machines can reach without TLS and tokens.
func (d *Daemon) listen() error {
	cfg := d.cfg
	if cfg.Listen != "" {
		tcpConf, err := tlsConfig(cfg.TLS)
		if err != nil {
			return err
		}
		ln, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
		}
		if !config.IsLoopback(ln.Addr().String()) && (tcpConf == nil || d.tokens == nil) {
			ln.Close()
			return fmt.Errorf("listen on %s: reachable from other machines; berth serves it only with TLS (tls.cert_file, tls.key_file) and authentication (auth.tokens_file)", cfg.Listen)
		}
		if tcpConf != nil {
			ln = tls.NewListener(ln, tcpConf)
		}
		d.ln, d.tlsConf = ln, tcpConf
	}
	if cfg.ListenUnix != "" {
		ln, err := listenUnix(cfg.ListenUnix)
		if err != nil {
			d.closeListeners()
			return err
		}
		d.unixLn = ln
	}
	return nil
}

func (d *Daemon) closeListeners() {
	for _, ln := range []net.Listener{d.ln, d.unixLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

// httpServer is the server both listeners share, with limits on every
// phase of a request; routes that need longer extend their own deadlines
// (api/server/auth_routes.go).
func (d *Daemon) httpServer(h http.Handler) *http.Server {
	a := d.cfg.API
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: a.ReadHeaderTimeout,
		ReadTimeout:       a.RequestTimeout,
		WriteTimeout:      a.RequestTimeout,
		IdleTimeout:       a.IdleTimeout,
		MaxHeaderBytes:    a.MaxHeaderBytes,
		ConnContext:       server.ConnContext,
		ErrorLog:          slog.NewLogLogger(d.log.Handler(), slog.LevelWarn),
	}
}

// listenUnix binds the socket at path, replacing a stale one (a socket
// file nobody answers on, left by an agent that died) but never a live
// agent's socket or a file that is not a socket.
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("unix socket %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("unix socket %s: a file that is not a socket is in the way; remove it or set listen_unix", path)
		}
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil, fmt.Errorf("unix socket %s: another agent is listening on it; stop it or set listen_unix", path)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("unix socket %s: cannot tell whether it is in use: %w", path, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("unix socket %s: remove the stale socket: %w", path, err)
		}
	}
	// Nobody may connect before the mode is right: create it under a
	// umask that leaves only the owner, then open it to the group.
	old := syscall.Umask(0o077)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("unix socket %s: %w", path, err)
	}
	if err := os.Chmod(path, unixSocketMode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("unix socket %s: %w", path, err)
	}
	return ln, nil
}

// tlsConfig is the TCP listener's TLS, or nil without a certificate.
// Client certificates are optional even with a CA (a bearer token works
// too); one that is presented must verify.
func tlsConfig(c config.TLS) (*tls.Config, error) {
	if c.CertFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls.cert_file/tls.key_file: %w", err)
	}
	conf := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"http/1.1"},
	}
	if c.ClientCAFile != "" {
		pem, err := os.ReadFile(c.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("tls.client_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.client_ca_file %s: no PEM certificate in it", c.ClientCAFile)
		}
		conf.ClientCAs = pool
		conf.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return conf, nil
}

// closeSecurity stops the tokens watcher and closes the audit log.
func (d *Daemon) closeSecurity() {
	if d.tokens != nil {
		d.tokens.Close()
	}
	if d.audit != nil {
		d.audit.Close()
	}
}
