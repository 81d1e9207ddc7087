package vmdriver

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/errdefs"
)

// Bounds on libvirt calls. libvirt's C calls block their thread and know
// nothing of ctx, and a hung libvirtd (frozen, deadlocked, swapped out)
// never answers them: every call runs in a goroutine of its own, so the
// caller returns when its ctx ends whatever libvirt does.
const (
	// defaultCallTimeout bounds a call whose ctx has no deadline.
	defaultCallTimeout = 30 * time.Second
	// dialWait bounds opening a connection: a frozen libvirtd still has
	// its socket accept connections (the kernel does that) and never
	// answers the open.
	dialWait = 5 * time.Second
	// stallAfter: a connection on which a call has waited this long while
	// no call was answered is suspect; the next call first pings libvirtd
	// (at most one ping at a time) and fails fast unless the ping answers
	// within pingWait. A libvirtd busy with one slow call (a domain start,
	// a destroy) still answers the ping; a hung one answers nothing, and
	// calls fail fast instead of piling up behind the stuck one.
	stallAfter = 2 * time.Second
	pingWait   = 2 * time.Second
)

// hypervisor is the driver's one libvirt connection. libvirtd may restart
// under the agent (an upgrade, a crash): a call that fails on a dead
// connection drops it, opens a new one and is retried once, so a restart
// costs one failed RPC, not a broken driver; libvirt's event loop notices
// a closed socket by itself and the close callback drops the connection.
// libvirtd may also hang: then calls end with their ctx (or
// defaultCallTimeout) and, once a call is seen stuck, later ones fail fast
// (awaitAnswer); h.mu is never held across a libvirt call. The calls stuck
// on a hung libvirtd return when it answers again (the connection is then
// usable as before) or dies (they fail and the connection is dropped).
//
// There is deliberately no client keepalive (virConnectSetKeepAlive):
// with libvirt 9.0, when keepalive closes a connection on which two calls
// wait, the first fails but the second never returns, and crashes the
// process (SIGSEGV in virConnectGetLibVersion) when libvirtd resumes; seen
// with a SIGSTOPped private libvirtd. Without keepalive, both return with
// libvirtd's answer once it resumes, or an error once it dies.
type hypervisor struct {
	uri string

	mu   sync.Mutex
	cur  *hvConn // the connection calls use; nil when there is none
	dial *hvDial // the connection being opened, if any
	seq  uint64  // call ids
}

// hvConn is one libvirt connection and the calls in flight on it. Its
// fields other than c are guarded by hypervisor.mu.
type hvConn struct {
	c        *libvirt.Connect
	calls    map[uint64]time.Time // in flight, by start time
	answered time.Time            // when libvirtd last answered a call
	ping     *hvPing              // the liveness ping in flight, if any
	dead     bool                 // dropped; closed once no call uses it
	closed   chan struct{}        // closed when c has been closed
	closing  bool
}

type hvDial struct {
	start time.Time
	done  chan struct{}
	conn  *hvConn // set before done is closed
	err   error
}

type hvPing struct {
	start time.Time
	done  chan struct{}
	err   error // set before done is closed
}

// eventLoop is libvirt's default event loop, registered once per process
// before the driver's first connection: without it, libvirt notices a
// connection's end only in a call, and never calls the close callback;
// it also answers libvirtd's keepalive pings to an idle connection.
var eventLoop struct {
	once sync.Once
	err  error
}

func startEventLoop() error {
	eventLoop.once.Do(func() {
		if err := libvirt.EventRegisterDefaultImpl(); err != nil {
			eventLoop.err = err
			return
		}
		go func() {
			for {
				if err := libvirt.EventRunDefaultImpl(); err != nil {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	})
	return eventLoop.err
}

// connect returns a live connection, opening one when there is none,
// within dialWait. Start uses it to fail fast when libvirt is unreachable.
func (h *hypervisor) connect() (*libvirt.Connect, error) {
	ctx, cancel := context.WithTimeout(context.Background(), dialWait)
	defer cancel()
	hc, err := h.get(ctx)
	if err != nil {
		return nil, err
	}
	return hc.c, nil
}

// get returns the current connection or waits for one to open: until ctx
// ends or the open has taken dialWait, whichever comes first. A caller
// that finds an open already older than dialWait fails at once.
func (h *hypervisor) get(ctx context.Context) (*hvConn, error) {
	h.mu.Lock()
	if hc := h.cur; hc != nil {
		h.mu.Unlock()
		return hc, nil
	}
	d := h.dial
	if d == nil {
		d = &hvDial{start: time.Now(), done: make(chan struct{})}
		h.dial = d
		go h.open(d)
	}
	h.mu.Unlock()
	left := time.Until(d.start.Add(dialWait))
	if left <= 0 {
		return nil, h.notAccepting()
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-d.done:
		return d.conn, d.err
	case <-t.C:
		return nil, h.notAccepting()
	case <-ctx.Done():
		return nil, fmt.Errorf("connect to libvirt at %s: libvirtd did not answer within %s: %w: %w",
			h.uri, time.Since(d.start).Round(100*time.Millisecond), ctx.Err(), errdefs.ErrUnavailable)
	}
}

func (h *hypervisor) notAccepting() error {
	return fmt.Errorf("connect to libvirt at %s: libvirtd did not answer the connection within %s (hung?): %w",
		h.uri, dialWait, errdefs.ErrUnavailable)
}

// open opens a connection for d. It may block as long as libvirtd does;
// callers wait for it only as long as get lets them.
func (h *hypervisor) open(d *hvDial) {
	var hc *hvConn
	err := startEventLoop()
	if err != nil {
		err = fmt.Errorf("register libvirt's event loop: %w", lvError(err))
	}
	var c *libvirt.Connect
	if err == nil {
		c, err = libvirt.NewConnect(h.uri)
	}
	if err != nil {
		err = fmt.Errorf("connect to libvirt at %s: %w: %w", h.uri, lvError(err), errdefs.ErrUnavailable)
	} else {
		hc = &hvConn{c: c, calls: map[uint64]time.Time{}, answered: time.Now(), closed: make(chan struct{})}
		_ = c.RegisterCloseCallback(func(*libvirt.Connect, libvirt.ConnectCloseReason) { h.drop(hc) })
	}
	h.mu.Lock()
	h.dial = nil
	if hc != nil {
		h.cur = hc
	}
	d.conn, d.err = hc, err
	h.mu.Unlock()
	close(d.done)
}

// drop forgets hc if it is still the current connection; it is closed
// once no call uses it.
func (h *hypervisor) drop(hc *hvConn) {
	h.mu.Lock()
	closeNow := h.dropLocked(hc)
	h.mu.Unlock()
	if closeNow {
		go hc.close()
	}
}

// dropLocked marks hc dead and reports whether the caller should close it
// now (no call in flight, not closing yet).
func (h *hypervisor) dropLocked(hc *hvConn) bool {
	if h.cur == hc {
		h.cur = nil
	}
	hc.dead = true
	if hc.closing || len(hc.calls) > 0 {
		return false
	}
	hc.closing = true
	return true
}

// close drops the connection (the driver is closing). It waits a little
// for an idle connection to close; one with calls stuck in flight closes
// when they return.
func (h *hypervisor) close() {
	h.mu.Lock()
	hc := h.cur
	closeNow := hc != nil && h.dropLocked(hc)
	h.mu.Unlock()
	if !closeNow {
		return
	}
	go hc.close()
	select {
	case <-hc.closed:
	case <-time.After(pingWait):
	}
}

// close closes the libvirt connection. virConnectClose asks libvirtd, so
// it runs outside h.mu and may take as long as libvirtd does.
func (hc *hvConn) close() {
	_ = hc.c.UnregisterCloseCallback()
	_, _ = hc.c.Close()
	close(hc.closed)
}

// begin registers a call in flight on hc; the caller holds h.mu.
func (h *hypervisor) beginLocked(hc *hvConn, start time.Time) uint64 {
	h.seq++
	hc.calls[h.seq] = start
	return h.seq
}

// end unregisters a call that returned err: an answer from libvirtd,
// unless it is a connection error, which drops the connection.
func (h *hypervisor) end(hc *hvConn, id uint64, err error) {
	h.mu.Lock()
	delete(hc.calls, id)
	closeNow := false
	if err != nil && isConnError(err) {
		closeNow = h.dropLocked(hc)
	} else {
		hc.answered = time.Now()
		if hc.dead && !hc.closing && len(hc.calls) == 0 {
			hc.closing, closeNow = true, true
		}
	}
	h.mu.Unlock()
	if closeNow {
		go hc.close()
	}
}

// awaitAnswer lets a call through when libvirtd looks alive on hc. When a
// call has been stuck for stallAfter with no answer since, it pings
// libvirtd (one ping at a time, shared by every caller) and fails fast
// unless the ping answers within pingWait of its start.
func (h *hypervisor) awaitAnswer(ctx context.Context, hc *hvConn) error {
	h.mu.Lock()
	now := time.Now()
	var oldest time.Time
	for _, t := range hc.calls {
		if oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
	}
	if oldest.IsZero() || now.Sub(oldest) < stallAfter || now.Sub(hc.answered) < stallAfter {
		h.mu.Unlock()
		return nil
	}
	p := hc.ping
	if p == nil {
		p = &hvPing{start: now, done: make(chan struct{})}
		hc.ping = p
		id := h.beginLocked(hc, now)
		go func() {
			_, err := hc.c.GetLibVersion()
			h.mu.Lock()
			hc.ping, p.err = nil, err
			h.mu.Unlock()
			h.end(hc, id, err)
			close(p.done)
		}()
	}
	h.mu.Unlock()
	// The message is the same however long libvirtd hangs: node status
	// shows it, and a change there is an event.
	stuck := func() error {
		return fmt.Errorf("libvirtd at %s is not answering (hung?): a call has waited more than %s, and a ping got no answer within %s: %w",
			h.uri, stallAfter, pingWait, errdefs.ErrUnavailable)
	}
	left := time.Until(p.start.Add(pingWait))
	if left <= 0 {
		return stuck()
	}
	t := time.NewTimer(left)
	defer t.Stop()
	select {
	case <-p.done:
		if p.err != nil && isConnError(p.err) {
			return p.err
		}
		return nil
	case <-t.C:
		return stuck()
	case <-ctx.Done():
		return h.noAnswer(ctx, time.Since(now))
	}
}

func (h *hypervisor) noAnswer(ctx context.Context, waited time.Duration) error {
	return fmt.Errorf("libvirtd at %s did not answer within %s: %w: %w",
		h.uri, waited.Round(100*time.Millisecond), context.Cause(ctx), errdefs.ErrUnavailable)
}

// call runs fn on hc in a goroutine of its own and returns when fn does or
// ctx ends. An abandoned fn runs on until libvirt returns (libvirtd
// answers or dies) and its connection stays open until then.
func (h *hypervisor) call(ctx context.Context, hc *hvConn, fn func(c *libvirt.Connect) error) error {
	start := time.Now()
	h.mu.Lock()
	id := h.beginLocked(hc, start)
	h.mu.Unlock()
	type result struct {
		err      error
		panicked any
	}
	done := make(chan result, 1)
	go func() {
		var r result
		func() {
			defer func() { r.panicked = recover() }()
			r.err = fn(hc.c)
		}()
		h.end(hc, id, r.err)
		done <- r
	}()
	select {
	case r := <-done:
		if r.panicked != nil {
			panic(r.panicked)
		}
		return r.err
	case <-ctx.Done():
		return h.noAnswer(ctx, time.Since(start))
	}
}

// do runs fn on a live connection, reconnecting and retrying once when the
// connection turns out to be dead. It returns when ctx ends (after
// defaultCallTimeout when ctx has no deadline) even if libvirtd never
// answers; fn may then still be running, so fn must not publish what it
// learns anywhere the caller reads after a failed do.
func (h *hypervisor) do(ctx context.Context, fn func(c *libvirt.Connect) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultCallTimeout)
		defer cancel()
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		hc, err := h.get(ctx)
		if err != nil {
			return err
		}
		err = h.awaitAnswer(ctx, hc)
		if err == nil {
			err = h.call(ctx, hc, fn)
		}
		if err == nil || !isConnError(err) || attempt > 0 {
			return err
		}
	}
}

// isConnError reports whether err means the connection itself is broken
// (libvirtd restarted or went away), not that the request failed.
func isConnError(err error) bool {
	var le libvirt.Error
	if !errors.As(err, &le) {
		return false
	}
	switch le.Code {
	case libvirt.ERR_NO_CONNECT, libvirt.ERR_INVALID_CONN, libvirt.ERR_RPC:
		return true
	}
	return le.Domain == libvirt.FROM_RPC
}

func isNoDomain(err error) bool {
	var le libvirt.Error
	return errors.As(err, &le) && le.Code == libvirt.ERR_NO_DOMAIN
}

// isNotRunning reports errors of operations on a domain that has just
// ended (it was running when looked up).
func isNotRunning(err error) bool {
	var le libvirt.Error
	return errors.As(err, &le) && (le.Code == libvirt.ERR_NO_DOMAIN || le.Code == libvirt.ERR_OPERATION_INVALID)
}

// libvirtErr shows a libvirt error by its message instead of the bindings'
// "virError(Code=.., Domain=.., Message=..)", keeping it for errors.As.
type libvirtErr struct{ e libvirt.Error }

func (e libvirtErr) Error() string { return e.e.Message }
func (e libvirtErr) Unwrap() error { return e.e }

func lvError(err error) error {
	if le, ok := err.(libvirt.Error); ok {
		return libvirtErr{le}
	}
	return err
}

// owned reports whether dom is one of this driver's domains: its name has
// the driver's prefix and its berth metadata names the driver's root. It
// returns the task id. gone reports a domain that ended while we looked.
func (d *Driver) owned(dom *libvirt.Domain) (id string, ok, gone bool) {
	name, err := dom.GetName()
	if err != nil {
		return "", false, isNotRunning(err)
	}
	if !strings.HasPrefix(name, d.opts.DomainPrefix) {
		return "", false, false
	}
	raw, err := dom.GetMetadata(libvirt.DOMAIN_METADATA_ELEMENT, metadataNS, libvirt.DOMAIN_AFFECT_LIVE)
	if err != nil {
		if active, aerr := dom.IsActive(); isNotRunning(err) || (aerr == nil && !active) || isNotRunning(aerr) {
			return "", false, true
		}
		return "", false, false
	}
	var m domainMeta
	if xml.Unmarshal([]byte(raw), &m) != nil || m.Root != d.opts.Root || m.ID == "" || name != d.domainName(m.ID) {
		return "", false, false
	}
	return m.ID, true, false
}

// lookup returns the task's domain if it exists and is this driver's; nil
// and no error when there is none.
func (d *Driver) lookup(c *libvirt.Connect, id string) (*libvirt.Domain, error) {
	dom, err := c.LookupDomainByName(d.domainName(id))
	if err != nil {
		if isNoDomain(err) {
			return nil, nil
		}
		return nil, err
	}
	_, ok, gone := d.owned(dom)
	if gone {
		dom.Free()
		return nil, nil
	}
	if !ok {
		dom.Free()
		return nil, fmt.Errorf("domain %s exists but is not a berth task of %s; not touching it: %w",
			d.domainName(id), d.opts.Root, errdefs.ErrFailedPrecondition)
	}
	return dom, nil
}

// domainAlive reports whether the task's domain exists.
func (d *Driver) domainAlive(ctx context.Context, id string) (bool, error) {
	return call(ctx, d.hv, func(c *libvirt.Connect) (bool, error) {
		dom, err := d.lookup(c, id)
		if err != nil || dom == nil {
			return false, err
		}
		dom.Free()
		return true, nil
	})
}

// destroyDomain forces the task's domain off. A domain already gone is not
// an error.
func (d *Driver) destroyDomain(ctx context.Context, id string) error {
	return d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil || dom == nil {
			return err
		}
		defer dom.Free()
		if err := dom.Destroy(); err != nil && !isNotRunning(err) {
			return fmt.Errorf("destroy domain %s: %w", d.domainName(id), lvError(err))
		}
		return nil
	})
}

// ownedDomains lists the ids of this driver's running domains.
func (d *Driver) ownedDomains(ctx context.Context) ([]string, error) {
	return call(ctx, d.hv, func(c *libvirt.Connect) ([]string, error) {
		doms, err := c.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
		if err != nil {
			return nil, err
		}
		var ids []string
		for i := range doms {
			if id, ok, _ := d.owned(&doms[i]); ok {
				ids = append(ids, id)
			}
			doms[i].Free()
		}
		return ids, nil
	})
}
