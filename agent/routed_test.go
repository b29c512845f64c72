package agent

import (
	"encoding/binary"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/nlvpn/nlvpn/policy"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// ip4 builds an IPv4 header (no options) for proto with fragment field
// frag, followed by l4.
func ip4(proto byte, frag uint16, l4 []byte) []byte {
	p := make([]byte, 20+len(l4))
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(len(p)))
	binary.BigEndian.PutUint16(p[6:8], frag)
	p[8], p[9] = 64, proto
	copy(p[12:16], []byte{100, 64, 0, 2})
	copy(p[16:20], []byte{192, 168, 77, 10})
	copy(p[20:], l4)
	return p
}

// ip6 builds an IPv6 header for next header nh followed by rest.
func ip6(nh byte, rest []byte) []byte {
	p := make([]byte, 40+len(rest))
	p[0] = 0x60
	binary.BigEndian.PutUint16(p[4:6], uint16(len(rest)))
	p[6], p[7] = nh, 64
	src := netip.MustParseAddr("fd6e:6c76:706e::6440:2").As16()
	dst := netip.MustParseAddr("fd00:77::10").As16()
	copy(p[8:24], src[:])
	copy(p[24:40], dst[:])
	copy(p[40:], rest)
	return p
}

// ports is the first four bytes of a TCP or UDP header.
func ports(src, dst uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b[0:2], src)
	binary.BigEndian.PutUint16(b[2:4], dst)
	return b
}

// fragHdr is an IPv6 fragment header for nh at offset off (bytes).
func fragHdr(nh byte, off uint16, rest []byte) []byte {
	b := make([]byte, 8, 8+len(rest))
	b[0] = nh
	binary.BigEndian.PutUint16(b[2:4], off|1) // More Fragments
	return append(b, rest...)
}

// TestFlowOf: what the routed agent's policy check reads from a packet,
// and what it refuses to read.
func TestFlowOf(t *testing.T) {
	lan := netip.MustParseAddr("192.168.77.10")
	lan6 := netip.MustParseAddr("fd00:77::10")
	for _, c := range []struct {
		name  string
		pkt   []byte
		ok    bool
		dst   netip.AddrPort
		proto string
		later bool
	}{
		{"tcp", ip4(6, 0, ports(40000, 80)), true, netip.AddrPortFrom(lan, 80), "tcp", false},
		{"udp", ip4(17, 0x4000, ports(40000, 53)), true, netip.AddrPortFrom(lan, 53), "udp", false},
		{"icmp", ip4(1, 0, []byte{8, 0, 0, 0}), true, netip.AddrPortFrom(lan, 0), "icmp", false},
		{"first fragment has ports", ip4(6, 0x2000, ports(1, 22)), true, netip.AddrPortFrom(lan, 22), "tcp", false},
		{"later fragment has none", ip4(17, 0x0010, []byte{1, 2, 3, 4}), true, netip.AddrPortFrom(lan, 0), "udp", true},
		{"gre is not forwarded", ip4(47, 0, ports(0, 0)), false, netip.AddrPort{}, "", false},
		{"tcp header cut short", ip4(6, 0, []byte{1, 2}), false, netip.AddrPort{}, "", false},
		{"bad IHL", func() []byte { p := ip4(6, 0, ports(1, 2)); p[0] = 0x4f; return p }(), false, netip.AddrPort{}, "", false},
		{"IHL under 20", func() []byte { p := ip4(6, 0, ports(1, 2)); p[0] = 0x44; return p }(), false, netip.AddrPort{}, "", false},
		{"IPv4 options", func() []byte {
			p := append(ip4(6, 0, nil)[:20], 0x83, 3, 4, 0) // loose source route
			p[0] = 0x46
			return append(p, ports(1, 80)...)
		}(), false, netip.AddrPort{}, "", false},
		{"ipv6 to a mapped IPv4 address", func() []byte {
			p := ip6(6, ports(1, 80))
			m := netip.MustParseAddr("::ffff:192.168.77.10").As16()
			copy(p[24:40], m[:])
			return p
		}(), false, netip.AddrPort{}, "", false},
		{"ipv6 tcp", ip6(6, ports(40000, 443)), true, netip.AddrPortFrom(lan6, 443), "tcp", false},
		{"icmpv6", ip6(58, []byte{128, 0, 0, 0}), true, netip.AddrPortFrom(lan6, 0), "icmp", false},
		{"ipv6 first fragment", ip6(44, fragHdr(17, 0, ports(5, 53))), true, netip.AddrPortFrom(lan6, 53), "udp", false},
		{"ipv6 later fragment", ip6(44, fragHdr(17, 1232, []byte{9, 9})), true, netip.AddrPortFrom(lan6, 0), "udp", true},
		{"ipv6 hop-by-hop is not read", ip6(0, make([]byte, 16)), false, netip.AddrPort{}, "", false},
		{"ipv6 fragment header cut", ip6(44, []byte{17, 0}), false, netip.AddrPort{}, "", false},
		{"too short", []byte{0x45, 0, 0}, false, netip.AddrPort{}, "", false},
		{"not IP", make([]byte, 40), false, netip.AddrPort{}, "", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, ok := flowOf(c.pkt)
			if ok != c.ok {
				t.Fatalf("ok %v, want %v (flow %+v)", ok, c.ok, f)
			}
			if !ok {
				return
			}
			if f.dst != c.dst || f.proto != c.proto || f.later != c.later {
				t.Errorf("flow %+v; want dst %v proto %s later %v", f, c.dst, c.proto, c.later)
			}
		})
	}
}

// FuzzFlowOf: no packet makes flowOf panic, and what it accepts is a
// flow the policy can decide (a known protocol, addresses of the packet's
// family).
func FuzzFlowOf(f *testing.F) {
	f.Add(ip4(6, 0, ports(1, 80)))
	f.Add(ip4(17, 0x0010, []byte{1}))
	f.Add(ip6(44, fragHdr(6, 0, ports(1, 2))))
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		fl, ok := flowOf(pkt)
		if !ok {
			return
		}
		if fl.proto != "tcp" && fl.proto != "udp" && fl.proto != "icmp" {
			t.Fatalf("accepted protocol %q", fl.proto)
		}
		if fl.src.Is4() != fl.dst.Addr().Is4() || fl.src.Is4() != (pkt[0]>>4 == 4) {
			t.Fatalf("addresses %v %v for a version %d packet", fl.src, fl.dst, pkt[0]>>4)
		}
	})
}

// TestLastAddr: the broadcast address of an IPv4 subnet, which the agent
// counts among this host's own (a packet to it reaches the host).
func TestLastAddr(t *testing.T) {
	for p, want := range map[string]string{
		"192.168.77.2/24": "192.168.77.255",
		"10.1.2.3/8":      "10.255.255.255",
		"198.18.0.5/30":   "198.18.0.7",
		"0.0.0.0/0":       "255.255.255.255",
	} {
		if got := lastAddr(netip.MustParsePrefix(p)); got.String() != want {
			t.Errorf("lastAddr(%s) = %s, want %s", p, got, want)
		}
	}
}

// routedTestAgent is an agent with alice connected and a policy that lets
// her reach the LAN host's web port only.
func routedTestAgent(t testing.TB) (*Agent, *clientState) {
	pol, err := policy.Parse([]byte("allow client:alice 192.168.77.10 80 tcp\n"))
	if err != nil {
		t.Fatal(err)
	}
	cur := &policy.Current{}
	cur.Store(pol)
	a := &Agent{cfg: Config{Advertise: []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24")}, Policy: cur},
		log: slog.New(slog.DiscardHandler)}
	m := map[netip.Addr]bool{netip.MustParseAddr("192.168.77.2"): true}
	a.host.set.Store(&m)
	cs := &clientState{offer: &offer{Session: &wire.Session{PeerName: "alice"}, client: &token.Claims{Name: "alice"}}}
	a.clients.Store(netip.MustParseAddr("100.64.0.2"), cs)
	return a, cs
}

// TestFlowCacheFollowsPolicy: a flow the policy allowed stays allowed from
// the cache only while that policy (and the host's address set) is in
// force; a reload that refuses it refuses its next packet, and refusals
// are counted each time, never cached.
func TestFlowCacheFollowsPolicy(t *testing.T) {
	a, cs := routedTestAgent(t)
	web, _ := flowOf(ip4(6, 0, ports(40000, 80)))
	ssh, _ := flowOf(ip4(6, 0, ports(40000, 22)))
	for i := 0; i < 3; i++ {
		if !cs.allowedFlow(a, web) {
			t.Fatalf("packet %d to the web port refused", i)
		}
		if cs.allowedFlow(a, ssh) {
			t.Fatalf("packet %d to ssh allowed", i)
		}
	}
	if n := a.denied.policy.Load(); n != 3 {
		t.Errorf("policy refusals counted %d, want 3 (one per packet)", n)
	}
	deny, _ := policy.Parse([]byte("allow client:alice 192.168.77.10 22 tcp\n"))
	a.cfg.Policy.Store(deny)
	if cs.allowedFlow(a, web) {
		t.Error("the web port still allowed after a reload that no longer allows it")
	}
	if !cs.allowedFlow(a, ssh) {
		t.Error("ssh refused after a reload that allows it")
	}
	// The host gains the address: the cache must not vouch for it.
	a.cfg.Policy = nil
	lanHost, _ := flowOf(ip4(6, 0, ports(40000, 443)))
	if !cs.allowedFlow(a, lanHost) {
		t.Fatal("the LAN host refused without a policy")
	}
	m := map[netip.Addr]bool{netip.MustParseAddr("192.168.77.10"): true}
	a.host.set.Store(&m)
	if cs.allowedFlow(a, lanHost) {
		t.Error("an address that became this host's still allowed from the cache")
	}
}

// BenchmarkRoutedFlowCheck is the routed agent's per-packet policy work
// for a bulk flow: read the packet's flow, find it in the client's cache.
func BenchmarkRoutedFlowCheck(b *testing.B) {
	a, cs := routedTestAgent(b)
	pkt := ip4(6, 0, ports(40000, 80))
	b.ReportAllocs()
	for b.Loop() {
		f, ok := flowOf(pkt)
		if !ok || !cs.allowedFlow(a, f) {
			b.Fatal("refused")
		}
	}
}
