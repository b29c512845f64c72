package netstack

// The agent's egress forwarder.
//
// Clients send the agent raw IP packets through the tunnel. Egress terminates
// those flows in a gVisor userspace stack and re-originates each of them from
// the agent's own ordinary sockets, so the agent needs no root and the LAN
// hosts need no route back to the overlay:
//
//	client IP packet ─ Inject ─ [ICMP echo? → host ping socket] ─ gVisor stack
//	                                                              ├ TCP forwarder → net.Dial("tcp") + splice
//	                                                              └ UDP forwarder → net.Dial("udp") + copy
//	gVisor outbound packets / synthesized echo replies ─ out(pkt)
//
// The TCP forwarder dials the real target before it completes the tunneled
// handshake, so a refused port is a RST to the client, not a connection that
// is accepted and dies later.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	gicmp "gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Defaults and tuning. The TCP numbers follow what people who run gVisor at
// scale (e.g. Tailscale's netstack) use: SACK on, RACK off, reno, buffers of
// several MiB with receive-buffer auto-tuning.
const (
	// DefaultEgressMTU is used when EgressConfig.MTU is zero.
	DefaultEgressMTU = 1360
	// DefaultEgressDialTimeout bounds every real dial (TCP and UDP).
	DefaultEgressDialTimeout = 10 * time.Second
	// DefaultEgressUDPIdleTimeout closes a UDP flow with no datagram in either direction.
	DefaultEgressUDPIdleTimeout = 60 * time.Second
	// DefaultEgressEchoTimeout is how long a forwarded ICMP echo waits for its reply.
	DefaultEgressEchoTimeout = 5 * time.Second
	// DefaultEgressMaxEchoes bounds the number of outstanding forwarded ICMP echoes.
	DefaultEgressMaxEchoes = 256

	egressNIC = tcpip.NICID(1)
	// egTCPMaxInFlight bounds TCP handshakes being dialed at once; SYNs beyond
	// it are ignored by gVisor (the client retransmits).
	egTCPMaxInFlight = 1024
	// tcpRcvWnd is the receive window the forwarder advertises during the
	// handshake, before auto-tuning takes over.
	egTCPRcvWnd      = 1 << 20
	egTCPBufMin      = tcp.MinBufferSize
	egTCPBufDefault  = 1 << 20
	egTCPBufMax      = 8 << 20
	egLinkQueueDepth = 4096
	egMaxIPPacket    = 65535
)

// EgressConfig configures an Egress.
type EgressConfig struct {
	// MTU of the virtual NIC (e.g. 1360); packets larger than this are never
	// passed to out. Zero means DefaultEgressMTU.
	MTU int
	// Allow is the agent's policy: whether a client may reach dst over proto
	// ("tcp", "udp", "icmp"; for icmp the port is 0). nil allows everything.
	// Denied TCP gets a RST, denied UDP/ICMP is dropped; all are counted in
	// Denied. Allow is called on the Inject goroutine for UDP and ICMP, so it
	// must be fast and must not block.
	Allow func(dst netip.AddrPort, proto string) bool
	// Dial opens the real flow ("tcp" or "udp"); nil means a net.Dialer. The
	// context passed to it expires after DefaultEgressDialTimeout and is cancelled
	// by Close.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives logs; nil means slog.Default().
	Logger *slog.Logger

	// UDPIdleTimeout closes a UDP flow after this long without a datagram
	// in either direction. Zero means DefaultEgressUDPIdleTimeout.
	UDPIdleTimeout time.Duration
	// EchoTimeout is how long a forwarded ICMP echo waits for its reply.
	// Zero means DefaultEgressEchoTimeout.
	EchoTimeout time.Duration
	// MaxEchoes bounds concurrently outstanding ICMP echoes; beyond it echo
	// requests are dropped and counted in EchoDropped. Zero means DefaultEgressMaxEchoes.
	MaxEchoes int
}

// EgressStats are cumulative counters of an Egress.
type EgressStats struct {
	Injected     uint64 // packets handed to Inject
	Malformed    uint64 // packets Inject dropped as not a well-formed IPv4/IPv6 packet
	Denied       uint64 // TCP SYNs, UDP datagrams and ICMP echoes refused by Allow
	TCPFlows     uint64 // TCP flows established (real dial succeeded and handshake done)
	UDPFlows     uint64 // UDP flows created
	ICMPEchoes   uint64 // ICMP echo requests forwarded to the real target
	EchoReplies  uint64 // ICMP echo replies synthesized back to clients
	EchoDropped  uint64 // echo requests dropped: limit reached, no ICMP socket, send failed or reply too big
	EchoTimeouts uint64 // forwarded echoes that got no reply in time
	DialFailures uint64 // real TCP/UDP dials that failed
	OutPackets   uint64 // packets passed to out
}

type egressCounters struct {
	injected, malformed, denied, tcpFlows, udpFlows    atomic.Uint64
	icmpEchoes, echoReplies, echoDropped, echoTimeouts atomic.Uint64
	dialFailures, outPackets                           atomic.Uint64
}

// Egress is a gVisor stack that terminates clients' flows and re-originates
// them from the host's own sockets. Create it with NewEgress.
type Egress struct {
	cfg       EgressConfig
	mtu       int
	log       *slog.Logger
	dial      func(ctx context.Context, network, addr string) (net.Conn, error)
	udpIdle   time.Duration
	echoWait  time.Duration
	echoSlots chan struct{}
	echoModes []string // ICMP socket kinds to try; tests restrict it

	out   func(pkt []byte)
	outMu sync.Mutex // serializes calls to out

	stack *stack.Stack
	link  *channel.Endpoint

	ctx    context.Context
	cancel context.CancelFunc

	// injectMu is held shared by Inject while it feeds the stack and
	// exclusively by Close, so no packet enters a stack being torn down.
	injectMu sync.RWMutex
	closed   atomic.Bool

	mu      sync.Mutex // guards done, closers and wg.Add
	done    bool
	closers map[io.Closer]struct{}
	wg      sync.WaitGroup

	closeOnce sync.Once

	echoID atomic.Uint32 // ICMP id allocator for raw sockets

	c egressCounters
}

// NewEgress starts a stack.
//
// out is called with each IP packet the stack emits toward clients (its
// destination is the client's overlay address): TCP and UDP from the stack,
// and synthesized ICMP echo replies. Calls to out are serialized — never two
// at once — and are made from the Egress's own goroutines (the output pump and
// the ICMP echo workers), never from inside Inject, so out may block briefly
// (backpressure) but must not call Close. out must not retain pkt after it
// returns: the buffer is reused or released; copy it if it must outlive the
// call. A packet passed to out is never longer than the MTU.
func NewEgress(cfg EgressConfig, out func(pkt []byte)) (*Egress, error) {
	if out == nil {
		return nil, errors.New("netstack: NewEgress: out is nil")
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultEgressMTU
	}
	if mtu < 1280 || mtu > egMaxIPPacket {
		return nil, errors.New("netstack: NewEgress: MTU must be between 1280 and 65535")
	}
	e := &Egress{
		cfg:       cfg,
		mtu:       mtu,
		log:       cfg.Logger,
		dial:      cfg.Dial,
		udpIdle:   cfg.UDPIdleTimeout,
		echoWait:  cfg.EchoTimeout,
		out:       out,
		echoModes: egDefaultEchoModes,
		closers:   make(map[io.Closer]struct{}),
	}
	if e.log == nil {
		e.log = slog.Default()
	}
	e.log = e.log.With("component", "egress")
	if e.dial == nil {
		d := &net.Dialer{Timeout: DefaultEgressDialTimeout}
		e.dial = d.DialContext
	}
	if e.udpIdle <= 0 {
		e.udpIdle = DefaultEgressUDPIdleTimeout
	}
	if e.echoWait <= 0 {
		e.echoWait = DefaultEgressEchoTimeout
	}
	maxEchoes := cfg.MaxEchoes
	if maxEchoes <= 0 {
		maxEchoes = DefaultEgressMaxEchoes
	}
	e.echoSlots = make(chan struct{}, maxEchoes)
	e.ctx, e.cancel = context.WithCancel(context.Background())

	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			// Loopback destinations are allowed into the stack; whether a
			// client may reach the agent's own loopback is Allow's decision.
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{
			tcp.NewProtocol, udp.NewProtocol, gicmp.NewProtocol4, gicmp.NewProtocol6,
		},
	})
	fail := func(what string, err tcpip.Error) (*Egress, error) {
		s.Close()
		s.Wait()
		e.cancel()
		return nil, errors.New("netstack: NewEgress: " + what + ": " + err.String())
	}

	tcpOpts := []tcpip.SettableTransportProtocolOption{
		egPtr(tcpip.TCPSACKEnabled(true)),
		egPtr(tcpip.TCPRecovery(0)), // RACK off
		egPtr(tcpip.CongestionControlOption("reno")),
		egPtr(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPSendBufferSizeRangeOption{Min: egTCPBufMin, Default: egTCPBufDefault, Max: egTCPBufMax},
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: egTCPBufMin, Default: egTCPBufDefault, Max: egTCPBufMax},
	}
	for _, o := range tcpOpts {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fail("tcp option", err)
		}
	}

	e.link = channel.New(egLinkQueueDepth, uint32(mtu), "")
	if err := s.CreateNIC(egressNIC, e.link); err != nil {
		return fail("create NIC", err)
	}
	// Promiscuous: accept packets for any destination. Spoofing: reply from
	// that destination address although the NIC does not own it.
	if err := s.SetPromiscuousMode(egressNIC, true); err != nil {
		return fail("promiscuous mode", err)
	}
	if err := s.SetSpoofing(egressNIC, true); err != nil {
		return fail("spoofing", err)
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: egressNIC},
		{Destination: header.IPv6EmptySubnet, NIC: egressNIC},
	})

	tcpFwd := tcp.NewForwarder(s, egTCPRcvWnd, egTCPMaxInFlight, e.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(s, e.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)
	e.stack = s

	e.wg.Add(1)
	go e.pump()
	e.log.Info("egress started", "mtu", mtu)
	return e, nil
}

func egPtr[T any](v T) *T { return &v }

// Inject hands the stack one raw IP packet (v4 or v6) received from a client.
// It never blocks for long, never panics on garbage (malformed input is
// dropped and counted), and does not retain pkt. It is safe for concurrent
// use and may be called after Close (the packet is dropped).
func (e *Egress) Inject(pkt []byte) {
	e.c.injected.Add(1)
	e.injectMu.RLock()
	defer e.injectMu.RUnlock()
	if e.closed.Load() {
		return
	}
	p, proto, ok := egParseIP(pkt)
	if !ok {
		e.c.malformed.Add(1)
		return
	}
	switch echo, verdict := egParseEcho(p); verdict {
	case egEchoIsRequest:
		e.handleEcho(echo)
		return
	case egEchoMalformed:
		e.c.malformed.Add(1)
		return
	case egEchoFragment:
		// A fragmented echo request would be reassembled and answered by
		// gVisor itself (promiscuous mode), faking reachability. Drop it.
		e.c.echoDropped.Add(1)
		return
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(p)})
	e.link.InjectInbound(proto, pb)
	pb.DecRef()
}

// Stats returns a snapshot of the counters.
func (e *Egress) Stats() EgressStats {
	return EgressStats{
		Injected:     e.c.injected.Load(),
		Malformed:    e.c.malformed.Load(),
		Denied:       e.c.denied.Load(),
		TCPFlows:     e.c.tcpFlows.Load(),
		UDPFlows:     e.c.udpFlows.Load(),
		ICMPEchoes:   e.c.icmpEchoes.Load(),
		EchoReplies:  e.c.echoReplies.Load(),
		EchoDropped:  e.c.echoDropped.Load(),
		EchoTimeouts: e.c.echoTimeouts.Load(),
		DialFailures: e.c.dialFailures.Load(),
		OutPackets:   e.c.outPackets.Load(),
	}
}

// Close stops everything: it closes every real socket and tunneled endpoint,
// waits for the Egress's goroutines to finish, and tears the stack down.
// After Close returns out is no longer called. Close is idempotent.
func (e *Egress) Close() error {
	e.closeOnce.Do(func() {
		e.injectMu.Lock()
		e.closed.Store(true)
		e.injectMu.Unlock()

		e.mu.Lock()
		e.done = true
		closers := e.closers
		e.closers = map[io.Closer]struct{}{}
		e.mu.Unlock()

		e.cancel()
		for c := range closers {
			_ = c.Close()
		}
		e.wg.Wait()
		e.link.Close()
		e.stack.Close()
		e.stack.Wait()
		e.log.Info("egress stopped")
	})
	return nil
}

// track registers one more goroutine of work; it fails once Close has begun.
func (e *Egress) track() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.done {
		return false
	}
	e.wg.Add(1)
	return true
}

// addCloser registers c to be closed by Close; if Close has already begun it
// closes c at once and returns false.
func (e *Egress) addCloser(c io.Closer) bool {
	e.mu.Lock()
	if e.done {
		e.mu.Unlock()
		_ = c.Close()
		return false
	}
	e.closers[c] = struct{}{}
	e.mu.Unlock()
	return true
}

// removeCloser forgets c and closes it.
func (e *Egress) removeCloser(c io.Closer) {
	e.mu.Lock()
	delete(e.closers, c)
	e.mu.Unlock()
	_ = c.Close()
}

func (e *Egress) allow(dst netip.AddrPort, proto string) bool {
	if e.cfg.Allow == nil {
		return true
	}
	return e.cfg.Allow(dst, proto)
}

// pump moves packets the stack wrote to the link endpoint to out.
func (e *Egress) pump() {
	defer e.wg.Done()
	for {
		pkt := e.link.ReadContext(e.ctx)
		if pkt == nil {
			if e.ctx.Err() != nil {
				return
			}
			continue
		}
		v := pkt.ToView()
		e.emit(v.AsSlice())
		v.Release()
		pkt.DecRef()
	}
}

// emit passes one packet to out, serialized with every other call.
func (e *Egress) emit(b []byte) {
	if len(b) == 0 || len(b) > e.mtu {
		return
	}
	e.outMu.Lock()
	defer e.outMu.Unlock()
	if e.ctx.Err() != nil {
		return
	}
	e.c.outPackets.Add(1)
	e.out(b)
}

// egAddrPortFrom converts a gVisor address and port.
func egAddrPortFrom(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}
