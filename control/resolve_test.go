package control

import (
	"context"
	"errors"
	"net/netip"
	"testing"
)

// A gateway name with addresses in both families: the first routable one,
// IPv4 first; literals as given; no routable address: the first, so the
// dial fails with the real error.
func TestResolveUDP(t *testing.T) {
	v4, v6 := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("2001:2:0:1::2")
	lookup := func(ips ...netip.Addr) func(context.Context, string, string) ([]netip.Addr, error) {
		return func(context.Context, string, string) ([]netip.Addr, error) { return ips, nil }
	}
	only := func(ok ...netip.Addr) func(netip.Addr) bool {
		return func(a netip.Addr) bool {
			for _, o := range ok {
				if a == o {
					return true
				}
			}
			return false
		}
	}
	for _, tc := range []struct {
		name     string
		hostport string
		ips      []netip.Addr
		routable func(netip.Addr) bool
		want     string
	}{
		{"dual-stack machine: IPv4 first", "gw.test:4433", []netip.Addr{v6, v4}, only(v4, v6), "198.18.1.2:4433"},
		{"IPv6-only network", "gw.test:4433", []netip.Addr{v4, v6}, only(v6), "[2001:2:0:1::2]:4433"},
		{"IPv4-only network", "gw.test:4433", []netip.Addr{v6, v4}, only(v4), "198.18.1.2:4433"},
		{"no route at all: the first, IPv4", "gw.test:4433", []netip.Addr{v6, v4}, only(), "198.18.1.2:4433"},
		{"only AAAA", "gw.test:4433", []netip.Addr{v6}, only(), "[2001:2:0:1::2]:4433"},
		{"v4-mapped answer unmapped", "gw.test:4433", []netip.Addr{netip.MustParseAddr("::ffff:198.18.1.2")}, only(v4), "198.18.1.2:4433"},
		{"IPv6 literal", "[2001:2:0:1::2]:4433", nil, only(), "[2001:2:0:1::2]:4433"},
		{"IPv4 literal", "198.18.1.2:4433", nil, only(), "198.18.1.2:4433"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveUDPWith(context.Background(), tc.hostport, lookup(tc.ips...), tc.routable)
			if err != nil || got.String() != tc.want {
				t.Fatalf("resolveUDP(%s) = %v, %v; want %s", tc.hostport, got, err, tc.want)
			}
		})
	}
	failing := func(context.Context, string, string) ([]netip.Addr, error) { return nil, errors.New("no such host") }
	if _, err := resolveUDPWith(context.Background(), "gw.test:4433", failing, only()); err == nil {
		t.Fatal("a failed lookup resolved")
	}
	if _, err := resolveUDPWith(context.Background(), "gw.test:4433", lookup(), only()); err == nil {
		t.Fatal("an empty answer resolved")
	}
	if _, err := resolveUDPWith(context.Background(), "gw.test", lookup(v4), only(v4)); err == nil {
		t.Fatal("no port resolved")
	}
}

// routable asks the kernel: loopback has a route on every test machine.
func TestRoutableLoopback(t *testing.T) {
	if !routable(netip.MustParseAddr("127.0.0.1")) {
		t.Fatal("no route to 127.0.0.1")
	}
}
