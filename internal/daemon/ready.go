package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/berthd/berth/internal/sdnotify"
)

// notifyReady tells the service manager (systemd, Type=notify) that the
// agent is ready once its API answers a request on one of its own
// listeners; it gives up when ctx ends.
func (d *Daemon) notifyReady(ctx context.Context) {
	if err := d.awaitAnswering(ctx); err != nil {
		return // shutting down before it answered
	}
	sent, err := sdnotify.Notify(sdnotify.Ready, sdnotify.Status("serving the API on "+d.Addr()))
	switch {
	case err != nil:
		d.log.Warn("tell the service manager the agent is ready", "err", err)
	case sent:
		d.log.Info("told the service manager the agent is ready")
	}
}

// notifyStopping tells the service manager the agent is shutting down.
func (d *Daemon) notifyStopping() {
	if _, err := sdnotify.Notify(sdnotify.Stopping); err != nil {
		d.log.Warn("tell the service manager the agent is stopping", "err", err)
	}
}

// awaitAnswering returns once GET /healthz gets an answer through a real
// connection to one of the agent's listeners: the unix socket if there is
// one, else the TCP address (over TLS when it has TLS; a TLS alert for
// the client certificate this probe does not have is an answer too).
func (d *Daemon) awaitAnswering(ctx context.Context) error {
	tr := &http.Transport{DisableKeepAlives: true}
	url := ""
	switch {
	case d.unixLn != nil:
		path := d.unixLn.Addr().String()
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", path)
		}
		url = "http://berth/healthz"
	case d.ln != nil && d.tlsConf == nil:
		url = "http://" + d.ln.Addr().String() + "/healthz"
	case d.ln != nil:
		// It talks to its own listener: there is nothing to verify.
		tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec
		url = "https://" + d.ln.Addr().String() + "/healthz"
	default:
		return errors.New("no listener")
	}
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	defer tr.CloseIdleConnections()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			return nil
		}
		var alert tls.AlertError
		if errors.As(err, &alert) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the API did not answer: %w", ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
