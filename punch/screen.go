package punch

import "net/netip"

// Reason says why Screen.Check refused a candidate; "" (Accepted) is yes.
// The values are the names the agent counts refusals under.
type Reason string

// Reasons, in the order Check tests them.
const (
	Accepted          Reason = ""
	RefusedInvalid    Reason = "invalid"     // no address, or port 0
	RefusedUnspec     Reason = "unspecified" // 0.0.0.0, ::
	RefusedLoopback   Reason = "loopback"
	RefusedMulticast  Reason = "multicast"
	RefusedLinkLocal  Reason = "link_local" // 169.254.0.0/16 (cloud metadata), fe80::/10, fd00:ec2::254
	RefusedBroadcast  Reason = "broadcast"  // 255.255.255.255, a subnet's broadcast or network address
	RefusedReserved   Reason = "reserved"   // 0.0.0.0/8, 240.0.0.0/4
	RefusedOverlay    Reason = "overlay"    // 100.64.0.0/10: inside the tunnel (and CGNAT's range)
	RefusedOwn        Reason = "own_address"
	RefusedForeignLAN Reason = "foreign_private" // private, but in no subnet of this node's interfaces
	RefusedPublic     Reason = "not_observed"    // public, but not the peer's observed address
	RefusedNoIPv6     Reason = "no_ipv6"         // global IPv6, but this node has no global IPv6 address to reach it from
)

var (
	metadataV6 = netip.MustParseAddr("fd00:ec2::254") // AWS's IPv6 instance metadata service
	thisNet    = netip.MustParsePrefix("0.0.0.0/8")
	class4     = netip.MustParsePrefix("240.0.0.0/4") // and 255.255.255.255 in it
	bcast4     = netip.AddrFrom4([4]byte{255, 255, 255, 255})
)

// Screen decides which of a peer's candidate addresses this node may send
// probes to. A candidate is only a claim (the peer names it, the gateway
// relays it), so only addresses where that peer can plausibly be are
// probed, and never one that would turn this node into a way to reach what
// a stranger should not:
//
//   - never loopback, link-local (the cloud metadata services live there),
//     multicast, broadcast, unspecified or reserved addresses, the overlay,
//     or this node's own addresses, whatever the port;
//   - a private address (RFC 1918, ULA) only inside a subnet of one of this
//     node's interfaces: only there can the peer be on the same LAN, and
//     elsewhere the address names some other network's host;
//   - a public IPv4 address only on the peer's observed IP (any port: a
//     NAT may map the peer's probes to another port of its address);
//   - a global IPv6 address (Global6) when this node has one too. IPv6
//     has no NAT: a node's global addresses are its own interfaces', which
//     the gateway observes only for the one family it connects over, so
//     here the peer's word (at most MaxGlobal6 such addresses from a
//     well-behaved peer, never more than MaxCandidates in all) is taken,
//     under the same probe budgets. Ranges that stand for IPv4 hosts
//     (NAT64, 6to4, Teredo) are refused: through them a probe could reach
//     an IPv4 address that was never screened.
type Screen struct {
	// Observed is the peer's public IP; invalid: none known, and no public
	// candidate passes.
	Observed netip.Addr
	// Local is this node's interface addresses with their prefix lengths
	// (platform.InterfacePrefixes): its own addresses and its LAN subnets.
	Local []netip.Prefix
	// Own, if set, reports more of this node's own addresses.
	Own func(netip.Addr) bool
}

// Check screens one candidate.
func (s *Screen) Check(c netip.AddrPort) Reason {
	ip := c.Addr().Unmap()
	switch {
	case !c.IsValid() || c.Port() == 0:
		return RefusedInvalid
	case ip.IsUnspecified():
		return RefusedUnspec
	case ip.IsLoopback():
		return RefusedLoopback
	case ip.IsMulticast():
		return RefusedMulticast
	case ip.IsLinkLocalUnicast() || ip == metadataV6:
		return RefusedLinkLocal
	case ip == bcast4:
		return RefusedBroadcast
	case thisNet.Contains(ip) || class4.Contains(ip):
		return RefusedReserved
	case inOverlay(ip):
		return RefusedOverlay
	case s.own(ip):
		return RefusedOwn
	case ip.IsPrivate():
		return s.sameLAN(ip)
	case ip == s.Observed.Unmap():
		return Accepted
	case Global6(ip):
		if !s.hasGlobal6() {
			return RefusedNoIPv6
		}
		return Accepted
	case ip.Is6():
		for _, p := range notGlobal6 {
			if p.Contains(ip) {
				return RefusedReserved
			}
		}
	}
	return RefusedPublic
}

// hasGlobal6 reports whether one of this node's addresses is a global
// IPv6 address: without one it cannot reach a peer's.
func (s *Screen) hasGlobal6() bool {
	for _, p := range s.Local {
		if Global6(p.Addr()) {
			return true
		}
	}
	return false
}

func (s *Screen) own(ip netip.Addr) bool {
	for _, p := range s.Local {
		if p.Addr().Unmap() == ip {
			return true
		}
	}
	return s.Own != nil && s.Own(ip)
}

// sameLAN accepts a private ip inside one of the Local subnets, except a
// subnet's network and broadcast addresses: a probe there would reach every
// host on the LAN (Go's UDP sockets may broadcast).
func (s *Screen) sameLAN(ip netip.Addr) Reason {
	for _, p := range s.Local {
		if !p.IsValid() || p.Bits() == 0 {
			continue
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()).Masked()
		if !p.Contains(ip) {
			continue
		}
		if ip.Is4() && p.Bits() <= 30 && (ip == p.Addr() || ip == lastAddr(p)) {
			return RefusedBroadcast
		}
		return Accepted
	}
	return RefusedForeignLAN
}

// lastAddr is the highest address of the IPv4 prefix p.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := (uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
