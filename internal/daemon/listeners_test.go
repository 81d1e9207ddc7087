package daemon_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/api/client"
	"github.com/berthd/berth/driver"
	"github.com/berthd/berth/driver/fake"
	"github.com/berthd/berth/internal/auth"
	"github.com/berthd/berth/internal/config"
	"github.com/berthd/berth/internal/daemon"
)

// Every agent a test starts would bind the default unix socket,
// /run/berth/berth.sock, where a second agent (a parallel test process, a
// re-executed agent child, a developer's own agent) is refused. Each test
// process gets its own socket path instead; a child process re-runs this
// and gets its own too.
func init() {
	dir := filepath.Join(os.TempDir(), "berth-test-sockets")
	_ = os.MkdirAll(dir, 0o755)
	os.Setenv("BERTH_LISTEN_UNIX", filepath.Join(dir, fmt.Sprintf("%d.sock", os.Getpid())))
}

// fakeAgent runs an agent over the fake driver (no runc needed) with the
// listener configuration modify sets, and returns it serving.
func fakeAgent(t *testing.T, modify func(*config.Config)) *daemon.Daemon {
	t.Helper()
	d, err := newFakeAgent(t, modify)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("agent: %v", err)
		}
	})
	return d
}

func newFakeAgent(t *testing.T, modify func(*config.Config)) (*daemon.Daemon, error) {
	t.Helper()
	cfg, err := config.Load("", nil)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.Listen = "127.0.0.1:0"
	cfg.ListenUnix = filepath.Join(t.TempDir(), "berth.sock")
	cfg.VM.Enabled = false
	cfg.Network.Enabled = false
	if modify != nil {
		modify(cfg)
	}
	logger := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return daemon.New(context.Background(), cfg, daemon.Options{
		Version: "test", Logger: logger,
		Drivers: []driver.Driver{fake.New("container", fake.NewNode())},
	})
}

// tokensFile writes a tokens file with one token per role and returns
// the tokens by role name.
func tokensFile(t *testing.T, extra ...string) (string, map[string]string) {
	t.Helper()
	toks := map[string]string{}
	lines := append([]string{}, extra...)
	for _, c := range []struct {
		name string
		role auth.Role
		ten  []string
	}{{"admin", auth.RoleAdmin, nil}, {"reader", auth.RoleReader, nil}, {"sub-a", auth.RoleSubmitter, []string{"a"}}} {
		tok, line, err := auth.NewToken(c.name, c.role, c.ten)
		if err != nil {
			t.Fatal(err)
		}
		toks[c.name] = tok
		lines = append(lines, line)
	}
	file := filepath.Join(t.TempDir(), "tokens")
	if err := os.WriteFile(file, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return file, toks
}

func nodeStatus(c *client.Client) error {
	_, _, err := c.Node(context.Background(), nil)
	return err
}

func TestUnixSocket(t *testing.T) {
	d := fakeAgent(t, nil)
	path := strings.TrimPrefix(d.UnixAddr(), "unix://")
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket with 0660", fi.Mode())
	}
	c, err := client.New(d.UnixAddr())
	if err != nil {
		t.Fatal(err)
	}
	if err := nodeStatus(c); err != nil {
		t.Fatalf("node status over the socket: %v", err)
	}
	// A second agent on the same socket is refused: it is live.
	_, err = newFakeAgent(t, func(c *config.Config) { c.ListenUnix = path })
	if err == nil || !strings.Contains(err.Error(), "another agent is listening") {
		t.Errorf("second agent on a live socket: %v", err)
	}
}

func TestUnixSocketStaleAndForeign(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	// A socket file nobody listens on, as an agent that died leaves it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	d := fakeAgent(t, func(c *config.Config) { c.ListenUnix = stale })
	c, _ := client.New(d.UnixAddr())
	if err := nodeStatus(c); err != nil {
		t.Fatalf("agent on a stale socket: %v", err)
	}
	// A regular file in the way is not removed.
	regular := filepath.Join(dir, "file")
	os.WriteFile(regular, []byte("keep"), 0o600)
	_, err = newFakeAgent(t, func(c *config.Config) { c.ListenUnix = regular })
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file in the way: %v", err)
	}
	if data, _ := os.ReadFile(regular); string(data) != "keep" {
		t.Error("the regular file was touched")
	}
}

func TestNonLoopbackNeedsTLSAndTokens(t *testing.T) {
	tokens, _ := tokensFile(t)
	certFile, keyFile, _ := serverCert(t)
	for _, tc := range []struct {
		name   string
		modify func(*config.Config)
	}{
		{"plain", func(c *config.Config) { c.Listen = "0.0.0.0:0" }},
		{"tokens without TLS", func(c *config.Config) { c.Listen, c.Auth.TokensFile = "0.0.0.0:0", tokens }},
		{"TLS without tokens", func(c *config.Config) { c.Listen, c.TLS.CertFile, c.TLS.KeyFile = "0.0.0.0:0", certFile, keyFile }},
	} {
		d, err := newFakeAgent(t, tc.modify)
		if err == nil {
			t.Errorf("%s: the agent listens on %s", tc.name, d.Addr())
			continue
		}
		if !strings.Contains(err.Error(), "reachable from other machines") {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestTLSAndClientCerts: a non-loopback listener with TLS and tokens; a
// token over TLS, a client certificate mapped by CN to a role, a
// certificate from another CA refused at the handshake, plain HTTP
// refused, and a root peer on the unix socket an admin without a token.
func TestTLSAndClientCerts(t *testing.T) {
	certFile, keyFile, ca := serverCert(t)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(caFile, ca.pem, 0o600)
	tokens, toks := tokensFile(t, "name=fleet-cert role=reader cert=cn:fleet-1")
	d := fakeAgent(t, func(c *config.Config) {
		c.Listen = "0.0.0.0:0"
		c.Auth.TokensFile = tokens
		c.TLS = config.TLS{CertFile: certFile, KeyFile: keyFile, ClientCAFile: caFile}
	})
	_, port, _ := net.SplitHostPort(d.Addr())
	addr := "127.0.0.1:" + port
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)

	tokenClient, _ := client.New(addr, client.WithToken(toks["reader"]), client.WithTLS(&tls.Config{RootCAs: roots}))
	if err := nodeStatus(tokenClient); err != nil {
		t.Fatalf("reader token over TLS: %v", err)
	}
	if _, _, err := tokenClient.List(context.Background(), api.ListFilter{}, nil); !client.IsReason(err, api.ReasonPermissionDenied) {
		t.Errorf("reader lists workloads: %v, want permission_denied", err)
	}
	noCred, _ := client.New(addr, client.WithTLS(&tls.Config{RootCAs: roots}))
	if err := nodeStatus(noCred); !client.IsReason(err, api.ReasonUnauthenticated) {
		t.Errorf("no credential: %v, want unauthenticated", err)
	}
	certClient, _ := client.New(addr, client.WithTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{ca.issue(t, "fleet-1")}}))
	if err := nodeStatus(certClient); err != nil {
		t.Errorf("mapped client certificate: %v", err)
	}
	if err := certClient.Ready(context.Background()); err != nil {
		t.Errorf("readyz: %v", err)
	}
	unmapped, _ := client.New(addr, client.WithTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{ca.issue(t, "stranger")}}))
	if err := nodeStatus(unmapped); !client.IsReason(err, api.ReasonUnauthenticated) {
		t.Errorf("unmapped client certificate: %v, want unauthenticated", err)
	}
	other := newCA(t)
	foreign, _ := client.New(addr, client.WithTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{other.issue(t, "fleet-1")}}))
	if err := nodeStatus(foreign); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("certificate of another CA: %v, want a handshake failure", err)
	}
	plain, _ := client.New("http://" + addr)
	if err := nodeStatus(plain); err == nil {
		t.Error("plain HTTP to the TLS listener worked")
	}
	// Root on the unix socket needs no token (trust_unix_root).
	local, _ := client.New(d.UnixAddr())
	if _, _, err := local.List(context.Background(), api.ListFilter{}, nil); err != nil {
		t.Errorf("root on the unix socket: %v", err)
	}
	// But a wrong token there is still refused.
	wrong, _ := client.New(d.UnixAddr(), client.WithToken("berth_wrong"))
	if err := nodeStatus(wrong); !client.IsReason(err, api.ReasonUnauthenticated) {
		t.Errorf("wrong token on the unix socket: %v", err)
	}
}

func TestUnixRootNotTrustedWhenOff(t *testing.T) {
	tokens, toks := tokensFile(t)
	auditFile := filepath.Join(t.TempDir(), "audit.log")
	d := fakeAgent(t, func(c *config.Config) {
		c.Auth.TokensFile = tokens
		c.Auth.TrustUnixRoot = false
		c.Audit.File = auditFile
	})
	local, _ := client.New(d.UnixAddr())
	if err := nodeStatus(local); !client.IsReason(err, api.ReasonUnauthenticated) {
		t.Errorf("root on the socket with trust_unix_root off: %v", err)
	}
	withToken, _ := client.New(d.UnixAddr(), client.WithToken(toks["admin"]))
	if err := nodeStatus(withToken); err != nil {
		t.Errorf("admin token on the socket: %v", err)
	}
	// The refusal is in the audit log, without any token.
	data, err := os.ReadFile(auditFile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(data), `"status":401`) || !strings.Contains(string(data), `"route":"/v1/node"`) {
		t.Errorf("audit log lacks the refusal:\n%s", data)
	}
	for _, tok := range toks {
		if strings.Contains(string(data), tok) {
			t.Error("a token is in the audit log")
		}
	}
}

// testCA is a throwaway certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "berth test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

var serial int64 = 100

// issue makes a leaf certificate: a server certificate for 127.0.0.1 and
// localhost when cn is "server", else a client certificate.
func (ca *testCA) issue(t *testing.T, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if cn == "server" {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// serverCert writes a server certificate and key for 127.0.0.1 signed by
// a new CA, and returns their files and the CA.
func serverCert(t *testing.T) (certFile, keyFile string, ca *testCA) {
	t.Helper()
	ca = newCA(t)
	c := ca.issue(t, "server")
	keyDER, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Certificate[0]}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	return certFile, keyFile, ca
}
