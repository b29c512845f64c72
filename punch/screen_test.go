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
		{"public v6, not observed", "[2001:db8::1]:4000", RefusedPublic},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := s.Check(netip.MustParseAddrPort(tc.cand)); got != tc.want {
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
