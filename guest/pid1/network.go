//go:build linux

package pid1

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/berthd/berth/guest"
)

// configureNetwork gives the guest its place on the node's bridge: the
// interface up with its address, the default route through the gateway,
// and the name servers in /etc/resolv.conf under root. It waits up to
// limit for the interface to appear (virtio_net binds asynchronously).
func configureNetwork(n *guest.Network, root string, limit time.Duration) error {
	ifname := n.Interface
	if ifname == "" {
		ifname = "eth0"
	}
	prefix, err := netip.ParsePrefix(n.Address)
	if err != nil || !prefix.Addr().Is4() {
		return fmt.Errorf("network: address %q is not an IPv4 CIDR", n.Address)
	}
	deadline := time.Now().Add(limit)
	for {
		if _, err := os.Stat(filepath.Join("/sys/class/net", ifname)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("network: interface %s did not appear within %v (is virtio_net in the initramfs?)", ifname, limit)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := setLinkUp(ifname); err != nil {
		return err
	}
	index, err := ifIndex(ifname)
	if err != nil {
		return err
	}
	if err := addAddress(index, prefix); err != nil {
		return fmt.Errorf("network: address %s on %s: %w", prefix, ifname, err)
	}
	if n.Gateway != "" {
		gw, err := netip.ParseAddr(n.Gateway)
		if err != nil || !gw.Is4() {
			return fmt.Errorf("network: gateway %q is not an IPv4 address", n.Gateway)
		}
		if err := addDefaultRoute(index, gw); err != nil {
			return fmt.Errorf("network: default route via %s: %w", gw, err)
		}
	}
	if root != "" && len(n.DNS) > 0 {
		var b strings.Builder
		b.WriteString("# written by berth-init\n")
		for _, s := range n.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
		etc := filepath.Join(root, "etc")
		if err := os.MkdirAll(etc, 0o755); err != nil {
			return fmt.Errorf("network: %w", err)
		}
		path := filepath.Join(etc, "resolv.conf")
		// A symlink (to a systemd-resolved stub, say) would send the
		// write outside the image's /etc.
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSymlink != 0 {
			os.Remove(path)
		}
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			return fmt.Errorf("network: resolv.conf: %w", err)
		}
	}
	return nil
}

func setLinkUp(ifname string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(ifname)
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: %s flags: %w", ifname, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("network: bring %s up: %w", ifname, err)
	}
	return nil
}

func ifIndex(ifname string) (uint32, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("network: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(ifname)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return 0, fmt.Errorf("network: index of %s: %w", ifname, err)
	}
	return ifr.Uint32(), nil
}

// rtattr appends a route attribute.
func rtattr(b []byte, typ uint16, data []byte) []byte {
	l := unix.SizeofRtAttr + len(data)
	attr := make([]byte, unix.SizeofRtAttr, (l+3)&^3)
	binary.NativeEndian.PutUint16(attr[0:], uint16(l))
	binary.NativeEndian.PutUint16(attr[2:], typ)
	attr = append(attr, data...)
	for len(attr)%4 != 0 {
		attr = append(attr, 0)
	}
	return append(b, attr...)
}

// netlinkDo sends one rtnetlink request and waits for its acknowledgement.
func netlinkDo(typ uint16, body []byte) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	msg := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	msg = append(msg, body...)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], typ)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	binary.NativeEndian.PutUint32(msg[8:], 1) // sequence
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	buf := make([]byte, 4096)
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		return err
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return err
	}
	for _, m := range msgs {
		if m.Header.Type == unix.NLMSG_ERROR && len(m.Data) >= 4 {
			if code := int32(binary.NativeEndian.Uint32(m.Data[:4])); code != 0 {
				return unix.Errno(-code)
			}
			return nil
		}
	}
	return errors.New("no acknowledgement from the kernel")
}

func addAddress(index uint32, p netip.Prefix) error {
	ip := p.Addr().As4()
	body := make([]byte, unix.SizeofIfAddrmsg)
	body[0] = unix.AF_INET
	body[1] = byte(p.Bits())
	body[3] = unix.RT_SCOPE_UNIVERSE
	binary.NativeEndian.PutUint32(body[4:], index)
	body = rtattr(body, unix.IFA_LOCAL, ip[:])
	body = rtattr(body, unix.IFA_ADDRESS, ip[:])
	if p.Bits() < 31 {
		bcast := p.Masked().Addr().As4()
		host := uint32(1)<<(32-p.Bits()) - 1
		v := binary.BigEndian.Uint32(bcast[:]) | host
		binary.BigEndian.PutUint32(bcast[:], v)
		body = rtattr(body, unix.IFA_BROADCAST, bcast[:])
	}
	return netlinkDo(unix.RTM_NEWADDR, body)
}

func addDefaultRoute(index uint32, gw netip.Addr) error {
	body := make([]byte, unix.SizeofRtMsg)
	body[0] = unix.AF_INET
	body[1] = 0 // destination prefix length: the default route
	body[4] = unix.RT_TABLE_MAIN
	body[5] = unix.RTPROT_BOOT
	body[6] = unix.RT_SCOPE_UNIVERSE
	body[7] = unix.RTN_UNICAST
	g := gw.As4()
	body = rtattr(body, unix.RTA_GATEWAY, g[:])
	oif := make([]byte, 4)
	binary.NativeEndian.PutUint32(oif, index)
	body = rtattr(body, unix.RTA_OIF, oif)
	return netlinkDo(unix.RTM_NEWROUTE, body)
}
