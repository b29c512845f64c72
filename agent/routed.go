package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/policy"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/tun"
	"github.com/nlvpn/nlvpn/wire"
)

// routed is the agent's kernel egress (Config.Routed): the clients'
// packets for the advertised subnets go into a TUN device and this host's
// kernel forwards and masquerades them (platform.Forwarding), as a
// WireGuard subnet router does; what the kernel routes back into the
// device goes to the clients. The LAN host's own TCP then does congestion
// control and loss recovery end to end, where the netstack would
// terminate each connection here and recover on its behalf.
//
// The policy is the netstack's (Agent.allow), checked here per packet:
// only TCP, UDP and ICMP pass, as with the netstack. Packets for the
// agent's own overlay address (its DNS, ping) still go to the netstack.
type routed struct {
	dev *tun.Device
	w   *tun.BatchWriter
	fw  *platform.Forwarding
	v6  bool // an IPv6 prefix is advertised: IPv6 is forwarded
	// failed gets the device's read error if it breaks while the agent
	// runs (someone deleted it, say): the agent then ends with it rather
	// than go on without a way back from the LAN.
	failed chan error

	// unsupported counts packets of other protocols (or IPv6 extension
	// headers other than a fragment header), laterDenied fragments after
	// the first whose destination may not be reached. (The policy counts
	// the rest of its refusals itself, by reason.)
	unsupported, laterDenied atomic.Uint64
}

// startRouted makes the TUN device, installs the forwarding and starts
// the device's loops; stop undoes all of it.
func (a *Agent) startRouted(ctx context.Context) (stop func(), err error) {
	name := a.cfg.TunName
	if name == "" {
		name = DefaultTunName
	}
	dev, err := tun.Create(name, wire.TunMTU)
	if err != nil {
		return nil, fmt.Errorf("--routed needs a TUN device (CAP_NET_ADMIN): %w", err)
	}
	l := a.cfg.Limits.WithDefaults()
	v6 := slices.ContainsFunc(a.cfg.Advertise, func(p netip.Prefix) bool { return p.Addr().Is6() })
	fw, err := platform.NewForwarding(platform.ForwardingConfig{Device: dev.Name(), IPv6: v6,
		PerPeer: l.TCPPerClient + l.UDPPerClient, Total: l.TCPTotal + l.UDPTotal})
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("--routed: %w", err)
	}
	r := &routed{dev: dev, fw: fw, w: dev.NewBatchWriter(1024), v6: v6, failed: make(chan error, 1)}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); r.w.Run(ctx) }()
	go func() { defer wg.Done(); a.readRouted(ctx, dev, r.failed) }()
	a.rt = r
	a.log.Info("routed egress: the kernel forwards the clients' packets", "tun", dev.Name())
	return func() {
		cancel()
		dev.Close() // ends readRouted's read
		wg.Wait()
		if err := fw.Close(); err != nil {
			a.log.Warn("routed egress teardown", "err", err)
		}
	}, nil
}

// DefaultTunName is the routed agent's TUN device unless Config.TunName.
const DefaultTunName = "nlvpn-agent"

// readRouted carries what the kernel routes into the device to the
// clients. An error that is not the device's closing goes to failed.
func (a *Agent) readRouted(ctx context.Context, dev *tun.Device, failed chan<- error) {
	bufs, sizes := dev.ReadBuffers()
	pkts := make([][]byte, 0, len(bufs))
	var run [][]byte
	for ctx.Err() == nil {
		k, err := dev.Read(bufs, sizes)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				failed <- fmt.Errorf("reading TUN device %s: %w", dev.Name(), err)
			}
			return
		}
		pkts = pkts[:0]
		for i := 0; i < k; i++ {
			pkts = append(pkts, bufs[i][tun.Offset:tun.Offset+sizes[i]])
		}
		a.sendToClients(pkts, &run)
	}
}

// route adds the routes of a client's overlay addresses into the device
// and returns the addresses it holds, which unroute gives up. The IPv6
// one may fail on a host without IPv6; the client then has only IPv4.
func (r *routed) route(a *Agent, addr netip.Addr) ([]netip.Addr, error) {
	if err := r.fw.Route(addr); err != nil {
		return nil, err
	}
	held := []netip.Addr{addr}
	if err := r.fw.Route(wire.Overlay6(addr)); err != nil {
		if r.v6 {
			a.log.Warn("routed egress: no IPv6 route to the client; the advertised IPv6 subnets will not answer it", "err", err)
		} else {
			a.log.Debug("no IPv6 route for the client", "err", err)
		}
	} else {
		held = append(held, wire.Overlay6(addr))
	}
	return held, nil
}

// unroute gives up the routes route returned.
func (r *routed) unroute(a *Agent, held []netip.Addr) {
	for _, x := range held {
		if err := r.fw.Unroute(x); err != nil {
			a.log.Warn("routed egress: removing a client's route", "err", err)
		}
	}
}

// submit forwards one packet of client cs (its source already checked),
// if the policy lets it; it gives pkt back to the session's pool.
func (r *routed) submit(a *Agent, cs *clientState, pkt []byte) {
	defer session.ReleasePacket(pkt)
	f, ok := flowOf(pkt)
	if !ok {
		r.unsupported.Add(1)
		return
	}
	if !f.later && !cs.allowedFlow(a, f) {
		return
	}
	if f.later && !a.allowedAddr(f) {
		// A fragment after the first carries no ports; it passes if its
		// destination may be reached at all. Without its first fragment
		// (which was checked) the kernel cannot reassemble it.
		r.laterDenied.Add(1)
		return
	}
	r.w.WriteWait(pkt) // copies
}

// flow is what the policy decides on: a packet's source, destination,
// protocol and destination port.
type flow struct {
	src   netip.Addr
	dst   netip.AddrPort
	proto string
	// later: a fragment after the first, which has no transport header.
	later bool
}

// flowOf reads a packet's flow. ok is false for anything but TCP, UDP and
// ICMP (ICMPv6), for IPv4 with options (source routing, say: nothing a
// client needs), for an IPv6 packet with extension headers other than a
// fragment header, and for IPv6 addresses that are mapped IPv4 ones (the
// policy would judge the IPv4 address, the kernel route the IPv6 one).
func flowOf(pkt []byte) (f flow, ok bool) {
	var proto byte
	var l4 []byte
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0x0f) * 4
		if ihl != 20 {
			return f, false
		}
		f.src = netip.AddrFrom4([4]byte(pkt[12:16]))
		f.dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(pkt[16:20])), 0)
		proto, l4 = pkt[9], pkt[ihl:]
		f.later = binary.BigEndian.Uint16(pkt[6:8])&0x1fff != 0
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		f.src = netip.AddrFrom16([16]byte(pkt[8:24]))
		f.dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(pkt[24:40])), 0)
		proto, l4 = pkt[6], pkt[40:]
		if f.src.Is4In6() || f.dst.Addr().Is4In6() {
			return f, false
		}
		if proto == 44 { // fragment header
			if len(l4) < 8 {
				return f, false
			}
			f.later = binary.BigEndian.Uint16(l4[2:4])&^7 != 0
			proto, l4 = l4[0], l4[8:]
		}
	default:
		return f, false
	}
	switch proto {
	case 6:
		f.proto = "tcp"
	case 17:
		f.proto = "udp"
	case 1, 58:
		f.proto = "icmp"
		return f, true
	default:
		return f, false
	}
	if !f.later {
		if len(l4) < 4 {
			return f, false
		}
		f.dst = netip.AddrPortFrom(f.dst.Addr(), binary.BigEndian.Uint16(l4[2:4]))
	}
	return f, true
}

// allowedAddr is the policy's verdict on a destination address alone.
func (a *Agent) allowedAddr(f flow) bool {
	r := verdict(f.dst, f.proto, a.overlay(), a.cfg.Advertise, a.cfg.AllowLoopback, a.host.has)
	return r == allowed || r == allowedService
}

// flowCache remembers the flows of one client that the policy allowed, so
// that a bulk transfer asks it once, not per packet. It holds for one
// policy and one set of this host's addresses (what the verdict depends
// on besides the flow); either changing empties it. Refusals are not
// remembered: each refused packet is counted.
type flowCache struct {
	mu    sync.Mutex
	pol   *policy.Policy
	host  *map[netip.Addr]bool
	flows map[flow]struct{}
}

// maxCachedFlows bounds a client's cache; when full it starts over.
const maxCachedFlows = 1024

// allowedFlow is Agent.allow for f, through the client's cache.
func (cs *clientState) allowedFlow(a *Agent, f flow) bool {
	var pol *policy.Policy
	if a.cfg.Policy != nil {
		pol = a.cfg.Policy.Load()
	}
	host := a.host.set.Load()
	c := &cs.flows
	c.mu.Lock()
	if c.pol != pol || c.host != host || len(c.flows) >= maxCachedFlows || c.flows == nil {
		c.pol, c.host = pol, host
		c.flows = make(map[flow]struct{})
	}
	_, ok := c.flows[f]
	c.mu.Unlock()
	if ok {
		return true
	}
	if !a.allow(f.src, f.dst, f.proto) {
		return false
	}
	c.mu.Lock()
	if c.pol == pol && c.host == host {
		c.flows[f] = struct{}{}
	}
	c.mu.Unlock()
	return true
}
