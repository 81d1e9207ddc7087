package vmdriver

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"strings"
	"sync"

	"libvirt.org/go/libvirt"

	"github.com/berthd/berth/errdefs"
)

// hypervisor is the driver's one libvirt connection. libvirtd may restart
// under the agent (an upgrade, a crash): a call that fails on a dead
// connection drops it, opens a new one and is retried once, so a restart
// costs one failed RPC, not a broken driver.
type hypervisor struct {
	uri string

	mu   sync.Mutex
	conn *libvirt.Connect
}

// connect returns a live connection, opening one when there is none or the
// current one is known dead.
func (h *hypervisor) connect() (*libvirt.Connect, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn != nil {
		if alive, err := h.conn.IsAlive(); err == nil && alive {
			return h.conn, nil
		}
		h.conn.Close()
		h.conn = nil
	}
	c, err := libvirt.NewConnect(h.uri)
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w: %w", h.uri, lvError(err), errdefs.ErrUnavailable)
	}
	h.conn = c
	return c, nil
}

// drop forgets c if it is still the current connection.
func (h *hypervisor) drop(c *libvirt.Connect) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == c {
		h.conn.Close()
		h.conn = nil
	}
}

func (h *hypervisor) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn != nil {
		h.conn.Close()
		h.conn = nil
	}
}

// do runs fn on a live connection, reconnecting and retrying once when the
// connection turns out to be dead.
func (h *hypervisor) do(ctx context.Context, fn func(c *libvirt.Connect) error) error {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		c, err := h.connect()
		if err != nil {
			return err
		}
		err = fn(c)
		if err == nil || !isConnError(err) || attempt > 0 {
			return err
		}
		h.drop(c)
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
	var alive bool
	err := d.hv.do(ctx, func(c *libvirt.Connect) error {
		dom, err := d.lookup(c, id)
		if err != nil {
			return err
		}
		if dom != nil {
			alive = true
			dom.Free()
		}
		return nil
	})
	return alive, err
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
	var ids []string
	err := d.hv.do(ctx, func(c *libvirt.Connect) error {
		ids = ids[:0]
		doms, err := c.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
		if err != nil {
			return err
		}
		for i := range doms {
			if id, ok, _ := d.owned(&doms[i]); ok {
				ids = append(ids, id)
			}
			doms[i].Free()
		}
		return nil
	})
	return ids, err
}
