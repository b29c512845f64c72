//go:build linux

package lab

import (
	"context"
	"fmt"
	"net/netip"
)

// AddPublicHost adds a host of its own on the simulated internet: the
// namespace PREFIX-role, linked to the internet namespace on
// 198.18.<subnet>.0/24 (the host .2, the internet router .1), with a
// default route. Close deletes it with the rest, by name. For topologies
// with more public hosts than the one gateway (a cluster of gateways, the
// NATS servers they share state through). subnet must be 10..250: the
// lab's own links use 198.18.1-3.
func (l *Lab) AddPublicHost(ctx context.Context, role string, subnet byte) (ns string, addr netip.Addr, err error) {
	if subnet < 10 || subnet > 250 {
		return "", netip.Addr{}, fmt.Errorf("lab: public host subnet %d outside 10..250", subnet)
	}
	ns = l.Prefix + "-" + role
	router := netip.AddrFrom4([4]byte{198, 18, subnet, 1})
	addr = netip.AddrFrom4([4]byte{198, 18, subnet, 2})
	if err := l.addNS(ctx, ns); err != nil {
		return "", netip.Addr{}, err
	}
	if err := l.link(ctx, l.NS.Inet, fmt.Sprintf("h%d", subnet), router, ns, "wan0", addr, 24); err != nil {
		return "", netip.Addr{}, err
	}
	if err := l.defaultRoute(ctx, ns, router); err != nil {
		return "", netip.Addr{}, err
	}
	return ns, addr, nil
}

// DropTCPTo drops, in namespace ns, every TCP packet to or from port on
// other hosts (an nftables table of its own, nvlab_cut_PORT): the host's
// connections to that service stall as on a broken link. RestoreTCPTo
// removes the rule.
func (l *Lab) DropTCPTo(ctx context.Context, ns string, port uint16) error {
	return l.nft(ctx, ns, fmt.Sprintf(`table ip nvlab_cut_%d {
	chain output {
		type filter hook output priority filter; policy accept;
		oifname != "lo" tcp dport %d drop
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname != "lo" tcp sport %d drop
	}
}
`, port, port, port))
}

// RestoreTCPTo undoes DropTCPTo.
func (l *Lab) RestoreTCPTo(ctx context.Context, ns string, port uint16) error {
	return l.nft(ctx, ns, fmt.Sprintf("delete table ip nvlab_cut_%d\n", port))
}
