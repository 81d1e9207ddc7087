package network

import (
	"crypto/sha512"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"golang.org/x/sys/unix"
)

// What CNI leaves on the host for an attachment, and how berth finds it
// from a record alone when CNI DEL cannot (a namespace a reboot took, a
// cache an interrupted ADD never wrote):
//
//   - host-local leases: one file per address under <ipam>/<network>/,
//     holding "<id>\r\n<ifname>";
//   - the bridge plugin's masquerade chain and the portmap plugin's DNAT
//     chain in the nat table, named "CNI-" or "CNI-DN-" plus a hash of
//     network name and id, and the rules jumping to them;
//   - the firewall plugin's two rules per address in CNI-FORWARD, which
//     name the address only (the cached result is how its DEL finds them).

// cachePath is libcni's cached result of the attachment.
func (m *Manager) cachePath(a *Attachment) string {
	return filepath.Join(m.cacheDir(), "results", a.Network+"-"+a.ID+"-"+ifName)
}

// cachedAddresses are the addresses in CNI's cached result, if any.
func (m *Manager) cachedAddresses(list *libcni.NetworkConfigList, a *Attachment) []netip.Addr {
	res, err := m.cni.GetNetworkListCachedResult(list, m.runtimeConf(a))
	if err != nil || res == nil {
		return nil
	}
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, ip := range r.IPs {
		if addr, ok := netip.AddrFromSlice(ip.Address.IP.To4()); ok {
			out = append(out, addr)
		}
	}
	return out
}

// leaseDir is host-local's directory for network name.
func (m *Manager) leaseDir(name string) string { return filepath.Join(m.ipamDir(), name) }

// leaseHolder is the id a lease file names.
func leaseHolder(data []byte) string {
	id, _, _ := strings.Cut(strings.TrimSpace(string(data)), "\r\n")
	return strings.TrimSpace(id)
}

// leasesOf returns the addresses host-local leased to id on network name.
func (m *Manager) leasesOf(name, id string) ([]netip.Addr, error) {
	entries, err := os.ReadDir(m.leaseDir(name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, e := range entries {
		ip, err := netip.ParseAddr(e.Name())
		if err != nil || !e.Type().IsRegular() {
			continue
		}
		data, err := os.ReadFile(filepath.Join(m.leaseDir(name), e.Name()))
		if err == nil && leaseHolder(data) == id {
			out = append(out, ip)
		}
	}
	return out, nil
}

// leaseOwner returns who holds ip on network name, if anyone.
func (m *Manager) leaseOwner(name string, ip netip.Addr) (string, bool) {
	data, err := os.ReadFile(filepath.Join(m.leaseDir(name), ip.String()))
	if err != nil {
		return "", false
	}
	return leaseHolder(data), true
}

// releaseLeases removes id's leases on network name, under host-local's
// own lock so no allocation runs meanwhile.
func (m *Manager) releaseLeases(name, id string) error {
	dir := m.leaseDir(name)
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDONLY|os.O_CREATE, 0o644)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no lease was ever taken on this network
	}
	if err != nil {
		return fmt.Errorf("release leases of %s: %w", id, err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("release leases of %s: lock %s: %w", id, dir, err)
	}
	defer unix.Flock(int(lock.Fd()), unix.LOCK_UN)
	ips, err := m.leasesOf(name, id)
	if err != nil {
		return fmt.Errorf("release leases of %s: %w", id, err)
	}
	for _, ip := range ips {
		if err := os.Remove(filepath.Join(dir, ip.String())); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("release lease %s of %s: %w", ip, id, err)
		}
	}
	return nil
}

// chainName is the iptables chain a CNI plugin names after network name
// and container id (containernetworking/plugins pkg/utils).
func chainName(name, id, prefix string) string {
	h := sha512.Sum512([]byte(name + id))
	return fmt.Sprintf("CNI-%s%x", prefix, h)[:28]
}

// sweepRules deletes the iptables rules and chains CNI made for id on
// network name: the chains named after them with every rule jumping there,
// and the firewall plugin's rules naming one of addrs, unless another
// workload now leases that address. It is idempotent.
func (m *Manager) sweepRules(name, id string, addrs []netip.Addr) error {
	ours := []string{chainName(name, id, ""), chainName(name, id, "DN-"), chainName(name, id, "SN-")}
	var last error
	for range 3 {
		var free []string
		for _, ip := range addrs {
			if owner, held := m.leaseOwner(name, ip); !held || owner == id {
				free = append(free, ip.String()+"/32")
			}
		}
		script, err := ruleSweep(ours, free)
		if err != nil || script == "" {
			return err
		}
		cmd := exec.Command("iptables-restore", "-w", "--noflush")
		cmd.Stdin = strings.NewReader(script)
		out, err := cmd.CombinedOutput()
		if err == nil {
			return nil
		}
		// A rule went between reading and writing (another workload's
		// plugins at work): read again.
		last = fmt.Errorf("iptables-restore: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return fmt.Errorf("remove the iptables rules of %s: %w", id, last)
}

// firewallChain is where the firewall plugin puts its rules. Only there
// are rules naming an address deleted: CNI-ADMIN, say, is the operator's.
const firewallChain = "CNI-FORWARD"

// ruleSweep is the iptables-restore script that deletes the rules jumping
// to chains or, in firewallChain, naming one of addrs ("a.b.c.d/32"), then
// the chains.
func ruleSweep(chains, addrs []string) (string, error) {
	var b strings.Builder
	for _, table := range []string{"nat", "filter"} {
		out, err := exec.Command("iptables-save", "-t", table).Output()
		if errors.Is(err, exec.ErrNotFound) {
			return "", nil // no iptables, no rules
		}
		if err != nil {
			return "", fmt.Errorf("iptables-save -t %s: %w", table, err)
		}
		var cmds []string
		var present []string
		for _, line := range strings.Split(string(out), "\n") {
			if decl, ok := strings.CutPrefix(line, ":"); ok {
				if f := strings.Fields(decl); len(f) > 0 && slices.Contains(chains, f[0]) {
					present = append(present, f[0])
				}
				continue
			}
			rule, ok := strings.CutPrefix(line, "-A ")
			if !ok {
				continue
			}
			f := strings.Fields(rule)
			if len(f) == 0 || slices.Contains(chains, f[0]) {
				continue // flushed with its chain
			}
			if mentions(f, chains, nil) || f[0] == firewallChain && mentions(f, nil, addrs) {
				cmds = append(cmds, "-D "+rule)
			}
		}
		for _, c := range present {
			cmds = append(cmds, "-F "+c, "-X "+c)
		}
		if len(cmds) > 0 {
			fmt.Fprintf(&b, "*%s\n%s\nCOMMIT\n", table, strings.Join(cmds, "\n"))
		}
	}
	return b.String(), nil
}

// mentions reports whether a rule's fields jump to one of chains or name
// one of addrs.
func mentions(fields, chains, addrs []string) bool {
	for i, f := range fields {
		if (f == "-j" || f == "-g") && i+1 < len(fields) && slices.Contains(chains, fields[i+1]) {
			return true
		}
		if slices.Contains(addrs, f) {
			return true
		}
	}
	return false
}

// portsPresent reports whether the portmap plugin's DNAT chain for id is
// there and reached.
func portsPresent(name, id string) bool {
	out, err := exec.Command("iptables-save", "-t", "nat").Output()
	if err != nil {
		return false
	}
	dn := chainName(name, id, "DN-")
	declared, reached := false, false
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) > 0 && f[0] == ":"+dn:
			declared = true
		case len(f) > 1 && f[0] == "-A" && f[1] != dn && mentions(f, []string{dn}, nil):
			reached = true
		}
	}
	return declared && reached
}
