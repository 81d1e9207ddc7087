package network

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/berthd/berth/api"
	"github.com/berthd/berth/internal/fileutil"
)

// Attach gives a workload its place on the network. It is safe to repeat
// and to interrupt at any point (the agent may be killed inside it, or
// between it and the task's start):
//
//   - The intent is recorded before anything is made, so every crash
//     leaves a record to tear down from.
//   - A complete attachment that is still healthy (its namespace mounted,
//     CNI CHECK passing) for the same kind and ports is returned as it is.
//   - Anything else recorded for id (a half-made attachment, or one whose
//     kernel objects a reboot took) is torn down first and made afresh.
func (m *Manager) Attach(ctx context.Context, id string, kind Kind, ports []api.PortMapping) (*Attachment, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	if kind != KindNetns && kind != KindTap {
		return nil, fmt.Errorf("attach %s: unknown attachment kind %q", id, kind)
	}
	defer m.ids.lock(id)()
	a := &Attachment{ID: id, Kind: kind, Network: m.cfg.Name, State: StateAttaching, Bridge: m.cfg.Bridge, Ports: ports, DNS: m.cfg.DNS}
	if kind == KindNetns {
		a.Netns = m.netnsPath(id)
	} else {
		a.MAC = macFor(id)
		if err := m.ensureBridge(); err != nil {
			return nil, err
		}
	}

	prev, err := m.load(id)
	switch {
	case err == nil:
		if m.reusable(ctx, prev, kind, ports) {
			if !slices.Equal(prev.DNS, m.cfg.DNS) {
				prev.DNS = m.cfg.DNS
				if err := fileutil.WriteJSON(m.recordPath(id), prev); err != nil {
					return nil, err
				}
			}
			return prev, nil
		}
		if err := m.teardown(ctx, prev); err != nil {
			return nil, fmt.Errorf("attach %s: tear down what an earlier attach left: %w", id, err)
		}
	case errors.Is(err, os.ErrNotExist):
		// No record: nothing should exist, but a namespace file, a lease
		// or a CNI cache entry left by other means would make this attach
		// fail (EEXIST, "duplicate allocation").
		if m.hasStrays(a) {
			if err := m.teardown(ctx, a); err != nil {
				return nil, fmt.Errorf("attach %s: tear down leftovers: %w", id, err)
			}
		}
	default:
		return nil, err
	}

	// The intent: from here on, whatever happens, Detach finds a record.
	if err := fileutil.WriteJSON(m.recordPath(id), a); err != nil {
		return nil, err
	}
	m.crash("recorded")
	if kind == KindNetns {
		if err := createNetnsFile(a.Netns); err != nil {
			return m.undo(ctx, a, err)
		}
		m.crash("netns-file")
		if err := pinNetns(a.Netns); err != nil {
			return m.undo(ctx, a, err)
		}
		m.crash("netns-pinned")
	}
	list, err := m.list(a)
	if err != nil {
		return m.undo(ctx, a, err)
	}
	res, err := m.cni.AddNetworkList(ctx, list, m.runtimeConf(a))
	if err != nil {
		return m.undo(ctx, a, fmt.Errorf("attach %s to network %s: %w", id, m.cfg.Name, err))
	}
	m.crash("cni-added")
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return m.undo(ctx, a, err)
	}
	for _, ip := range r.IPs {
		if addr, ok := netip.AddrFromSlice(ip.Address.IP.To4()); ok {
			ones, _ := ip.Address.Mask.Size()
			a.Address = netip.PrefixFrom(addr, ones)
			a.Gateway = m.gateway
			if gw, ok := netip.AddrFromSlice(ip.Gateway.To4()); ok {
				a.Gateway = gw
			}
			break
		}
	}
	if !a.Address.IsValid() {
		return m.undo(ctx, a, fmt.Errorf("attach %s: the IPAM plugin returned no IPv4 address", id))
	}
	for _, iface := range r.Interfaces {
		if iface.Sandbox == "" && iface.Name != a.Bridge && iface.Mac != "" {
			a.HostVeth = iface.Name
		}
	}
	a.State = StateAttached
	// Not synced: the intent above is on disk, and after a power loss
	// (which takes the namespace, the veth and the rules with it) the
	// teardown from the intent releases what is left (the lease); after a
	// crash of the agent alone the page cache still has this record.
	if err := fileutil.ReplaceJSON(m.recordPath(id), a); err != nil {
		return m.undo(ctx, a, err)
	}
	m.crash("attached")
	return a, nil
}

// undo tears down a failed attach. It is called explicitly on each error
// path, never deferred: a crash (which runs no defers) must be recovered
// from the record like any other.
func (m *Manager) undo(ctx context.Context, a *Attachment, err error) (*Attachment, error) {
	ctx = context.WithoutCancel(ctx)
	if derr := m.teardown(ctx, a); derr != nil {
		return nil, errors.Join(err, fmt.Errorf("undo: %w", derr))
	}
	if rerr := os.Remove(m.recordPath(a.ID)); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return nil, errors.Join(err, fmt.Errorf("undo: %w", rerr))
	}
	return nil, err
}

// reusable reports whether a recorded attachment can serve the attach
// asked for as it is.
func (m *Manager) reusable(ctx context.Context, a *Attachment, kind Kind, ports []api.PortMapping) bool {
	if !a.complete() || a.Kind != kind || a.Network != m.cfg.Name || a.Bridge != m.cfg.Bridge ||
		!m.subnet.Contains(a.Address.Addr()) || !samePorts(a.Ports, ports) {
		return false
	}
	if kind == KindNetns && !isNetns(a.Netns) {
		return false
	}
	if kind == KindTap && m.ensureBridge() != nil {
		return false
	}
	// CHECK runs the plugins against the cached result: the interface and
	// its address in the namespace, the lease, the firewall rules.
	check := m.ctrCheck
	if kind == KindTap {
		check = m.vmCheck
	}
	if m.cni.CheckNetworkList(ctx, check, m.runtimeConf(a)) != nil {
		return false
	}
	return len(ports) == 0 || portsPresent(a.Network, a.ID)
}

func samePorts(a, b []api.PortMapping) bool {
	norm := func(p api.PortMapping) api.PortMapping {
		if p.Protocol == "" {
			p.Protocol = "tcp"
		}
		return p
	}
	return slices.EqualFunc(a, b, func(x, y api.PortMapping) bool { return norm(x) == norm(y) })
}

// ErrRepeatedFailure marks a Detach that failed for the same reason as
// the attempt before it, so a caller that retries reports a failure once.
var ErrRepeatedFailure = errors.New("network: detach failed again for the same reason")

type repeatedError struct{ err error }

func (e *repeatedError) Error() string   { return e.err.Error() }
func (e *repeatedError) Unwrap() []error { return []error{e.err, ErrRepeatedFailure} }

// Detach undoes an attachment, however far it got and whatever is left of
// it: CNI DEL, then berth's own sweep of what DEL may have missed (see
// teardown), then the record. It is idempotent: detaching what is not
// attached does nothing. When it fails, the record stays, with the reason,
// for the next try; a next failure for the same reason also matches
// ErrRepeatedFailure.
func (m *Manager) Detach(ctx context.Context, id string) error {
	_, err := m.DetachUnused(ctx, id, nil)
	return err
}

// DetachUnused is Detach unless inUse, asked while no attach or detach of
// id can run, says the attachment serves a workload: a caller that
// releases what no workload owns cannot race an attach that is making it
// anew. It reports whether there was an attachment and it is gone.
func (m *Manager) DetachUnused(ctx context.Context, id string, inUse func() bool) (bool, error) {
	if checkID(id) != nil {
		return false, nil // no such id was ever attached
	}
	defer m.ids.lock(id)()
	if inUse != nil && inUse() {
		return false, nil
	}
	a, err := m.load(id)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := m.teardown(ctx, a); err != nil {
		err = fmt.Errorf("detach %s: %w", id, err)
		if err.Error() == a.DetachError {
			return false, &repeatedError{err}
		}
		a.DetachError = err.Error()
		if werr := fileutil.WriteJSON(m.recordPath(id), a); werr != nil {
			err = errors.Join(err, werr)
		}
		return false, err
	}
	if err := os.Remove(m.recordPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("detach %s: %w", id, err)
	}
	return true, fileutil.SyncDir(m.recDir)
}

// load reads id's record. A record is replaced atomically, so one that
// does not decode was damaged from outside; it stands for a half-made
// attachment of the network of the day so it can still be torn down.
func (m *Manager) load(id string) (*Attachment, error) {
	var a Attachment
	err := fileutil.ReadJSON(m.recordPath(id), &a)
	if errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if err != nil {
		a = Attachment{ID: id, Kind: KindTap, State: StateAttaching, Bridge: m.cfg.Bridge}
		if _, serr := os.Lstat(m.netnsPath(id)); serr == nil {
			a.Kind, a.Netns = KindNetns, m.netnsPath(id)
		}
	}
	a.ID = id
	if a.Network == "" {
		a.Network = m.cfg.Name
	}
	return &a, nil
}

// hasStrays reports whether anything of id exists without a record.
func (m *Manager) hasStrays(a *Attachment) bool {
	if a.Netns != "" {
		if _, err := os.Lstat(a.Netns); err == nil {
			return true
		}
	}
	if _, err := os.Lstat(m.cachePath(a)); err == nil {
		return true
	}
	leases, _ := m.leasesOf(a.Network, a.ID)
	return len(leases) > 0
}

// teardown removes everything an attachment may have made, at whatever
// step it stopped and whatever a reboot took since. First CNI DEL: given
// the namespace only when the file is one (after a reboot the file stays
// but its bind mount is gone, and plugins given a plain file fail with
// "unknown FS magic"; without a namespace they release what they can: the
// address, the port and firewall rules). Then, whatever DEL did or could
// not do, berth removes from what is recorded: the iptables chains named
// after the id and every rule jumping to them or naming one of its
// addresses, its leases, the host's end of its veth, the namespace, the
// CNI cache entry. A DEL error is only returned if something is left.
func (m *Manager) teardown(ctx context.Context, a *Attachment) error {
	list, err := m.list(a)
	if err != nil {
		return err
	}
	// Learn the addresses before DEL releases the leases that name them,
	// and keep them in the record: a crash after DEL must not lose the
	// address the firewall rules name.
	addrs := m.addressesOf(a, list)
	if !a.Address.IsValid() && len(addrs) > 0 {
		a.Address = netip.PrefixFrom(addrs[0], m.subnet.Bits())
		if err := fileutil.WriteJSON(m.recordPath(a.ID), a); err != nil {
			return err
		}
	}
	rt := m.runtimeConf(a)
	if a.Kind == KindNetns && !isNetns(a.Netns) {
		rt.NetNS = ""
	}
	delErr := m.cni.DelNetworkList(ctx, list, rt)
	if delErr != nil {
		delErr = fmt.Errorf("CNI DEL on network %s: %w", a.Network, delErr)
		if ctx.Err() != nil {
			return delErr
		}
	}
	m.crash("teardown:cni-del")
	var errs []error
	if err := m.sweepRules(a.Network, a.ID, addrs); err != nil {
		errs = append(errs, err)
	}
	m.crash("teardown:rules")
	if err := m.releaseLeases(a.Network, a.ID); err != nil {
		errs = append(errs, err)
	}
	if a.HostVeth != "" {
		if err := deleteLink(a.HostVeth, a.Bridge); err != nil {
			errs = append(errs, err)
		}
	}
	if a.Kind == KindNetns && a.Netns != "" {
		if err := removeNetns(a.Netns); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(m.cachePath(a)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove CNI cache entry: %w", err))
	}
	m.crash("teardown:done")
	if len(errs) > 0 {
		return errors.Join(append(errs, delErr)...)
	}
	return nil
}

// addressesOf is every address the attachment may hold: the recorded one,
// those its leases name, and those in CNI's cached result (an attach that
// stopped before its final record knows its address only there).
func (m *Manager) addressesOf(a *Attachment, list *libcni.NetworkConfigList) []netip.Addr {
	var out []netip.Addr
	add := func(ip netip.Addr) {
		if ip.IsValid() && !slices.Contains(out, ip) {
			out = append(out, ip)
		}
	}
	if a.Address.IsValid() {
		add(a.Address.Addr())
	}
	leases, _ := m.leasesOf(a.Network, a.ID)
	for _, ip := range leases {
		add(ip)
	}
	for _, ip := range m.cachedAddresses(list, a) {
		add(ip)
	}
	return out
}

// netnsPath is where id's namespace is pinned.
func (m *Manager) netnsPath(id string) string { return filepath.Join(m.nsDir, id) }

// crash is where a test stops Attach or Detach as a SIGKILL would.
func (m *Manager) crash(point string) {
	if m.crashAt != nil {
		m.crashAt(point)
	}
}

// checkID refuses ids that cannot name files and CNI containers (CNI
// wants [a-zA-Z0-9][a-zA-Z0-9_.-]*).
func checkID(id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("network: invalid workload id %q", id)
	}
	for i, c := range id {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '-' && c != '_' && c != '.') {
			return fmt.Errorf("network: invalid workload id %q", id)
		}
	}
	return nil
}

// idLocks serializes the attaches and detaches of one id; different ids
// proceed in parallel.
type idLocks struct {
	mu sync.Mutex
	m  map[string]*idLock
}

type idLock struct {
	mu   sync.Mutex
	refs int
}

// lock locks id and returns its unlock.
func (l *idLocks) lock(id string) func() {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[string]*idLock{}
	}
	e := l.m[id]
	if e == nil {
		e = &idLock{}
		l.m[id] = e
	}
	e.refs++
	l.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		l.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(l.m, id)
		}
		l.mu.Unlock()
	}
}
