//go:build linux

package lab

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"
)

// sock is a UDP socket in a lab namespace.
func sock(t *testing.T, ns string, ap netip.AddrPort) *net.UDPConn {
	t.Helper()
	uc, err := ListenUDP(ns, net.UDPAddrFromAddrPort(ap))
	if err != nil {
		t.Fatalf("listen %v in %s: %v", ap, ns, err)
	}
	t.Cleanup(func() { uc.Close() })
	return uc
}

// recv returns the source of the next datagram on uc within d, or an
// invalid AddrPort.
func recv(uc *net.UDPConn, d time.Duration) netip.AddrPort {
	uc.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 1500)
	_, from, err := uc.ReadFromUDPAddrPort(buf)
	if err != nil {
		return netip.AddrPort{}
	}
	return netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
}

func send(t *testing.T, uc *net.UDPConn, to netip.AddrPort) {
	t.Helper()
	if _, err := uc.WriteToUDPAddrPort([]byte("hi"), to); err != nil {
		t.Fatalf("send to %v: %v", to, err)
	}
}

// Internet6: each node reaches the gateway's IPv6 address from its own
// global address (no NAT66, whatever the IPv4 NAT); a router's firewall
// drops what nobody behind it asked for and lets in what answers a flow a
// node started, so two nodes that both send first (a punch) reach each
// other. IPv4 keeps its NATs. ClientIPv6Only leaves the client no IPv4
// route. BlockDirect and BlockClientUDP cover IPv6 as well.
func TestInternet6(t *testing.T) {
	requireLab(t)
	benchRange := netip.MustParsePrefix("2001:2::/48")
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"symmetric-symmetric", Options{ClientNAT: Symmetric, AgentNAT: Symmetric, Internet6: true}},
		{"none-cone", Options{ClientNAT: None, AgentNAT: Cone, Internet6: true, IPv6: true}},
		{"samelan", Options{ClientNAT: Cone, SameLAN: true, Internet6: true}},
		{"client-v6-only", Options{ClientNAT: Cone, AgentNAT: Cone, Internet6: true, ClientIPv6Only: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, tc.opts)
			for _, a := range []netip.Addr{l.Gateway6, l.ClientAddr6, l.AgentAddr6} {
				if !benchRange.Contains(a) {
					t.Fatalf("address %v outside 2001:2::/48", a)
				}
			}
			gw := sock(t, l.NS.GW, netip.AddrPortFrom(l.Gateway6, 4433))
			for _, n := range []struct {
				ns   string
				addr netip.Addr
			}{{l.NS.Client, l.ClientAddr6}, {l.NS.Agent, l.AgentAddr6}} {
				from := netip.AddrPortFrom(n.addr, 40000)
				c := sock(t, n.ns, from)
				send(t, c, netip.AddrPortFrom(l.Gateway6, 4433))
				if got := recv(gw, 3*time.Second); got != from {
					t.Fatalf("%s: the gateway saw %v, want %v (IPv6 is not NATed)", n.ns, got, from)
				}
				send(t, gw, from)
				if got := recv(c, 3*time.Second); got.Addr() != l.Gateway6 {
					t.Fatalf("%s: no answer from the gateway's IPv6 address (got %v)", n.ns, got)
				}
			}
			_, err := Output(context.Background(), l.NS.Client, "ping", "-4", "-c", "1", "-W", "2", l.Gateway.String())
			if tc.opts.ClientIPv6Only != (err != nil) {
				t.Fatalf("IPv4 from the client to the gateway: %v (IPv6-only: %v)", err, tc.opts.ClientIPv6Only)
			}
			if out, err := Output(context.Background(), l.NS.Agent, "ping", "-4", "-c", "1", "-W", "2", l.Gateway.String()); err != nil {
				t.Fatalf("IPv4 from the agent to the gateway: %v\n%s", err, out)
			}
			if tc.opts.SameLAN {
				return
			}
			a := netip.AddrPortFrom(l.AgentAddr6, 41000)
			c := netip.AddrPortFrom(l.ClientAddr6, 41000)
			as, cs := sock(t, l.NS.Agent, a), sock(t, l.NS.Client, c)
			// Unsolicited from the internet: dropped by the agent's router.
			send(t, gw, a)
			if got := recv(as, 500*time.Millisecond); got.IsValid() {
				t.Fatalf("an unsolicited datagram from %v reached the agent through its router's IPv6 firewall", got)
			}
			// The punch: the agent sends first (its router now expects the
			// client), which the client's router drops (it expects nobody)
			// unless the client has no router; then the client's reaches
			// the agent, and the agent's answer reaches the client.
			send(t, as, c)
			got := recv(cs, 500*time.Millisecond)
			if tc.opts.ClientNAT == None && got != a {
				t.Fatalf("the client without a router did not get the agent's datagram (got %v)", got)
			}
			if tc.opts.ClientNAT != None && got.IsValid() {
				t.Fatalf("the agent's first datagram reached the client through its router's IPv6 firewall")
			}
			send(t, cs, a)
			if got := recv(as, 3*time.Second); got != c {
				t.Fatalf("the client's datagram after the agent's did not reach the agent (got %v)", got)
			}
			send(t, as, c)
			if got := recv(cs, 3*time.Second); got != a {
				t.Fatalf("the agent's answer did not reach the client (got %v)", got)
			}
			// BlockDirect blocks the IPv6 path between the sides too;
			// UnblockDirect opens it again.
			ctx := context.Background()
			if err := l.BlockDirect(ctx); err != nil {
				t.Fatal(err)
			}
			send(t, cs, a)
			if got := recv(as, 500*time.Millisecond); got.IsValid() {
				t.Fatalf("UDP over IPv6 passed BlockDirect (from %v)", got)
			}
			if err := l.UnblockDirect(ctx); err != nil {
				t.Fatal(err)
			}
			send(t, cs, a)
			if got := recv(as, 3*time.Second); got != c {
				t.Fatalf("UDP over IPv6 after UnblockDirect: got %v", got)
			}
			if tc.opts.ClientNAT == None {
				return
			}
			// A network that blocks UDP blocks it over IPv6 too.
			if err := l.BlockClientUDP(ctx); err != nil {
				t.Fatal(err)
			}
			send(t, cs, netip.AddrPortFrom(l.Gateway6, 4433))
			if got := recv(gw, 500*time.Millisecond); got.IsValid() {
				t.Fatalf("UDP over IPv6 left a UDP-blocked network (from %v)", got)
			}
			if err := l.UnblockClientUDP(ctx); err != nil {
				t.Fatal(err)
			}
			send(t, cs, netip.AddrPortFrom(l.Gateway6, 4433))
			if got := recv(gw, 3*time.Second); got != c {
				t.Fatalf("UDP over IPv6 after UnblockClientUDP: got %v", got)
			}
		})
	}
}
