package client

import (
	"fmt"
	"net/netip"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/wire"
)

// RoutePolicy is what the user accepted beyond the agent's ordinary
// subnets. The agent says what it serves, but this machine decides what it
// routes to it: an agent (or whoever took over its name) must not be able to
// pull in a default route, the gateway's address or the local network.
type RoutePolicy struct {
	// Accept lists prefixes the user accepted (--accept-routes): an
	// advertised subnet inside one of them is routed whatever else holds.
	Accept []netip.Prefix
	// ExitNode accepts a default route (0.0.0.0/0, ::/0) from the agent.
	ExitNode bool
}

// Prefixes broader than these (IPv4 /8, IPv6 /16) are over-broad: no
// office subnet is that large, and they would take most of the internet.
const (
	broadV4Bits = 8
	broadV6Bits = 16
)

// routeRefusal is an advertised subnet this machine does not route, why,
// and what to type to route it anyway.
type routeRefusal struct {
	Prefix netip.Prefix
	Why    string
	Accept string
}

// acceptRoutes splits what the agent advertises into the routes to install
// and the refused ones. gateways are the gateway's addresses; ownNets the
// networks this machine is on (its interfaces' subnets).
func acceptRoutes(advertised []netip.Prefix, pol RoutePolicy, gateways []netip.Addr, ownNets []netip.Prefix) (ok []netip.Prefix, refused []routeRefusal) {
	for _, p := range advertised {
		p = p.Masked()
		if r, bad := judgeRoute(p, pol, gateways, ownNets); bad {
			refused = append(refused, r)
			continue
		}
		ok = append(ok, p)
	}
	return ok, refused
}

func judgeRoute(p netip.Prefix, pol RoutePolicy, gateways []netip.Addr, ownNets []netip.Prefix) (routeRefusal, bool) {
	acceptIt := "--accept-routes " + p.String()
	if p.Bits() == 0 {
		if pol.ExitNode {
			return routeRefusal{}, false
		}
		return routeRefusal{p, "a default route: all of this machine's traffic would go to the agent", "--exit-node"}, true
	}
	for _, a := range pol.Accept {
		if a.Bits() <= p.Bits() && a.Contains(p.Addr()) {
			return routeRefusal{}, false
		}
	}
	if (p.Addr().Is4() && p.Bits() < broadV4Bits) || (p.Addr().Is6() && p.Bits() < broadV6Bits) {
		return routeRefusal{p, fmt.Sprintf("broader than /%d (IPv6 /%d)", broadV4Bits, broadV6Bits), acceptIt}, true
	}
	if p.Addr().Is4() && wire.OverlayPrefix.Overlaps(p) {
		return routeRefusal{p, "overlaps the overlay range " + wire.OverlayPrefix.String(), acceptIt}, true
	}
	for _, gw := range gateways {
		if p.Contains(gw) {
			return routeRefusal{p, "contains the gateway's address " + gw.String(), acceptIt}, true
		}
	}
	for _, n := range ownNets {
		if p.Overlaps(n) {
			return routeRefusal{p, "overlaps this machine's own network " + n.String(), acceptIt}, true
		}
	}
	return routeRefusal{}, false
}

// ownNetworks returns the subnets of this machine's interfaces, except
// loopback and link-local (every interface has fe80::/64; routing it is
// refused elsewhere anyway).
func ownNetworks() ([]netip.Prefix, error) {
	ps, err := platform.InterfacePrefixes()
	if err != nil {
		return nil, err
	}
	var nets []netip.Prefix
	for _, p := range ps {
		ip := p.Addr()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || wire.OverlayPrefix.Contains(ip) {
			continue
		}
		nets = append(nets, p.Masked())
	}
	return nets, nil
}
