package punch

import (
	"net"
	"net/netip"

	"github.com/nlvpn/nlvpn/wire"
)

// overlay is never a candidate: it lives inside the tunnel (IPv4 and the
// IPv6 overlay, which the client's TUN carries too).
var overlay = netip.MustParsePrefix("100.64.0.0/10")

// inOverlay reports whether ip is an overlay address (v4 or v6).
func inOverlay(ip netip.Addr) bool {
	return overlay.Contains(ip) || wire.OverlayPrefix6.Contains(ip)
}

// MaxGlobal6 bounds the global IPv6 addresses a node announces: a host
// with privacy extensions (RFC 8981) holds a new temporary address a day
// besides its stable one, and each is one more candidate to probe.
const MaxGlobal6 = 4

// Candidates lists the addresses a peer may reach this node's socket on:
// the public address the gateway observed, then the node's global IPv6
// addresses (no NAT: a peer with IPv6 reaches them directly once both have
// sent, which their firewalls need), then its other interface addresses
// (so two nodes on one LAN connect locally), all with the socket's port;
// at most wire.MaxCandidates.
func Candidates(observed netip.AddrPort, port uint16) []netip.AddrPort {
	var local []netip.Addr
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
				local = append(local, ip)
			}
		}
	}
	return candidatesFrom(observed, port, local)
}

// candidatesFrom is Candidates with the interface addresses given.
func candidatesFrom(observed netip.AddrPort, port uint16, local []netip.Addr) []netip.AddrPort {
	out := make([]netip.AddrPort, 0, wire.MaxCandidates)
	seen := map[netip.AddrPort]bool{}
	add := func(a netip.AddrPort) {
		if a.IsValid() && !seen[a] && len(out) < wire.MaxCandidates {
			seen[a] = true
			out = append(out, a)
		}
	}
	if observed.IsValid() {
		add(netip.AddrPortFrom(observed.Addr().Unmap(), observed.Port()))
	}
	var rest []netip.Addr
	global6 := 0
	for _, ip := range local {
		ip = ip.Unmap().WithZone("")
		switch {
		case !ip.IsValid() || ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsMulticast() || ip.IsUnspecified() || inOverlay(ip):
			// never reachable from a peer, or inside the tunnel
		case Global6(ip):
			if global6 < MaxGlobal6 {
				global6++
				add(netip.AddrPortFrom(ip, port))
			}
		case ip.Is6() && !ip.IsPrivate():
			// other IPv6 (6to4, Teredo, NAT64, documentation): a peer's
			// screen refuses them anyway
		default:
			rest = append(rest, ip) // IPv4 and ULA: same-LAN candidates
		}
	}
	for _, ip := range rest {
		add(netip.AddrPortFrom(ip, port))
	}
	return out
}

// Special IPv6 ranges that are global unicast by form but are not a host's
// own address: ones that stand for IPv4 hosts (a probe there would reach an
// IPv4 host the screen never vetted) and documentation.
var notGlobal6 = []netip.Prefix{
	netip.MustParsePrefix("64:ff9b::/96"),   // NAT64, well-known (RFC 6052)
	netip.MustParsePrefix("64:ff9b:1::/48"), // NAT64, local use (RFC 8215)
	netip.MustParsePrefix("2001::/32"),      // Teredo (RFC 4380)
	netip.MustParsePrefix("2002::/16"),      // 6to4 (RFC 3056)
	netip.MustParsePrefix("2001:db8::/32"),  // documentation (RFC 3849)
	netip.MustParsePrefix("3fff::/20"),      // documentation (RFC 9637)
}

// Global6 reports whether ip is a global unicast IPv6 address a host holds
// as its own on the internet: not v4-mapped, not a ULA, not link-local,
// not one of the ranges that stand for IPv4 hosts or documentation.
func Global6(ip netip.Addr) bool {
	if !ip.Is6() || ip.Is4In6() || !ip.IsGlobalUnicast() || ip.IsPrivate() {
		return false
	}
	ip = ip.WithZone("")
	for _, p := range notGlobal6 {
		if p.Contains(ip) {
			return false
		}
	}
	return true
}

// Usable filters a peer's candidates: no overlay addresses, no addresses
// this node routes into its tunnel (the underlay must never enter the
// tunnel), at most max of them.
func Usable(cands []netip.AddrPort, routed []netip.Prefix, max int) []netip.AddrPort {
	var out []netip.AddrPort
next:
	for _, c := range cands {
		a := c.Addr().Unmap()
		if !c.IsValid() || c.Port() == 0 || a.IsUnspecified() || a.IsMulticast() || inOverlay(a) {
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
