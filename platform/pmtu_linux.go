package platform

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PathMTU is the kernel's path MTU towards dst: the route's MTU, lowered by
// any ICMP "fragmentation needed" / "packet too big" that came back for a
// packet to dst (the kernel keeps it for ten minutes). It sends nothing: a
// connected UDP socket only asks the routing table.
func PathMTU(dst netip.Addr) (int, error) {
	family, sa := unix.AF_INET, unix.Sockaddr(nil)
	if dst.Is4() || dst.Is4In6() {
		sa = &unix.SockaddrInet4{Port: 9, Addr: dst.Unmap().As4()}
	} else {
		family = unix.AF_INET6
		sa = &unix.SockaddrInet6{Port: 9, Addr: dst.As16()}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	// The node's own sockets carry the bypass mark: ask for their route.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, Mark)
	if err := unix.Connect(fd, sa); err != nil {
		return 0, fmt.Errorf("path MTU to %s: %w", dst, err)
	}
	opt := unix.IP_MTU
	level := unix.IPPROTO_IP
	if family == unix.AF_INET6 {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_MTU
	}
	mtu, err := unix.GetsockoptInt(fd, level, opt)
	if err != nil {
		return 0, fmt.Errorf("path MTU to %s: %w", dst, err)
	}
	return mtu, nil
}

// SetMTU sets a network interface's MTU (the client's TUN device follows
// its session's size; the kernel's TCP MSS follows the MTU).
func SetMTU(ifname string, mtu int) error {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return err
	}
	if l.Attrs().MTU == mtu {
		return nil
	}
	if err := netlink.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set MTU of %s to %d: %w", ifname, mtu, err)
	}
	return nil
}
