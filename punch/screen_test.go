package punch

import (
	"net/netip"
	"testing"
)

// One row per rule of Screen: an agent whose interfaces are in
// 192.168.1.0/24 and fd00:1::/64 (plus a /32 with no LAN), screening a
// client observed at 198.18.0.5.
func TestScreen(t *testing.T) {
	s := &Screen{
		Observed: netip.MustParseAddr("198.18.0.5"),
		Local: []netip.Prefix{
			netip.MustParsePrefix("192.168.1.10/24"),
			netip.MustParsePrefix("fd00:1::10/64"),
			netip.MustParsePrefix("203.0.113.7/32"),
			netip.MustParsePrefix("127.0.0.1/8"),
		},
		Own: func(a netip.Addr) bool { return a == netip.MustParseAddr("172.16.9.9") },
	}
	for _, tc := range []struct {
		name string
		cand string
		want Reason
	}{
		{"observed public address", "198.18.0.5:4000", Accepted},
		{"observed IP, another port (NAT remapped)", "198.18.0.5:4444", Accepted},
		{"observed IP v4-mapped", "[::ffff:198.18.0.5]:4000", Accepted},
		{"same-LAN private", "192.168.1.20:4000", Accepted},
		{"same-LAN ULA", "[fd00:1::20]:4000", Accepted},
		{"port 0", "198.18.0.5:0", RefusedInvalid},
		{"unspecified v4", "0.0.0.0:4000", RefusedUnspec},
		{"unspecified v6", "[::]:4000", RefusedUnspec},
		{"loopback", "127.0.0.1:22", RefusedLoopback},
		{"loopback elsewhere in 127/8", "127.3.2.1:4000", RefusedLoopback},
		{"loopback v6", "[::1]:22", RefusedLoopback},
		{"cloud metadata", "169.254.169.254:80", RefusedLinkLocal},
		{"link-local v6", "[fe80::1]:4000", RefusedLinkLocal},
		{"metadata v6", "[fd00:ec2::254]:80", RefusedLinkLocal},
		{"multicast", "224.0.0.251:5353", RefusedMulticast},
		{"multicast v6", "[ff02::1]:4000", RefusedMulticast},
		{"limited broadcast", "255.255.255.255:4000", RefusedBroadcast},
		{"LAN broadcast", "192.168.1.255:4000", RefusedBroadcast},
		{"LAN network address", "192.168.1.0:4000", RefusedBroadcast},
		{"this network", "0.1.2.3:4000", RefusedReserved},
		{"class E", "240.0.0.1:4000", RefusedReserved},
		{"overlay / CGNAT", "100.64.0.7:4000", RefusedOverlay},
		{"own LAN address", "192.168.1.10:4000", RefusedOwn},
		{"own public address", "203.0.113.7:4000", RefusedOwn},
		{"own address from Own", "172.16.9.9:4000", RefusedOwn},
		{"foreign private range", "10.99.0.5:4000", RefusedForeignLAN},
		{"private, other /24 of 192.168", "192.168.2.20:4000", RefusedForeignLAN},
		{"foreign ULA", "[fd00:2::5]:4000", RefusedForeignLAN},
		{"public, not observed", "198.18.0.6:4000", RefusedPublic},
		{"global v6, this node has none", "[2001:2:0:12::2]:4000", RefusedNoIPv6},
		{"documentation v6", "[2001:db8::1]:4000", RefusedReserved},
		{"overlay v6", "[fd6e:6c76:706e::6440:2]:4000", RefusedOverlay},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := s.Check(netip.MustParseAddrPort(tc.cand)); got != tc.want {
				t.Fatalf("Check(%s) = %q, want %q", tc.cand, got, tc.want)
			}
		})
	}
	// A node with a global IPv6 address of its own (and a v4 observed
	// peer: the gateway saw only the peer's IPv4) probes the peer's global
	// IPv6 addresses, but not the ranges that stand for IPv4 hosts.
	v6 := &Screen{
		Observed: netip.MustParseAddr("198.18.0.5"),
		Local: []netip.Prefix{
			netip.MustParsePrefix("192.168.1.10/24"),
			netip.MustParsePrefix("2001:2:0:13::2/64"),
			netip.MustParsePrefix("fe80::1/64"),
		},
	}
	for _, tc := range []struct {
		name string
		cand string
		want Reason
	}{
		{"peer's global v6 on another network", "[2001:2:0:12::2]:4000", Accepted},
		{"peer's global v6 on this /64", "[2001:2:0:13::9]:4000", Accepted},
		{"own global v6", "[2001:2:0:13::2]:4000", RefusedOwn},
		{"NAT64 well-known (an IPv4 host)", "[64:ff9b::c612:5]:4000", RefusedReserved},
		{"NAT64 local use", "[64:ff9b:1::1]:4000", RefusedReserved},
		{"6to4 (an IPv4 host)", "[2002:c612:5::1]:4000", RefusedReserved},
		{"Teredo", "[2001:0:4136:e378::1]:4000", RefusedReserved},
		{"documentation 3fff::/20", "[3fff::1]:4000", RefusedReserved},
		{"v4 public, not observed, still refused", "198.18.0.6:4000", RefusedPublic},
		{"foreign ULA still refused", "[fd00:2::5]:4000", RefusedForeignLAN},
		{"link-local v6 still refused", "[fe80::2]:4000", RefusedLinkLocal},
		{"overlay v6 still refused", "[fd6e:6c76:706e::6440:2]:4000", RefusedOverlay},
	} {
		t.Run("v6/"+tc.name, func(t *testing.T) {
			if got := v6.Check(netip.MustParseAddrPort(tc.cand)); got != tc.want {
				t.Fatalf("Check(%s) = %q, want %q", tc.cand, got, tc.want)
			}
		})
	}
	if got := (&Screen{}).Check(netip.AddrPort{}); got != RefusedInvalid {
		t.Fatalf("Check(invalid) = %q", got)
	}
	// With no observed address known, no public address passes.
	if got := (&Screen{Local: s.Local}).Check(netip.MustParseAddrPort("198.18.0.5:4000")); got != RefusedPublic {
		t.Fatalf("no observed address: Check(public) = %q, want %q", got, RefusedPublic)
	}
	// A private observed address (a gateway on a private network) still
	// needs the same LAN: "observed" is the gateway's word or the client's.
	priv := &Screen{Observed: netip.MustParseAddr("10.99.0.5"), Local: s.Local}
	if got := priv.Check(netip.MustParseAddrPort("10.99.0.5:4000")); got != RefusedForeignLAN {
		t.Fatalf("private observed outside the LAN: %q, want %q", got, RefusedForeignLAN)
	}
	// A /31 or /32 has no network or broadcast address to refuse.
	p2p := &Screen{Local: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/31")}}
	if got := p2p.Check(netip.MustParseAddrPort("10.0.0.1:4000")); got != Accepted {
		t.Fatalf("/31 peer: %q", got)
	}
}
