package control

import (
	"context"
	"net"
	"net/netip"
	"runtime"

	"github.com/nlvpn/nlvpn/platform"
)

// resolveUDP resolves the gateway's HOST:PORT to the address to dial over
// UDP. Where the name has addresses in both families, the first one this
// machine has a route to wins, IPv4 first (as Go's own resolver picks): on
// an IPv6-only network a gateway name with A and AAAA records still works,
// where taking the A record alone would fail every dial.
func resolveUDP(ctx context.Context, hostport string) (*net.UDPAddr, error) {
	return resolveUDPWith(ctx, hostport, net.DefaultResolver.LookupNetIP, routable)
}

// routable reports whether the node's sockets have a route to a (the
// kernel's route lookup, with the node's mark; nothing is sent). Only
// Linux is asked; elsewhere every address counts as routable.
func routable(a netip.Addr) bool {
	if runtime.GOOS != "linux" {
		return true
	}
	_, err := platform.PathMTU(a)
	return err == nil
}

func resolveUDPWith(ctx context.Context, hostport string, lookup func(ctx context.Context, network, host string) ([]netip.Addr, error), routable func(netip.Addr) bool) (*net.UDPAddr, error) {
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return nil, err
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return net.ResolveUDPAddr("udp", hostport) // a literal: nothing to choose
	}
	port, err := net.LookupPort("udp", portStr)
	if err != nil {
		return nil, err
	}
	ips, err := lookup(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	if len(ips) == 0 {
		return nil, &net.DNSError{Err: "no addresses", Name: host, IsNotFound: true}
	}
	var v4, v6 []netip.Addr
	for _, ip := range ips {
		if ip = ip.Unmap(); ip.Is4() {
			v4 = append(v4, ip)
		} else {
			v6 = append(v6, ip)
		}
	}
	ordered := append(v4, v6...)
	pick := ordered[0]
	for _, ip := range ordered {
		if routable(ip) {
			pick = ip
			break
		}
	}
	return net.UDPAddrFromAddrPort(netip.AddrPortFrom(pick, uint16(port))), nil
}
