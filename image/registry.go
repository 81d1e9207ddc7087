package image

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/berthd/berth/errdefs"
)

// Registries is the operator's choice of the registries pulls may use
// (config keys images.allowed_registries and images.insecure_registries).
//
// A pattern is a host with an optional port: "ghcr.io", "registry.corp:5000",
// "*.corp.example" (a leading "*" label matches any name ending so), "*"
// (any name), an IP address ("10.1.2.3:5000", "[fd00::1]:5000") or an IP
// range in CIDR notation ("10.0.0.0/8"). A pattern without a port matches
// every port. Names are compared as the reference spells them; a CIDR
// matches registries named by an address in it.
//
// Whatever the patterns, this node's own addresses, loopback, link-local
// and unspecified addresses, multicast, and the workload network
// (NodeNetworks) are reached only when a pattern names them explicitly: an
// address, a range holding it, or the exact host name (no wildcard). The
// rule holds for the address a name resolves to when berth connects, for
// redirects and for a registry's token service, so neither "*" nor a name
// that resolves to 127.0.0.1 opens the node's loopback.
type Registries struct {
	// Allowed are the registries pulls may use, over HTTPS. Empty: none.
	Allowed []string
	// Insecure are registries reached over plain HTTP; they need not be
	// listed in Allowed too. Every other registry is spoken to over HTTPS
	// only, loopback ones included.
	Insecure []string
	// NodeNetworks are networks whose addresses count as the node's own,
	// e.g. the workload network's subnet: other tenants' workloads live there.
	NodeNetworks []netip.Prefix
}

// DefaultRegistries lets pulls use any registry over HTTPS, except the
// node's own and special addresses.
var DefaultRegistries = Registries{Allowed: []string{"*"}}

// ValidateRegistryPattern reports what is wrong with a registry pattern.
func ValidateRegistryPattern(p string) error {
	_, err := parsePattern(p)
	return err
}

// pattern is a parsed registry pattern.
type pattern struct {
	raw    string
	host   string       // lower case; "" for a CIDR
	port   string       // "" for any
	addr   netip.Addr   // valid when host is an IP address
	prefix netip.Prefix // valid for a CIDR
}

func (p pattern) wildcard() bool { return strings.Contains(p.host, "*") }

func parsePattern(raw string) (pattern, error) {
	s := strings.TrimSpace(raw)
	if s == "" {
		return pattern{}, errors.New("an empty registry pattern")
	}
	if pfx, err := netip.ParsePrefix(s); err == nil {
		return pattern{raw: raw, prefix: netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()).Masked()}, nil
	}
	if strings.Contains(s, "/") {
		return pattern{}, fmt.Errorf("%q: a registry pattern is host[:port], a CIDR or *, without a scheme or path", raw)
	}
	p := pattern{raw: raw}
	if a, err := netip.ParseAddr(s); err == nil { // a bare IPv6 address
		p.host, p.addr = a.Unmap().String(), a.Unmap()
		return p, nil
	}
	host := s
	if h, port, err := net.SplitHostPort(s); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return pattern{}, fmt.Errorf("%q: port %q is not a number from 1 to 65535", raw, port)
		}
		host, p.port = h, port
	}
	if a, err := netip.ParseAddr(host); err == nil {
		p.host, p.addr = a.Unmap().String(), a.Unmap()
		return p, nil
	}
	host = strings.ToLower(host)
	if host != "*" {
		labels := strings.Split(strings.TrimPrefix(host, "*."), ".")
		for _, l := range labels {
			if l == "" || len(l) > 63 || strings.Trim(l, "abcdefghijklmnopqrstuvwxyz0123456789-_") != "" || l[0] == '-' || l[len(l)-1] == '-' {
				return pattern{}, fmt.Errorf("%q: %q is not a host name (a \"*\" may only stand for whole leading labels, as in *.example.com)", raw, host)
			}
		}
	}
	p.host = host
	return p, nil
}

// matchHost reports whether p matches the registry host[:port] as a
// reference names it.
func (p pattern) matchHost(host, port string) bool {
	if p.port != "" && p.port != port {
		return false
	}
	if a, err := netip.ParseAddr(host); err == nil {
		a = a.Unmap()
		if p.prefix.IsValid() {
			return p.prefix.Contains(a)
		}
		return p.addr.IsValid() && p.addr == a || p.host == "*"
	}
	if p.prefix.IsValid() || p.addr.IsValid() {
		return false
	}
	host = strings.ToLower(host)
	switch {
	case p.host == "*":
		return true
	case strings.HasPrefix(p.host, "*."):
		return strings.HasSuffix(host, p.host[1:])
	default:
		return p.host == host
	}
}

// names reports whether p names the connection to ip (dialled as host) on
// port explicitly: by the address, a range holding it, or the exact name.
func (p pattern) names(host string, ip netip.Addr, port string) bool {
	if p.port != "" && p.port != port {
		return false
	}
	switch {
	case p.prefix.IsValid():
		return p.prefix.Contains(ip)
	case p.addr.IsValid():
		return p.addr == ip
	case p.wildcard():
		return false
	default:
		return p.host == strings.ToLower(host)
	}
}

// registryPolicy is Registries, parsed.
type registryPolicy struct {
	allowed, insecure []pattern
	nodeNetworks      []netip.Prefix
	// interfaceAddrs lists the node's own addresses; tests replace it.
	interfaceAddrs func() ([]net.Addr, error)
}

func newRegistryPolicy(r Registries) (*registryPolicy, error) {
	p := &registryPolicy{nodeNetworks: r.NodeNetworks, interfaceAddrs: net.InterfaceAddrs}
	var errs []error
	for _, list := range []struct {
		key string
		in  []string
		out *[]pattern
	}{{"images.allowed_registries", r.Allowed, &p.allowed}, {"images.insecure_registries", r.Insecure, &p.insecure}} {
		for _, raw := range list.in {
			pat, err := parsePattern(raw)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", list.key, err))
				continue
			}
			*list.out = append(*list.out, pat)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, errdefs.Invalid("registries", "%v", err)
	}
	return p, nil
}

// splitRegistry splits a registry as a reference spells it into host and port.
func splitRegistry(reg string) (host, port string) {
	if h, p, err := net.SplitHostPort(reg); err == nil {
		return strings.Trim(h, "[]"), p
	}
	return strings.Trim(reg, "[]"), ""
}

// hubAliases are the names Docker Hub goes by: a pattern for either matches.
var hubAliases = []string{dockerHub, name.DefaultRegistry}

func matchAny(pats []pattern, reg string) bool {
	regs := []string{reg}
	if reg == dockerHub || reg == name.DefaultRegistry {
		regs = hubAliases
	}
	for _, r := range regs {
		host, port := splitRegistry(r)
		for _, p := range pats {
			if p.matchHost(host, port) {
				return true
			}
		}
	}
	return false
}

// isInsecure reports whether berth speaks plain HTTP to the registry reg.
func (p *registryPolicy) isInsecure(reg string) bool { return matchAny(p.insecure, reg) }

// check refuses a registry the operator did not allow.
func (p *registryPolicy) check(reg string) error {
	if matchAny(p.allowed, reg) || matchAny(p.insecure, reg) {
		return nil
	}
	shown := reg
	if reg == name.DefaultRegistry {
		shown = dockerHub
	}
	return &refusedError{msg: fmt.Sprintf("registry %s is not allowed on this node: an operator lists the registries pulls may use in images.allowed_registries (HTTPS) or images.insecure_registries (plain HTTP)", shown)}
}

// special names what makes ip an address berth reaches only when a
// pattern names it, or "" for an ordinary address.
func (p *registryPolicy) special(ip netip.Addr) string {
	ip = ip.Unmap()
	switch {
	case ip.IsLoopback():
		return "a loopback address"
	case ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast():
		return "a link-local address"
	case ip.IsUnspecified():
		return "the unspecified address (this node)"
	case ip.IsMulticast() || ip.IsInterfaceLocalMulticast():
		return "a multicast address"
	case ip.Is4() && ip.As4() == [4]byte{255, 255, 255, 255}:
		return "a broadcast address"
	}
	for _, n := range p.nodeNetworks {
		if n.Contains(ip) {
			return "an address of the node's workload network " + n.String()
		}
	}
	if addrs, err := p.interfaceAddrs(); err == nil {
		for _, a := range addrs {
			var own netip.Addr
			switch v := a.(type) {
			case *net.IPNet:
				own, _ = netip.AddrFromSlice(v.IP)
			case *net.IPAddr:
				own, _ = netip.AddrFromSlice(v.IP)
			}
			if own.Unmap() == ip {
				return "an address of this node"
			}
		}
	}
	return ""
}

// namedExplicitly reports whether a pattern of either list names the
// connection to ip, dialled as host, on port.
func (p *registryPolicy) namedExplicitly(host string, ip netip.Addr, port string) bool {
	for _, pats := range [][]pattern{p.allowed, p.insecure} {
		for _, pat := range pats {
			if pat.names(host, ip, port) {
				return true
			}
		}
	}
	return false
}

// refusedError is a connection or registry the operator's configuration
// does not allow. Its message names the key to change.
type refusedError struct{ msg string }

func (e *refusedError) Error() string { return e.msg }
func (e *refusedError) Unwrap() error { return errdefs.ErrDenied }

// guard is the HTTP transport of one pull: it speaks plain HTTP only to
// insecure registries, connects only to addresses the policy allows, and
// remembers the first refusal so the pull can report it whatever
// go-containerregistry makes of the failed request.
type guard struct {
	policy *registryPolicy
	next   *http.Transport
	dialer net.Dialer

	mu      sync.Mutex
	refusal error
	proxies map[string]bool // host:port of the proxies the environment names
}

func newGuard(policy *registryPolicy) *guard {
	g := &guard{policy: policy, proxies: map[string]bool{}}
	base, ok := remote.DefaultTransport.(*http.Transport)
	if !ok {
		base = http.DefaultTransport.(*http.Transport)
	}
	g.next = base.Clone()
	g.next.DialContext = g.dial
	g.dialer = net.Dialer{Timeout: defaultDialTimeout, KeepAlive: defaultKeepAlive}
	g.next.Proxy = g.proxy
	return g
}

const (
	defaultDialTimeout = 30 * time.Second
	defaultKeepAlive   = 30 * time.Second
)

// close lets go of the transport's idle connections.
func (g *guard) close() { g.next.CloseIdleConnections() }

// refused returns the first refusal of this pull, or nil.
func (g *guard) refused() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.refusal
}

func (g *guard) refuse(err error) error {
	g.mu.Lock()
	if g.refusal == nil {
		g.refusal = err
	}
	g.mu.Unlock()
	return err
}

// proxy is the environment's proxy (HTTPS_PROXY, ...): the operator's
// choice, so dialling it is allowed whatever its address. The proxy then
// resolves names itself; berth still refuses literal special addresses.
func (g *guard) proxy(req *http.Request) (*url.URL, error) {
	u, err := http.ProxyFromEnvironment(req)
	if u != nil {
		port := u.Port()
		if port == "" {
			port = map[string]string{"http": "80", "https": "443", "socks5": "1080", "socks5h": "1080"}[u.Scheme]
		}
		g.mu.Lock()
		g.proxies[net.JoinHostPort(u.Hostname(), port)] = true
		g.mu.Unlock()
	}
	return u, err
}

// RoundTrip upgrades plain HTTP to HTTPS for every registry not listed as
// insecure (go-containerregistry would also speak HTTP to RFC 1918 and
// .local names) and refuses literal special addresses up front.
func (g *guard) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !g.policy.isInsecure(req.URL.Host) {
		req = req.Clone(req.Context())
		req.URL.Scheme = "https"
	}
	host, port := req.URL.Hostname(), req.URL.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[req.URL.Scheme]
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if err := g.checkAddr(host, ip.Unmap(), port); err != nil {
			return nil, err
		}
	}
	return g.next.RoundTrip(req)
}

// dial resolves addr itself and connects only to addresses the policy
// allows, to the very address it checked (no second lookup a DNS server
// could answer differently).
func (g *guard) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	viaProxy := g.proxies[addr]
	g.mu.Unlock()
	if viaProxy {
		return g.dialer.DialContext(ctx, network, addr)
	}
	var ips []netip.Addr
	if ip, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{ip.Unmap()}
	} else {
		ips, err = net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		if err != nil {
			return nil, err
		}
	}
	var errs []error
	for _, ip := range ips {
		ip = ip.Unmap()
		if err := g.checkAddr(host, ip, port); err != nil {
			errs = append(errs, err)
			continue
		}
		conn, err := g.dialer.DialContext(ctx, network, net.JoinHostPort(ip.String(), port))
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
	}
	if len(errs) == 0 {
		return nil, &net.DNSError{Err: "no addresses", Name: host, IsNotFound: true}
	}
	return nil, errors.Join(errs...)
}

// checkAddr refuses a connection to a special address that no pattern
// names explicitly.
func (g *guard) checkAddr(host string, ip netip.Addr, port string) error {
	kind := g.policy.special(ip)
	if kind == "" || g.policy.namedExplicitly(host, ip, port) {
		return nil
	}
	what := fmt.Sprintf("%s is %s", net.JoinHostPort(host, port), kind)
	if host != ip.String() {
		what = fmt.Sprintf("%s resolves to %s, %s", net.JoinHostPort(host, port), ip, kind)
	}
	return g.refuse(&refusedError{msg: what + ": berth connects to this node's own, loopback, link-local and workload-network addresses only when images.allowed_registries (HTTPS) or images.insecure_registries (plain HTTP) names the address or the exact host explicitly"})
}
