package punch

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestUsable(t *testing.T) {
	routed := []netip.Prefix{netip.MustParsePrefix("192.168.1.0/24"), netip.MustParsePrefix("fd00:1::/64")}
	for _, tc := range []struct {
		name  string
		in    []netip.AddrPort
		max   int
		want  []netip.AddrPort
		route []netip.Prefix
	}{
		{"public kept", []netip.AddrPort{ap("198.18.0.5:4000")}, 16, []netip.AddrPort{ap("198.18.0.5:4000")}, routed},
		{"overlay dropped", []netip.AddrPort{ap("100.64.0.7:4000"), ap("100.127.255.1:1"), ap("198.18.0.5:4000")}, 16, []netip.AddrPort{ap("198.18.0.5:4000")}, routed},
		{"just outside overlay kept", []netip.AddrPort{ap("100.128.0.1:4000"), ap("100.63.255.255:4000")}, 16, []netip.AddrPort{ap("100.128.0.1:4000"), ap("100.63.255.255:4000")}, routed},
		{"routed v4 dropped", []netip.AddrPort{ap("192.168.1.20:4000"), ap("192.168.2.20:4000")}, 16, []netip.AddrPort{ap("192.168.2.20:4000")}, routed},
		{"routed v6 dropped", []netip.AddrPort{ap("[fd00:1::5]:4000"), ap("[fd00:2::5]:4000")}, 16, []netip.AddrPort{ap("[fd00:2::5]:4000")}, routed},
		{"v4-mapped routed dropped and unmapped", []netip.AddrPort{ap("[::ffff:192.168.1.20]:4000"), ap("[::ffff:198.18.0.1]:5")}, 16, []netip.AddrPort{ap("198.18.0.1:5")}, routed},
		{"v4-mapped overlay dropped", []netip.AddrPort{ap("[::ffff:100.64.1.1]:4000")}, 16, nil, routed},
		{"port 0 dropped", []netip.AddrPort{ap("198.18.0.5:0")}, 16, nil, routed},
		{"unspecified dropped", []netip.AddrPort{ap("0.0.0.0:4000"), ap("[::]:4000")}, 16, nil, routed},
		{"multicast dropped", []netip.AddrPort{ap("224.0.0.251:5353"), ap("[ff02::1]:4000")}, 16, nil, routed},
		{"invalid dropped", []netip.AddrPort{{}}, 16, nil, routed},
		{"no routes", []netip.AddrPort{ap("192.168.1.20:4000")}, 16, []netip.AddrPort{ap("192.168.1.20:4000")}, nil},
		{"default route swallows all", []netip.AddrPort{ap("192.168.1.20:4000"), ap("198.18.0.1:1")}, 16, nil, []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}},
		{"order kept", []netip.AddrPort{ap("198.18.0.2:2"), ap("198.18.0.1:1")}, 16, []netip.AddrPort{ap("198.18.0.2:2"), ap("198.18.0.1:1")}, routed},
		{"cap counts kept only", []netip.AddrPort{ap("100.64.0.1:1"), ap("198.18.0.1:1"), ap("198.18.0.2:1"), ap("198.18.0.3:1")}, 2, []netip.AddrPort{ap("198.18.0.1:1"), ap("198.18.0.2:1")}, routed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Usable(tc.in, tc.route, tc.max)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Usable(%v) = %v, want %v", tc.in, got, tc.want)
			}
		})
	}
}

func TestUsableCapsAtMax(t *testing.T) {
	var in []netip.AddrPort
	for i := range 40 {
		in = append(in, netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 1, byte(i + 1)}), 4433))
	}
	for _, max := range []int{1, 5, MaxCandidates} {
		got := Usable(in, nil, max)
		if len(got) != max {
			t.Fatalf("max %d: got %d candidates", max, len(got))
		}
		if !slices.Equal(got, in[:max]) {
			t.Fatalf("max %d: got %v, want the first %d", max, got, max)
		}
	}
}

func TestCandidates(t *testing.T) {
	observed := ap("198.18.0.9:40000")
	got := Candidates(observed, 4433)
	if len(got) == 0 || got[0] != observed {
		t.Fatalf("Candidates = %v; want the observed address %v first", got, observed)
	}
	seen := map[netip.AddrPort]bool{}
	for i, c := range got {
		if seen[c] {
			t.Errorf("duplicate candidate %v", c)
		}
		seen[c] = true
		a := c.Addr()
		if a.IsLoopback() || a.IsMulticast() || a.IsUnspecified() || a.IsLinkLocalUnicast() {
			t.Errorf("candidate %v is not reachable by a peer", c)
		}
		if overlay.Contains(a.Unmap()) {
			t.Errorf("candidate %v is in the overlay", c)
		}
		if i > 0 && c.Port() != 4433 {
			t.Errorf("interface candidate %v does not carry the socket's port", c)
		}
	}
}

func TestCandidatesNoObserved(t *testing.T) {
	got := Candidates(netip.AddrPort{}, 4433)
	for _, c := range got {
		if !c.IsValid() {
			t.Fatalf("invalid candidate in %v", got)
		}
		if c.Port() != 4433 || c.Addr().IsLoopback() {
			t.Fatalf("bad candidate %v", c)
		}
	}
	// An observed address that is also an interface address is listed once.
	if len(got) > 0 {
		again := Candidates(got[0], 4433)
		if n := len(again); n != len(got) {
			t.Fatalf("observed == interface address: %d candidates, want %d (%v)", n, len(got), again)
		}
		if again[0] != got[0] {
			t.Fatal(fmt.Sprint("observed not first: ", again))
		}
	}
}
