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

// candidatesFrom: what a node announces from its interface addresses.
func TestCandidatesFrom(t *testing.T) {
	addrs := func(ss ...string) []netip.Addr {
		var out []netip.Addr
		for _, s := range ss {
			out = append(out, netip.MustParseAddr(s))
		}
		return out
	}
	aps := func(ss ...string) []netip.AddrPort {
		var out []netip.AddrPort
		for _, s := range ss {
			out = append(out, ap(s))
		}
		return out
	}
	obs := ap("198.18.2.2:40000")
	for _, tc := range []struct {
		name     string
		observed netip.AddrPort
		local    []netip.Addr
		want     []netip.AddrPort
	}{
		{"dual stack behind a NAT: observed, global v6, LAN v4",
			obs, addrs("127.0.0.1", "10.0.1.2", "::1", "2001:2:0:12::2", "fe80::1"),
			aps("198.18.2.2:40000", "[2001:2:0:12::2]:4433", "10.0.1.2:4433")},
		{"v6 observed (an IPv6-only network) is also the interface address: once",
			ap("[2001:2:0:12::2]:4433"), addrs("2001:2:0:12::2", "10.0.1.2"),
			aps("[2001:2:0:12::2]:4433", "10.0.1.2:4433")},
		{"v4-mapped observed is unmapped", ap("[::ffff:198.18.2.2]:40000"), nil, aps("198.18.2.2:40000")},
		{"ULA kept for the same LAN, after global v6", obs, addrs("fd00:77::1", "2001:2:0:13::2"),
			aps("198.18.2.2:40000", "[2001:2:0:13::2]:4433", "[fd00:77::1]:4433")},
		{"the overlays (v4 and v6: the TUN's) never", obs, addrs("100.64.0.3", "fd6e:6c76:706e::6440:3", "10.0.1.2"),
			aps("198.18.2.2:40000", "10.0.1.2:4433")},
		{"link-local, multicast, unspecified never", netip.AddrPort{}, addrs("fe80::1", "169.254.1.1", "ff02::1", "::", "0.0.0.0"), nil},
		{"IPv6 standing for IPv4 hosts, documentation: not announced", obs,
			addrs("64:ff9b::a00:1", "2002:c612:202::1", "2001:0:1::1", "2001:db8::1", "3fff::2"), aps("198.18.2.2:40000")},
		{"at most MaxGlobal6 global v6 (privacy addresses)", obs,
			addrs("2001:2:0:12::a", "2001:2:0:12::b", "2001:2:0:12::c", "2001:2:0:12::d", "2001:2:0:12::e", "10.0.1.2"),
			aps("198.18.2.2:40000", "[2001:2:0:12::a]:4433", "[2001:2:0:12::b]:4433", "[2001:2:0:12::c]:4433", "[2001:2:0:12::d]:4433", "10.0.1.2:4433")},
		{"zones dropped, duplicates once", obs, addrs("10.0.1.2", "10.0.1.2", "2001:2:0:12::2%eth0", "2001:2:0:12::2"),
			aps("198.18.2.2:40000", "[2001:2:0:12::2]:4433", "10.0.1.2:4433")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := candidatesFrom(tc.observed, 4433, tc.local)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("candidatesFrom(%v, %v) = %v, want %v", tc.observed, tc.local, got, tc.want)
			}
		})
	}
	// Never more than wire.MaxCandidates, whatever the interfaces hold.
	var many []netip.Addr
	for i := range 40 {
		many = append(many, netip.AddrFrom4([4]byte{10, 0, byte(i), 2}))
	}
	if got := candidatesFrom(obs, 4433, many); len(got) != MaxCandidates || got[0] != obs {
		t.Fatalf("40 interface addresses: %d candidates (first %v), want %d with the observed first", len(got), got[0], MaxCandidates)
	}
}

func TestGlobal6(t *testing.T) {
	for s, want := range map[string]bool{
		"2001:2:0:12::2": true, "2a00:1450::1": true, "2600::1": true,
		"fd00:77::1": false, "fe80::1": false, "::1": false, "::": false, "ff02::1": false,
		"::ffff:198.18.0.1": false, "198.18.0.1": false, "64:ff9b::1": false, "2002::1": false,
		"2001::1": false, "2001:db8::1": false, "fd6e:6c76:706e::1": false,
	} {
		if got := Global6(netip.MustParseAddr(s)); got != want {
			t.Errorf("Global6(%s) = %v, want %v", s, got, want)
		}
	}
}

func TestUsableDropsOverlay6(t *testing.T) {
	in := []netip.AddrPort{ap("[fd6e:6c76:706e::6440:2]:4000"), ap("[2001:2:0:12::2]:4000")}
	if got := Usable(in, nil, 16); !slices.Equal(got, in[1:]) {
		t.Fatalf("Usable(%v) = %v, want only the global one", in, got)
	}
}
