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
//	gVisor outbound packets / synthesized echo replies ─ out(pkts)
//
// The TCP forwarder dials the real target before it completes the tunneled
// handshake, so a refused port is a RST to the client, not a connection that
// is accepted and dies later.

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Egress defaults. The stack's TCP tuning, shared with Proxy, is in stack.go.
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

	// egTCPMaxInFlight bounds TCP handshakes being dialed at once; SYNs beyond
	// it are ignored by gVisor (the client retransmits).
	egTCPMaxInFlight = 1024
	// tcpRcvWnd is the receive window the forwarder advertises during the
	// handshake, before auto-tuning takes over.
	egTCPRcvWnd   = 1 << 20
	egMaxIPPacket = 65535
)

// EgressConfig configures an Egress.
type EgressConfig struct {
	// MTU of the virtual NIC (e.g. 1360); packets larger than this are never
	// passed to out. Zero means DefaultEgressMTU.
	MTU int
	// Allow is the agent's policy: whether the client at src (its overlay
	// address) may reach dst over proto ("tcp", "udp", "icmp"; for icmp the
	// port is 0). nil allows everything.
	// Denied TCP gets a RST, denied UDP/ICMP is dropped; all are counted in
	// Denied. Allow is called on the Inject goroutine for UDP and ICMP, so it
	// must be fast and must not block.
	Allow func(src netip.Addr, dst netip.AddrPort, proto string) bool
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
	// requests are dropped and counted in EchoDropped. Zero means
	// DefaultEgressMaxEchoes; at most 16384 (each needs a 16-bit wire seq of its own).
	MaxEchoes int
	// Release gives a packet passed to Submit back to its owner once the
	// stack has its copy; nil: nothing to do.
	Release func(pkt []byte)
	// Limits bounds what each client, and all together, can make the
	// Egress hold; zero fields mean DefaultEgressLimits.
	Limits EgressLimits
}

// EgressStats are cumulative counters of an Egress.
type EgressStats struct {
	Injected      uint64 // packets handed to Inject
	Malformed     uint64 // packets Inject dropped as not a well-formed IPv4/IPv6 packet
	Denied        uint64 // TCP SYNs, UDP datagrams and ICMP echoes refused by Allow
	TCPFlows      uint64 // TCP flows established (real dial succeeded and handshake done)
	UDPFlows      uint64 // UDP flows created
	ICMPEchoes    uint64 // ICMP echo requests forwarded to the real target
	EchoReplies   uint64 // ICMP echo replies synthesized back to clients
	EchoDropped   uint64 // echo requests dropped: limit reached, no ICMP socket, send failed or reply too big
	EchoTimeouts  uint64 // forwarded echoes that got no reply in time
	DialFailures  uint64 // real TCP/UDP dials that failed
	OutPackets    uint64 // packets passed to out
	OutDropped    uint64 // packets of the stack's that never reached out: output queue full, or unwritable
	SubmitDropped uint64 // packets Submit could not queue: the stack was behind
	UDPShortIdle  uint64 // UDP flows closed early as a finished request/response (one datagram each way)
	// Limited counts new flows, dials and echoes refused because a
	// client's or the total bound (EgressLimits) was hit, by resource.
	Limited map[string]uint64
}

// egressCounters are the Egress-only counters; Injected, Malformed and
// OutPackets are counted by stackCore.
type egressCounters struct {
	denied, tcpFlows, udpFlows                         atomic.Uint64
	icmpEchoes, echoReplies, echoDropped, echoTimeouts atomic.Uint64
	dialFailures, udpShortIdle                         atomic.Uint64
}

// Egress is a gVisor stack that terminates clients' flows and re-originates
// them from the host's own sockets. Create it with NewEgress.
type Egress struct {
	stackCore

	cfg       EgressConfig
	dial      func(ctx context.Context, network, addr string) (net.Conn, error)
	udpIdle   time.Duration
	udpShort  time.Duration // egUDPShortIdle, or udpIdle when that is shorter
	echoWait  time.Duration
	echoSlots chan struct{}
	echoModes []string // ICMP socket kinds to try; tests restrict it

	echoers [2]egEchoer // IPv4, IPv6: each family's ICMP socket and outstanding echoes

	// ledger holds what each client holds (flows, dials, echoes) against
	// its bounds, and each client's open real connections, so that when a
	// client's session ends its flows end too, instead of lingering on the
	// LAN (an ssh session left open on the target, say).
	ledger egLedger

	c egressCounters
}

// CloseClient ends every flow of the client with overlay address addr
// (its real connections close, which ends the tunneled side too) and
// returns how many there were. The agent calls it when a session ends.
func (e *Egress) CloseClient(addr netip.Addr) int {
	m := e.ledger.takeConns(addr)
	for c := range m {
		_ = c.Close()
	}
	return len(m)
}

// NewEgress starts a stack.
//
// out is called with batches of the IP packets the stack emits toward
// clients (each one's destination is a client's overlay address): TCP and
// UDP from the stack, and synthesized ICMP echo replies. A batch may mix
// clients. Calls to out are serialized — never two at once — and are made
// from the Egress's own goroutines (the output pump and the ICMP echo
// sockets' readers), never from inside Inject, so out may block briefly
// (backpressure) but must not call Close. out must not retain pkts or any
// packet in it after it returns: the buffers are reused; copy what must
// outlive the call. A packet passed to out is never longer than the MTU.
func NewEgress(cfg EgressConfig, out func(pkts [][]byte)) (*Egress, error) {
	if out == nil {
		return nil, errors.New("netstack: NewEgress: out is nil")
	}
	mtu, err := stackMTU("NewEgress", cfg.MTU, DefaultEgressMTU)
	if err != nil {
		return nil, err
	}
	e := &Egress{
		cfg:       cfg,
		dial:      cfg.Dial,
		udpIdle:   cfg.UDPIdleTimeout,
		echoWait:  cfg.EchoTimeout,
		echoModes: egDefaultEchoModes,
		ledger:    egLedger{lim: cfg.Limits.WithDefaults()},
	}
	if e.dial == nil {
		d := &net.Dialer{Timeout: DefaultEgressDialTimeout}
		e.dial = d.DialContext
	}
	if e.udpIdle <= 0 {
		e.udpIdle = DefaultEgressUDPIdleTimeout
	}
	e.udpShort = min(egUDPShortIdle, e.udpIdle)
	if e.echoWait <= 0 {
		e.echoWait = DefaultEgressEchoTimeout
	}
	maxEchoes := cfg.MaxEchoes
	if maxEchoes <= 0 {
		maxEchoes = DefaultEgressMaxEchoes
	}
	maxEchoes = min(maxEchoes, egEchoMaxOutstanding)
	e.echoSlots = make(chan struct{}, maxEchoes)

	err = e.init(stackConfig{
		who:       "NewEgress",
		component: "egress",
		log:       cfg.Logger,
		mtu:       mtu,
		out:       out,
		icmp:      true,
		setup:     e.setupNIC,
		release:   cfg.Release,
	})
	if err != nil {
		return nil, err
	}
	e.intercept = e.interceptEcho
	e.start()
	e.log.Info("egress started", "mtu", mtu)
	return e, nil
}

// setupNIC makes the NIC a transparent forwarder. Promiscuous: accept
// packets for any destination. Spoofing: reply from that destination
// address although the NIC does not own it.
func (e *Egress) setupNIC(s *stack.Stack) (string, tcpip.Error) {
	if err := s.SetPromiscuousMode(stackNIC, true); err != nil {
		return "promiscuous mode", err
	}
	if err := s.SetSpoofing(stackNIC, true); err != nil {
		return "spoofing", err
	}
	tcpFwd := tcp.NewForwarder(s, egTCPRcvWnd, egTCPMaxInFlight, e.handleTCP)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, tcpFwd.HandlePacket)
	udpFwd := udp.NewForwarder(s, e.handleUDP)
	s.SetTransportProtocolHandler(udp.ProtocolNumber, udpFwd.HandlePacket)
	return "", nil
}

// Inject hands the stack raw IP packets (v4 or v6) received from clients,
// best as a batch: consecutive in-order segments of one TCP flow in the
// batch are merged before the stack sees them (GRO), so the stack handles
// and acknowledges them as one. Every packet is delivered before Inject
// returns. It never blocks for long, never panics on garbage (malformed
// input, including a bad TCP or UDP checksum, is dropped and counted), and
// does not retain pkts or any packet in it. It is safe for concurrent use
// and may be called after Close (the packets are dropped).
func (e *Egress) Inject(pkts ...[]byte) { e.inject(pkts) }

// interceptEcho takes ICMP echo requests away from the stack (they are
// answered by the host's ping sockets) and drops echoes it must not see.
// It runs under stackCore.injectMu, like the rest of Inject.
func (e *Egress) interceptEcho(p []byte) bool {
	switch echo, verdict := egParseEcho(p); verdict {
	case egEchoIsRequest:
		e.handleEcho(echo)
		return true
	case egEchoMalformed:
		e.malformed.Add(1)
		return true
	case egEchoFragment:
		// A fragmented echo request would be reassembled and answered by
		// gVisor itself (promiscuous mode), faking reachability. Drop it.
		e.c.echoDropped.Add(1)
		return true
	}
	return false
}

// Stats returns a snapshot of the counters.
func (e *Egress) Stats() EgressStats {
	return EgressStats{
		Injected:      e.injected.Load(),
		Malformed:     e.malformed.Load(),
		Denied:        e.c.denied.Load(),
		TCPFlows:      e.c.tcpFlows.Load(),
		UDPFlows:      e.c.udpFlows.Load(),
		ICMPEchoes:    e.c.icmpEchoes.Load(),
		EchoReplies:   e.c.echoReplies.Load(),
		EchoDropped:   e.c.echoDropped.Load(),
		EchoTimeouts:  e.c.echoTimeouts.Load(),
		DialFailures:  e.c.dialFailures.Load(),
		OutPackets:    e.outPackets.Load(),
		OutDropped:    e.outDropped(),
		SubmitDropped: e.subDropped.Load(),
		UDPShortIdle:  e.c.udpShortIdle.Load(),
		Limited:       e.Limited(),
	}
}

// Close stops everything: it closes every real socket and tunneled endpoint,
// waits for the Egress's goroutines to finish, and tears the stack down.
// After Close returns out is no longer called. Close is idempotent.
func (e *Egress) Close() error {
	e.shutdown(e.stopEchoes, "egress stopped")
	return nil
}

func (e *Egress) allow(src netip.Addr, dst netip.AddrPort, proto string) bool {
	if e.cfg.Allow == nil {
		return true
	}
	return e.cfg.Allow(src.Unmap(), dst, proto)
}

// egAddrPortFrom converts a gVisor address and port.
func egAddrPortFrom(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}
