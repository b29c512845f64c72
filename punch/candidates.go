package punch

import (
	"net"
	"net/netip"
)

// overlay is never a candidate: it lives inside the tunnel.
var overlay = netip.MustParsePrefix("100.64.0.0/10")

// Candidates lists the addresses a peer may reach this node's socket on:
// the public address the gateway observed, then every interface address
// with the socket's port (so two nodes on one LAN connect locally).
func Candidates(observed netip.AddrPort, port uint16) []netip.AddrPort {
	var out []netip.AddrPort
	seen := map[netip.AddrPort]bool{}
	add := func(a netip.AddrPort) {
		if a.IsValid() && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	add(observed)
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() || overlay.Contains(ip) {
			continue
		}
		add(netip.AddrPortFrom(ip, port))
	}
	return out
}

// Usable filters a peer's candidates: no overlay addresses, no addresses
// this node routes into its tunnel (the underlay must never enter the
// tunnel), at most max of them.
func Usable(cands []netip.AddrPort, routed []netip.Prefix, max int) []netip.AddrPort {
	var out []netip.AddrPort
next:
	for _, c := range cands {
		a := c.Addr().Unmap()
		if !c.IsValid() || c.Port() == 0 || a.IsUnspecified() || a.IsMulticast() || overlay.Contains(a) {
			continue
		}
		for _, p := range routed {
			if p.Contains(a) {
				continue next
			}
		}
		out = append(out, netip.AddrPortFrom(a, c.Port()))
		if len(out) == max {
			break
		}
	}
	return out
}
