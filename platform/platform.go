// Package platform configures the operating system around a TUN device:
// its address and the routes that send the overlay and the agent's subnets
// into it. Each OS has its own file behind Configure.
package platform

import (
	"net"
	"net/netip"
)

// Config is what one tunnel needs from the OS.
type Config struct {
	Interface string       // TUN device name
	Addr      netip.Prefix // the node's overlay address, e.g. 100.64.0.3/32
	// Addr6, if valid, is the node's IPv6 overlay address, the source of
	// the IPv6 routes (fd6e:6c76:706e::6440:3/128).
	Addr6  netip.Prefix
	Routes []netip.Prefix // sent into the device, with Addr as source
}

// The underlay must never enter the tunnel. On Linux the tunnel's routes
// live in their own table, consulted before the main one, and the node's
// UDP sockets carry a firewall mark that sends them to the main table
// first: routing the agent's subnets (one day a default route) into the
// TUN can then never capture the tunnel's own packets.
const (
	// Table holds the tunnel's routes ("ip route show table 5228").
	Table = 5228
	// Mark is set on the node's UDP sockets (SO_MARK).
	Mark = 0x4e4c
	// RulePriority is the rule "not fwmark Mark lookup Table".
	RulePriority = 5228
)

// Undo reverses a Configure. It is safe to call more than once.
type Undo func() error

// InterfacePrefixes returns this machine's interface addresses, each with
// its prefix length as configured (192.168.1.5/24, not masked), IPv4 never
// in IPv6 form. The agent keeps clients off these addresses; the client
// keeps routes off these networks.
func InterfacePrefixes() ([]netip.Prefix, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	ps := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		bits := p.Bits()
		if p.Addr().Is4In6() {
			bits -= 96
		}
		ps = append(ps, netip.PrefixFrom(p.Addr().Unmap(), bits))
	}
	return ps, nil
}
