//go:build linux

// Package lab builds a small simulated internet out of Linux network
// namespaces, for the end-to-end tests, the demo and the benchmarks.
//
// Topology (addresses are the defaults; every name carries a per-run prefix):
//
//	                  inet (router, 198.18.x.1 on every link)
//	       ┌────────────────┼─────────────────────┐
//	gw 198.18.1.2   client side 198.18.2.2   agent side 198.18.3.2
//	                   │ (NAT router or the      │ (NAT router or the
//	                   │  client itself)         │  agent itself)
//	              client 10.0.1.2           agent 10.0.2.2
//	                                           │ 192.168.77.1
//	                                        lan 192.168.77.10 (no default route)
//
// With SameLAN, client (10.0.1.2) and agent (10.0.1.3) share one NAT router
// (198.18.2.2) on one bridged LAN.
//
// Only 198.18.0.0/15 ("public"), 10.x and 192.168.77.0/24 are used, all of
// them inside namespaces this package creates. IPv6 is disabled in every lab
// namespace, except where Options.IPv6 (the agent's LAN) or
// Options.Internet6 (the simulated internet, 2001:2::/48) turn it on for
// the links they use; those links join lab namespaces only.
package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// NAT is the kind of NAT in front of a node.
type NAT int

const (
	// None puts the node directly on the internet with a public address.
	None NAT = iota
	// Cone is nftables masquerade, which keeps the source port when it can
	// (endpoint-independent mapping).
	Cone
	// Symmetric is nftables "masquerade random,fully-random": every
	// flow gets a random port (endpoint-dependent mapping).
	Symmetric
)

func (n NAT) String() string {
	switch n {
	case None:
		return "none"
	case Cone:
		return "cone"
	case Symmetric:
		return "symmetric"
	}
	return fmt.Sprintf("NAT(%d)", int(n))
}

// ParseNAT parses "none", "cone" or "symmetric".
func ParseNAT(s string) (NAT, error) {
	switch strings.ToLower(s) {
	case "none", "public":
		return None, nil
	case "cone":
		return Cone, nil
	case "symmetric", "sym":
		return Symmetric, nil
	}
	return None, fmt.Errorf("unknown NAT kind %q (want none, cone or symmetric)", s)
}

// Options selects the topology variant.
type Options struct {
	ClientNAT NAT
	AgentNAT  NAT
	// SameLAN puts client and agent behind one NAT on the same 10.0.1.0/24
	// LAN. The NAT kind is ClientNAT (None is treated as Cone).
	SameLAN bool
	// ClientUplinkMTU and AgentUplinkMTU, when set, are the MTU of that
	// side's internet link (both ends of the veth between inet and the
	// side's NAT router, or the node itself without NAT): a small path MTU
	// such as PPPoE (1492) or a tunnel (1280) somewhere on the way. Packets
	// too big for it are dropped by the router in front of it with ICMP
	// "fragmentation needed" back to the sender.
	ClientUplinkMTU, AgentUplinkMTU int
	// Prefix overrides the random per-run prefix (keep it short, e.g. "nv1a2b").
	Prefix string
	// IPv6 gives the LAN an IPv6 subnet next to the IPv4 one
	// (fd00:77::/64: the agent fd00:77::1, the LAN host fd00:77::10) and
	// turns IPv6 on in the client's namespace (for its TUN's IPv6 overlay
	// address). Everywhere else, and on every other link, it stays off:
	// the simulated internet is IPv4.
	IPv6 bool
	// Internet6 makes the simulated internet dual-stack. Its IPv6 part is
	// 2001:2::/48, the IPv6 benchmarking range (RFC 5180), as
	// 198.18.0.0/15 (RFC 2544) is the IPv4 part: addresses no real
	// network uses. The gateway host gets 2001:2:0:1::2; each NAT router
	// gets a global /64 for its LAN (the client's 2001:2:0:12::/64, the
	// agent's 2001:2:0:13::/64, the node ::2 in it; with SameLAN one
	// 2001:2:0:12::/64, the agent ::3), routed to it by inet. As home
	// routers do, the routers do not NAT IPv6: their nodes' addresses are
	// global, behind a stateful firewall that forwards from the WAN only
	// what belongs to a flow the LAN started (ct state
	// established,related). A side without NAT takes 2001:2:0:2::2 or
	// 2001:2:0:3::2 on its WAN link. The IPv4 NATs stay as they are.
	Internet6 bool
	// ClientIPv6Only (with Internet6) leaves the client's namespace
	// without an IPv4 route: an IPv6-only network, where only the
	// gateway's IPv6 address can be reached.
	ClientIPv6Only bool
	// Logf, when set, receives every command the lab runs.
	Logf func(format string, args ...any)
}

// Namespaces holds the names of the lab's network namespaces. ClientNAT and
// AgentNAT are empty when that side has no NAT; with SameLAN both name the
// one shared NAT router.
type Namespaces struct {
	Inet, GW, ClientNAT, Client, AgentNAT, Agent, LAN string
}

// Lab is one built topology. Fields are set by New (or Prepare) and must not
// be changed by callers.
type Lab struct {
	Prefix string
	Opts   Options
	NS     Namespaces

	// Gateway is the gateway host's public address.
	Gateway netip.Addr
	// ClientPublic and AgentPublic are the addresses the internet sees for
	// each side: the NAT's WAN address, or the node's own when NAT is None.
	ClientPublic, AgentPublic netip.Addr
	// ClientAddr and AgentAddr are the nodes' own underlay addresses.
	ClientAddr, AgentAddr netip.Addr
	// AgentLANAddr is the agent's address on the LAN, LANHost the LAN host's.
	AgentLANAddr, LANHost netip.Addr
	LANSubnet             netip.Prefix
	// With Options.IPv6: the same for the LAN's IPv6 subnet; invalid
	// without.
	AgentLANAddr6, LANHost6 netip.Addr
	LANSubnet6              netip.Prefix
	// With Options.Internet6: the gateway host's IPv6 address and the
	// nodes' own global IPv6 addresses (no NAT: also what the internet
	// sees); invalid without.
	Gateway6, ClientAddr6, AgentAddr6 netip.Addr

	mu      sync.Mutex
	nsMu    sync.Mutex // held while a namespace is being created
	created []string   // namespaces created, in order
	procs   []*Process
	closed  bool
	blocked bool
}

// Fixed addressing plan.
var (
	inetGW     = netip.MustParseAddr("198.18.1.1")
	gwAddr     = netip.MustParseAddr("198.18.1.2")
	inetCli    = netip.MustParseAddr("198.18.2.1")
	cliPub     = netip.MustParseAddr("198.18.2.2")
	inetAgt    = netip.MustParseAddr("198.18.3.1")
	agtPub     = netip.MustParseAddr("198.18.3.2")
	cliLANGW   = netip.MustParseAddr("10.0.1.1")
	cliLAN     = netip.MustParseAddr("10.0.1.2")
	sameAgt    = netip.MustParseAddr("10.0.1.3")
	agtLANGW   = netip.MustParseAddr("10.0.2.1")
	agtLAN     = netip.MustParseAddr("10.0.2.2")
	agtLAN77   = netip.MustParseAddr("192.168.77.1")
	lanHost    = netip.MustParseAddr("192.168.77.10")
	agtLAN6    = netip.MustParseAddr("fd00:77::1")
	lanHost6   = netip.MustParseAddr("fd00:77::10")
	lanSubnet6 = netip.MustParsePrefix("fd00:77::/64")
	lanSubnet  = netip.MustParsePrefix("192.168.77.0/24")

	// Options.Internet6, inside 2001:2::/48 (RFC 5180): one /64 per link.
	inetGW6  = netip.MustParseAddr("2001:2:0:1::1")
	gwAddr6  = netip.MustParseAddr("2001:2:0:1::2")
	inetCli6 = netip.MustParseAddr("2001:2:0:2::1")
	cliWAN6  = netip.MustParseAddr("2001:2:0:2::2")
	inetAgt6 = netip.MustParseAddr("2001:2:0:3::1")
	agtWAN6  = netip.MustParseAddr("2001:2:0:3::2")
	cliNet6  = netip.MustParsePrefix("2001:2:0:12::/64") // the client's LAN (and SameLAN's)
	agtNet6  = netip.MustParsePrefix("2001:2:0:13::/64") // the agent's LAN
)

// hostIn returns the address of prefix p whose last byte is n.
func hostIn(p netip.Prefix, n byte) netip.Addr {
	a := p.Addr().As16()
	a[15] = n
	return netip.AddrFrom16(a)
}

// RandomPrefix returns "nv" followed by 4 random hex digits.
func RandomPrefix() string {
	var b [2]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return "nv" + hex.EncodeToString(b[:])
}

// Prepare fills in names and addresses without touching the system. Call
// Build to create the topology and Close to remove it; Close is safe at any
// point, also concurrently with a Build in progress (Build then stops).
func Prepare(opts Options) *Lab {
	p := opts.Prefix
	if p == "" {
		p = RandomPrefix()
	}
	l := &Lab{
		Prefix:       p,
		Opts:         opts,
		Gateway:      gwAddr,
		AgentLANAddr: agtLAN77,
		LANHost:      lanHost,
		LANSubnet:    lanSubnet,
	}
	if opts.IPv6 {
		l.AgentLANAddr6, l.LANHost6, l.LANSubnet6 = agtLAN6, lanHost6, lanSubnet6
	}
	if opts.Internet6 {
		l.Gateway6 = gwAddr6
		switch {
		case opts.SameLAN:
			l.ClientAddr6, l.AgentAddr6 = hostIn(cliNet6, 2), hostIn(cliNet6, 3)
		default:
			l.ClientAddr6, l.AgentAddr6 = cliWAN6, agtWAN6
			if opts.ClientNAT != None {
				l.ClientAddr6 = hostIn(cliNet6, 2)
			}
			if opts.AgentNAT != None {
				l.AgentAddr6 = hostIn(agtNet6, 2)
			}
		}
	}
	n := func(role string) string { return p + "-" + role }
	l.NS = Namespaces{Inet: n("inet"), GW: n("gw"), Client: n("cli"), Agent: n("agt"), LAN: n("lan")}
	switch {
	case opts.SameLAN:
		l.NS.ClientNAT = n("nat")
		l.NS.AgentNAT = l.NS.ClientNAT
		l.ClientPublic, l.AgentPublic = cliPub, cliPub
		l.ClientAddr, l.AgentAddr = cliLAN, sameAgt
	default:
		l.ClientPublic, l.AgentPublic = cliPub, agtPub
		l.ClientAddr, l.AgentAddr = cliPub, agtPub
		if opts.ClientNAT != None {
			l.NS.ClientNAT = n("cnat")
			l.ClientAddr = cliLAN
		}
		if opts.AgentNAT != None {
			l.NS.AgentNAT = n("anat")
			l.AgentAddr = agtLAN
		}
	}
	return l
}

// New builds the topology. On failure everything built so far is removed.
func New(ctx context.Context, opts Options) (*Lab, error) {
	l := Prepare(opts)
	if err := l.Build(ctx); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Namespaces returns the names of all namespaces of this lab (deduplicated).
func (l *Lab) Namespaces() []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range []string{l.NS.Inet, l.NS.GW, l.NS.ClientNAT, l.NS.Client, l.NS.AgentNAT, l.NS.Agent, l.NS.LAN} {
		if s != "" && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// GatewayAddrPort returns the gateway's public address with port.
func (l *Lab) GatewayAddrPort(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(l.Gateway, port)
}

func (l *Lab) logf(format string, args ...any) {
	if l.Opts.Logf != nil {
		l.Opts.Logf(format, args...)
	}
}

// Build creates namespaces, links, addresses, routes and NAT rules.
func (l *Lab) Build(ctx context.Context) error {
	for _, ns := range l.Namespaces() {
		if err := l.addNS(ctx, ns); err != nil {
			return err
		}
	}
	// inet <-> gw
	if err := l.link(ctx, l.NS.Inet, "gw0", inetGW, l.NS.GW, "wan0", gwAddr, 24); err != nil {
		return err
	}
	if err := l.defaultRoute(ctx, l.NS.GW, inetGW); err != nil {
		return err
	}
	if l.Opts.SameLAN {
		if err := l.buildSameLAN(ctx); err != nil {
			return err
		}
	} else {
		if err := l.buildSide(ctx, l.Opts.ClientNAT, l.NS.ClientNAT, l.NS.Client, "cli0", inetCli, cliPub, cliLANGW, cliLAN); err != nil {
			return err
		}
		if err := l.buildSide(ctx, l.Opts.AgentNAT, l.NS.AgentNAT, l.NS.Agent, "agt0", inetAgt, agtPub, agtLANGW, agtLAN); err != nil {
			return err
		}
	}
	if err := l.uplinkMTUs(ctx); err != nil {
		return err
	}
	// agent <-> LAN host; the LAN host gets no default route at all.
	if err := l.link(ctx, l.NS.Agent, "lan0", agtLAN77, l.NS.LAN, "eth0", lanHost, 24); err != nil {
		return err
	}
	if l.Opts.IPv6 {
		if err := l.buildIPv6LAN(ctx); err != nil {
			return err
		}
	}
	if l.Opts.Internet6 {
		if err := l.buildInternet6(ctx); err != nil {
			return err
		}
	} else if l.Opts.ClientIPv6Only {
		return errors.New("lab: ClientIPv6Only needs Internet6")
	}
	if err := l.sysctl(l.NS.Inet, "net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	// The agent is not a router: its LAN is reachable only through the
	// agent's own sockets (the VPN's egress), never by forwarding.
	return l.sysctl(l.NS.Agent, "net/ipv4/ip_forward", "0")
}

// buildIPv6LAN turns IPv6 on for the agent's LAN link only (and for
// devices made later in the client's namespace: its TUN) and addresses it.
// No DAD: the addresses are usable at once.
func (l *Lab) buildIPv6LAN(ctx context.Context) error {
	for _, s := range []struct{ ns, key string }{
		{l.NS.Agent, "net/ipv6/conf/lan0/disable_ipv6"}, {l.NS.LAN, "net/ipv6/conf/eth0/disable_ipv6"},
		{l.NS.Agent, "net/ipv6/conf/lo/disable_ipv6"}, {l.NS.LAN, "net/ipv6/conf/lo/disable_ipv6"},
		{l.NS.Client, "net/ipv6/conf/all/disable_ipv6"}, {l.NS.Client, "net/ipv6/conf/default/disable_ipv6"},
		{l.NS.Client, "net/ipv6/conf/lo/disable_ipv6"},
	} {
		if err := l.sysctl(s.ns, s.key, "0"); err != nil {
			return err
		}
	}
	// Writing "all" reaches the devices that exist too: the client's
	// uplink (eth0 behind a NAT, wan0 without) goes back to IPv6 off.
	for _, dev := range []string{"eth0", "wan0"} {
		if err := l.sysctl(l.NS.Client, "net/ipv6/conf/"+dev+"/disable_ipv6", "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	for _, s := range [][]string{
		{"-n", l.NS.Agent, "addr", "add", fmt.Sprintf("%s/%d", agtLAN6, lanSubnet6.Bits()), "dev", "lan0", "nodad"},
		{"-n", l.NS.LAN, "addr", "add", fmt.Sprintf("%s/%d", lanHost6, lanSubnet6.Bits()), "dev", "eth0", "nodad"},
	} {
		if err := l.ip(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

// buildInternet6 adds the IPv6 half of a dual-stack internet
// (Options.Internet6) on the links Build made: addresses, routes, and on
// each NAT router a stateful IPv6 firewall instead of a NAT. No DAD: the
// addresses are usable at once.
func (l *Lab) buildInternet6(ctx context.Context) error {
	type addr struct {
		ns, dev string
		a       netip.Addr
	}
	type route struct {
		ns, dst string
		via     netip.Addr
	}
	addrs := []addr{{l.NS.Inet, "gw0", inetGW6}, {l.NS.GW, "wan0", gwAddr6}}
	routes := []route{{l.NS.GW, "default", inetGW6}}
	routers := []string{l.NS.Inet}
	side := func(kind NAT, natNS, hostNS, inetIf string, inetAddr, wan netip.Addr, lan netip.Prefix, node netip.Addr) {
		addrs = append(addrs, addr{l.NS.Inet, inetIf, inetAddr})
		if kind == None {
			addrs = append(addrs, addr{hostNS, "wan0", wan})
			routes = append(routes, route{hostNS, "default", inetAddr})
			return
		}
		addrs = append(addrs, addr{natNS, "wan0", wan}, addr{natNS, "lan0", hostIn(lan, 1)}, addr{hostNS, "eth0", node})
		routes = append(routes, route{natNS, "default", inetAddr}, route{hostNS, "default", hostIn(lan, 1)},
			route{l.NS.Inet, lan.String(), wan})
		routers = append(routers, natNS)
	}
	if l.Opts.SameLAN {
		nat := l.NS.ClientNAT
		addrs = append(addrs, addr{l.NS.Inet, "cli0", inetCli6}, addr{nat, "wan0", cliWAN6}, addr{nat, "br0", hostIn(cliNet6, 1)},
			addr{l.NS.Client, "eth0", l.ClientAddr6}, addr{l.NS.Agent, "eth0", l.AgentAddr6})
		routes = append(routes, route{nat, "default", inetCli6}, route{l.NS.Inet, cliNet6.String(), cliWAN6},
			route{l.NS.Client, "default", hostIn(cliNet6, 1)}, route{l.NS.Agent, "default", hostIn(cliNet6, 1)})
		routers = append(routers, nat)
		// The bridge's ports carry IPv6 too.
		for _, port := range []string{"c0", "a0"} {
			if err := l.sysctl(nat, "net/ipv6/conf/"+port+"/disable_ipv6", "0"); err != nil {
				return err
			}
		}
	} else {
		side(l.Opts.ClientNAT, l.NS.ClientNAT, l.NS.Client, "cli0", inetCli6, cliWAN6, cliNet6, l.ClientAddr6)
		side(l.Opts.AgentNAT, l.NS.AgentNAT, l.NS.Agent, "agt0", inetAgt6, agtWAN6, agtNet6, l.AgentAddr6)
	}
	for _, a := range addrs {
		for _, dev := range []string{a.dev, "lo"} {
			if err := l.sysctl(a.ns, "net/ipv6/conf/"+dev+"/disable_ipv6", "0"); err != nil {
				return err
			}
		}
		if err := l.ip(ctx, "-n", a.ns, "addr", "add", a.a.String()+"/64", "dev", a.dev, "nodad"); err != nil {
			return err
		}
	}
	for _, r := range routes {
		if err := l.ip(ctx, "-n", r.ns, "-6", "route", "add", r.dst, "via", r.via.String()); err != nil {
			return err
		}
	}
	for _, ns := range routers {
		if err := l.sysctl(ns, "net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
	}
	// A home router's IPv6 firewall: no NAT, nothing unsolicited in from
	// the WAN. An outbound packet opens its flow, and the answers (and
	// ICMPv6 errors about it, "packet too big" among them) come back; so
	// two nodes behind such routers reach each other only by both sending
	// first: punching, as with cone NATs, but always on the nodes' own
	// addresses and ports.
	for _, ns := range routers[1:] {
		if err := l.nft(ctx, ns, `table ip6 nvlab6 {
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "wan0" ct state established,related accept
		iifname "wan0" drop
	}
}
`); err != nil {
			return err
		}
	}
	if l.Opts.ClientIPv6Only {
		// Keep the client's IPv4 address on its link (routers and tests
		// still see it) but give it no route anywhere beyond.
		if err := l.ip(ctx, "-n", l.NS.Client, "-4", "route", "del", "default"); err != nil {
			return err
		}
	}
	return nil
}

// GatewayAddrPort6 returns the gateway's IPv6 address with port (with
// Options.Internet6).
func (l *Lab) GatewayAddrPort6(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(l.Gateway6, port)
}

// uplinkMTUs sets the MTUs of Options.ClientUplinkMTU and AgentUplinkMTU.
func (l *Lab) uplinkMTUs(ctx context.Context) error {
	for _, s := range []struct {
		mtu                   int
		inetIf, natNS, hostNS string
	}{
		{l.Opts.ClientUplinkMTU, "cli0", l.NS.ClientNAT, l.NS.Client},
		{l.Opts.AgentUplinkMTU, "agt0", l.NS.AgentNAT, l.NS.Agent},
	} {
		if s.mtu == 0 {
			continue
		}
		if s.mtu < 576 || s.mtu > 1500 {
			return fmt.Errorf("lab: uplink MTU %d outside 576..1500", s.mtu)
		}
		if l.Opts.SameLAN && s.inetIf == "agt0" {
			return errors.New("lab: with SameLAN the agent shares the client's uplink (set ClientUplinkMTU)")
		}
		wanNS := s.natNS
		if wanNS == "" {
			wanNS = s.hostNS
		}
		mtu := fmt.Sprint(s.mtu)
		if err := l.ip(ctx, "-n", l.NS.Inet, "link", "set", s.inetIf, "mtu", mtu); err != nil {
			return err
		}
		if err := l.ip(ctx, "-n", wanNS, "link", "set", "wan0", "mtu", mtu); err != nil {
			return err
		}
	}
	return nil
}

func (l *Lab) buildSide(ctx context.Context, kind NAT, natNS, hostNS, inetIf string, inetAddr, pub, lanGW, lanAddr netip.Addr) error {
	if kind == None {
		if err := l.link(ctx, l.NS.Inet, inetIf, inetAddr, hostNS, "wan0", pub, 24); err != nil {
			return err
		}
		return l.defaultRoute(ctx, hostNS, inetAddr)
	}
	if err := l.link(ctx, l.NS.Inet, inetIf, inetAddr, natNS, "wan0", pub, 24); err != nil {
		return err
	}
	if err := l.defaultRoute(ctx, natNS, inetAddr); err != nil {
		return err
	}
	if err := l.link(ctx, natNS, "lan0", lanGW, hostNS, "eth0", lanAddr, 24); err != nil {
		return err
	}
	if err := l.defaultRoute(ctx, hostNS, lanGW); err != nil {
		return err
	}
	return l.natRouter(ctx, natNS, kind)
}

func (l *Lab) buildSameLAN(ctx context.Context) error {
	nat := l.NS.ClientNAT
	kind := l.Opts.ClientNAT
	if kind == None {
		kind = Cone
	}
	if err := l.link(ctx, l.NS.Inet, "cli0", inetCli, nat, "wan0", cliPub, 24); err != nil {
		return err
	}
	if err := l.defaultRoute(ctx, nat, inetCli); err != nil {
		return err
	}
	steps := [][]string{
		{"-n", nat, "link", "add", "br0", "type", "bridge"},
		{"-n", nat, "addr", "add", cliLANGW.String() + "/24", "dev", "br0"},
		{"-n", nat, "link", "set", "br0", "up"},
	}
	for _, s := range steps {
		if err := l.ip(ctx, s...); err != nil {
			return err
		}
	}
	for _, h := range []struct {
		port, ns string
		addr     netip.Addr
	}{{"c0", l.NS.Client, cliLAN}, {"a0", l.NS.Agent, sameAgt}} {
		if err := l.ip(ctx, "-n", nat, "link", "add", h.port, "type", "veth", "peer", "name", "eth0", "netns", h.ns); err != nil {
			return err
		}
		for _, s := range [][]string{
			{"-n", nat, "link", "set", h.port, "master", "br0"},
			{"-n", nat, "link", "set", h.port, "up"},
			{"-n", h.ns, "addr", "add", h.addr.String() + "/24", "dev", "eth0"},
			{"-n", h.ns, "link", "set", "eth0", "up"},
		} {
			if err := l.ip(ctx, s...); err != nil {
				return err
			}
		}
		if err := l.defaultRoute(ctx, h.ns, cliLANGW); err != nil {
			return err
		}
	}
	return l.natRouter(ctx, nat, kind)
}

func (l *Lab) natRouter(ctx context.Context, ns string, kind NAT) error {
	if err := l.sysctl(ns, "net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	masq := "masquerade"
	if kind == Symmetric {
		masq = "masquerade random,fully-random"
	}
	// The input/forward drops make this a home router's firewall: nothing
	// unsolicited gets in from the WAN. They matter for punching too: an
	// unsolicited probe dropped before conntrack confirms it leaves no
	// entry behind, so the router's own later outbound packet to that peer
	// keeps its port (without them, Linux sees a tuple clash and picks a
	// new port, and "cone" would behave like symmetric).
	rules := fmt.Sprintf(`table ip nvlab {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan0" %s
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname "wan0" ct state new drop
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "wan0" ct state new drop
	}
}
`, masq)
	return l.nft(ctx, ns, rules)
}

func (l *Lab) addNS(ctx context.Context, ns string) error {
	l.nsMu.Lock()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		l.nsMu.Unlock()
		return errors.New("lab: closed while building")
	}
	// Record before creating, so that a Close racing with us still deletes it.
	l.created = append(l.created, ns)
	l.mu.Unlock()
	err := l.ip(ctx, "netns", "add", ns)
	l.nsMu.Unlock()
	if err != nil {
		return err
	}
	if err := l.ip(ctx, "-n", ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	for _, k := range []string{"net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"} {
		if err := l.sysctl(ns, k, "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

// link makes a veth pair between two namespaces and addresses both ends.
func (l *Lab) link(ctx context.Context, nsA, ifA string, addrA netip.Addr, nsB, ifB string, addrB netip.Addr, bits int) error {
	steps := [][]string{
		{"-n", nsA, "link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", nsB},
		{"-n", nsA, "addr", "add", fmt.Sprintf("%s/%d", addrA, bits), "dev", ifA},
		{"-n", nsB, "addr", "add", fmt.Sprintf("%s/%d", addrB, bits), "dev", ifB},
		{"-n", nsA, "link", "set", ifA, "up"},
		{"-n", nsB, "link", "set", ifB, "up"},
	}
	for _, s := range steps {
		if err := l.ip(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

func (l *Lab) defaultRoute(ctx context.Context, ns string, via netip.Addr) error {
	return l.ip(ctx, "-n", ns, "route", "add", "default", "via", via.String())
}

func (l *Lab) ip(ctx context.Context, args ...string) error {
	l.logf("ip %s", strings.Join(args, " "))
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// nft loads a ruleset (nft -f -) inside ns.
func (l *Lab) nft(ctx context.Context, ns, rules string) error {
	l.logf("ip netns exec %s nft -f - <<EOF\n%sEOF", ns, rules)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("nft in %s: %v: %s", ns, err, bytes.TrimSpace(out))
	}
	return nil
}

// sysctl writes /proc/sys/<key> inside ns (key uses slashes, e.g.
// "net/ipv4/ip_forward").
func (l *Lab) sysctl(ns, key, val string) error {
	l.logf("[%s] sysctl %s=%s", ns, strings.ReplaceAll(key, "/", "."), val)
	return Do(ns, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(val), 0o644)
	})
}

// BlockDirect drops UDP between the client side and the agent side (their
// public addresses in inet; with SameLAN, their LAN addresses on the shared
// bridge; with Internet6 their IPv6 addresses too), while traffic to and
// from the gateway keeps flowing. Idempotent.
func (l *Lab) BlockDirect(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.blocked {
		return nil
	}
	ns, fam := l.NS.Inet, "inet"
	a, b := l.ClientPublic, l.AgentPublic
	if l.Opts.SameLAN {
		ns, fam = l.NS.ClientNAT, "bridge"
		a, b = l.ClientAddr, l.AgentAddr
	}
	drops := fmt.Sprintf("\t\tip saddr %[1]s ip daddr %[2]s meta l4proto udp drop\n\t\tip saddr %[2]s ip daddr %[1]s meta l4proto udp drop\n", a, b)
	if l.Opts.Internet6 {
		// The nodes' own IPv6 addresses: no NAT there.
		drops += fmt.Sprintf("\t\tip6 saddr %[1]s ip6 daddr %[2]s meta l4proto udp drop\n\t\tip6 saddr %[2]s ip6 daddr %[1]s meta l4proto udp drop\n", l.ClientAddr6, l.AgentAddr6)
	}
	rules := fmt.Sprintf("table %s nvblock {\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n%s\t}\n}\n", fam, drops)
	if err := l.nft(ctx, ns, rules); err != nil {
		return err
	}
	l.blocked = true
	return nil
}

// UnblockDirect undoes BlockDirect. Idempotent.
func (l *Lab) UnblockDirect(ctx context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.blocked {
		return nil
	}
	ns, fam := l.NS.Inet, "inet"
	if l.Opts.SameLAN {
		ns, fam = l.NS.ClientNAT, "bridge"
	}
	if err := l.nft(ctx, ns, fmt.Sprintf("delete table %s nvblock\n", fam)); err != nil {
		return err
	}
	l.blocked = false
	return nil
}

// Close stops every process started with l.Start and deletes exactly the
// namespaces this lab created, by name. It is idempotent and safe after a
// failed or interrupted Build.
func (l *Lab) Close() error {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.nsMu.Lock() // wait for a namespace creation in flight
	l.nsMu.Unlock()
	l.mu.Lock()
	procs := l.procs
	l.procs = nil
	created := l.created
	l.created = nil
	l.mu.Unlock()

	var errs []error
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Add(1)
		go func() { defer wg.Done(); p.Stop() }()
	}
	wg.Wait()
	for i := len(created) - 1; i >= 0; i-- {
		ns := created[i]
		if !NamespaceExists(ns) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		out, err := exec.CommandContext(ctx, "ip", "netns", "del", ns).CombinedOutput()
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", ns, err, bytes.TrimSpace(out)))
		}
	}
	return errors.Join(errs...)
}

// NamespaceExists reports whether a named namespace (ip netns) exists.
func NamespaceExists(ns string) bool {
	_, err := os.Stat(filepath.Join(netnsDir, ns))
	return err == nil
}

// ListNamespaces returns the named namespaces whose name starts with prefix.
func ListNamespaces(prefix string) ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// Check reports, with one error saying what is missing, whether this
// machine can build a lab: root (or CAP_NET_ADMIN+CAP_SYS_ADMIN), iproute2
// with netns support, and nftables.
func Check() error {
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found in PATH (install iproute2 and nftables)", tool)
		}
	}
	probe := RandomPrefix() + "-probe"
	out, err := exec.Command("ip", "netns", "add", probe).CombinedOutput()
	if err != nil {
		return fmt.Errorf("cannot create a network namespace (needs root or CAP_NET_ADMIN+CAP_SYS_ADMIN): %s", bytes.TrimSpace(out))
	}
	defer exec.Command("ip", "netns", "del", probe).Run()
	out, err = exec.Command("ip", "netns", "exec", probe, "nft", "list", "tables").CombinedOutput()
	if err != nil {
		return fmt.Errorf("nftables does not work in a namespace: %s", bytes.TrimSpace(out))
	}
	return nil
}

// RebindClientNAT makes the client's NAT router forget its mappings and
// take new ports for every flow from now on, as a NAT does when it
// reboots or times a mapping out: the masquerade moves to ports
// 61000-61100 and the router's conntrack table is flushed. The client's
// packets then reach the internet from a new public port.
func (l *Lab) RebindClientNAT(ctx context.Context) error {
	ns := l.NS.ClientNAT
	if ns == "" || l.Opts.SameLAN {
		return errors.New("lab: the client has no NAT of its own to rebind")
	}
	return l.rebind(ctx, ns)
}

// RebindAgentNAT is RebindClientNAT for the agent's NAT router.
func (l *Lab) RebindAgentNAT(ctx context.Context) error {
	ns := l.NS.AgentNAT
	if ns == "" || l.Opts.SameLAN {
		return errors.New("lab: the agent has no NAT of its own to rebind")
	}
	return l.rebind(ctx, ns)
}

func (l *Lab) rebind(ctx context.Context, ns string) error {
	if err := l.nft(ctx, ns, "flush chain ip nvlab postrouting\n"+
		"add rule ip nvlab postrouting oifname \"wan0\" meta l4proto { tcp, udp } masquerade to :61000-61100\n"+
		"add rule ip nvlab postrouting oifname \"wan0\" masquerade\n"); err != nil {
		return err
	}
	return Do(ns, func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) })
}

// ClientLANGateway is the client NAT's address on the client's LAN, where
// a test may run a service of the client's network (an HTTP proxy).
func (l *Lab) ClientLANGateway() netip.Addr { return cliLANGW }

// BlockClientUDP makes the client's network one that lets only TCP out:
// its NAT drops every UDP packet it would forward from the client's LAN.
// UnblockClientUDP undoes it. Needs a client NAT (not SameLAN).
func (l *Lab) BlockClientUDP(ctx context.Context) error { return l.blockUDP(ctx, l.NS.ClientNAT) }

// UnblockClientUDP undoes BlockClientUDP.
func (l *Lab) UnblockClientUDP(ctx context.Context) error {
	return l.nft(ctx, l.NS.ClientNAT, "delete table inet nvudp\n")
}

// BlockAgentUDP is BlockClientUDP for the agent's network.
func (l *Lab) BlockAgentUDP(ctx context.Context) error { return l.blockUDP(ctx, l.NS.AgentNAT) }

func (l *Lab) blockUDP(ctx context.Context, nat string) error {
	if nat == "" || l.Opts.SameLAN {
		return errors.New("blocking a side's UDP needs a NAT of its own on that side")
	}
	// inet: with Options.Internet6, UDP over IPv6 is blocked as well.
	return l.nft(ctx, nat, `table inet nvudp {
	chain forward {
		type filter hook forward priority -10; policy accept;
		iifname "lan0" meta l4proto udp drop
	}
}
`)
}

// DropAgentFrames makes the agent's network drop the UDP datagrams from
// the agent's LAN whose first byte has QUIC's fixed bit (0x40) clear: the
// node's frames (relay frames, relay checks, probes), while its QUIC
// packets, the gateway connection's, pass. A firewall that knows QUIC.
func (l *Lab) DropAgentFrames(ctx context.Context) error {
	if l.NS.AgentNAT == "" || l.Opts.SameLAN {
		return errors.New("dropping the agent's frames needs an agent NAT of its own")
	}
	return l.nft(ctx, l.NS.AgentNAT, `table ip nvframes {
	chain forward {
		type filter hook forward priority -10; policy accept;
		iifname "lan0" udp length > 8 @th,64,8 & 0x40 == 0 counter drop
	}
}
`)
}

// ClientOnlyProxy makes the client's network one whose only way out is a
// proxy on its NAT: nothing from the client's LAN is forwarded, and the NAT
// itself takes only TCP to port from it.
func (l *Lab) ClientOnlyProxy(ctx context.Context, port uint16) error {
	if l.NS.ClientNAT == "" || l.Opts.SameLAN {
		return errors.New("ClientOnlyProxy needs a client NAT of its own")
	}
	return l.nft(ctx, l.NS.ClientNAT, fmt.Sprintf(`table inet nvproxy {
	chain forward {
		type filter hook forward priority -10; policy accept;
		iifname "lan0" drop
	}
	chain input {
		type filter hook input priority -10; policy accept;
		iifname "lan0" tcp dport %d accept
		iifname "lan0" drop
	}
}
`, port))
}
