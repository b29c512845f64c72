// Package netstack holds nlvpn's gVisor userspace TCP/IP stacks: the
// agent's egress (Egress: clients' flows terminated and re-originated from
// the agent's own sockets, bounded per client) and the client's stack
// behind its local SOCKS5 and HTTP proxies (Proxy), both on one link
// endpoint that moves packets in batches (GRO in, GSO out).
package netstack

// stackCore is the gVisor plumbing Egress and Proxy share: one stack on our
// own link endpoint (link.go: GRO in, GSO out), a pump that hands the
// stack's output to out in batches, a guarded batch inject, and the
// bookkeeping that lets Close tear all of it down exactly once. The two
// types differ only in what they hang off the stack (forwarders vs. an
// address and dialers), so that part is left to them.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
	gicmp "gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/nlvpn/nlvpn/batchq"
	"github.com/nlvpn/nlvpn/wire"
)

// Stack tuning. The TCP numbers follow what people who run gVisor at scale
// (e.g. Tailscale's netstack) use: SACK on, buffers of several MiB with
// receive-buffer auto-tuning.
//
// Congestion control is "rate", our gVisor patch (third_party/gvisor-patches
// 0001): the window follows the measured delivery rate and minimum RTT, as
// bbr does, instead of halving at each loss. This stack is the sender of
// every download, and under 2 % random loss reno's window averages about
// 1.22/sqrt(0.02) ~ 9 segments (Mathis), while wireguard-go's sender is the
// LAN host's kernel TCP with the host's bbr. Measured (nlvpn-lab bench
// --paths wg,direct, 2 % loss each way, download, nlvpn/wireguard-go in
// the same run): reno 0.17-0.31; rate with RACK off 0.38, 0.48; rate with
// RACK on 0.63, 0.73.
//
// RACK is on since then: with reno it was worse (the download under loss
// ~52 -> ~31 Mbit/s in an earlier session, 188-218 vs ~230 in a later one,
// with 130-178 timeouts), but with a window that no longer collapses, its
// time-based loss detection and tail-loss probes recover lost
// retransmissions that otherwise wait for a timeout (timeouts per 5 s
// lossy run: 11-31 with RACK off, 2-27 on).
//
// stackMinRTO is 50 ms, under Linux's 200 ms. It was 5 ms, chosen when
// reno with RACK off left lost resends to the timer (Mbit/s under loss,
// min RTO: 200 ms 34-51, 20 ms 150-233, 5 ms 172-364). Since rate and RACK
// with tail-loss probes recover those, the timer mostly fired by mistake: this
// stack's sends wait in the session's DATAGRAM queue (up to 1024 packets)
// when the tunnel is CPU-bound, the round trip climbs from 1 ms to 10-40 ms
// within a window, faster than srtt follows, and a 5-6 ms RTO fired while
// RACK's RTT was 7-33 ms, then resent everything not yet SACKed, most of it
// still queued. Measured in the 2 % loss download (nlvpn-lab bench --paths
// direct,wg --rows "loss: TCP down" --repeat 3, three rounds, medians of
// Mbit/s, direct/wg): 5 ms 489 (0.52), 978 (0.62), 1166 (0.67), 17-26
// timeouts and 12,600-22,600 segments the receiver reported twice (DSACK)
// per 15 s; 50 ms 804 (0.88), 1001 (0.63), 1089 (0.65), 0-8 timeouts and
// 1,800-2,900 DSACKs; 200 ms 831 (0.58), 1032 (0.66), 3-6 and 2,800-3,100.
// The rate is the same within the noise; the resends nobody needed fall
// by 5-8x. On longer paths the timer follows the RTT and the minimum does
// not bind.
const (
	// stackNIC is the only NIC of either stack.
	stackNIC            = tcpip.NICID(1)
	stackMinRTO         = 50 * time.Millisecond
	stackTCPBufMin      = tcp.MinBufferSize
	stackTCPBufDefault  = 1 << 20
	stackTCPBufMax      = 8 << 20
	stackLinkQueueDepth = 4096
)

// stackConfig is what differs between the two stacks at creation.
type stackConfig struct {
	who       string // constructor, prefixed to errors ("NewEgress")
	component string // the logger's "component" attribute
	log       *slog.Logger
	mtu       int // already validated by stackMTU
	out       func(pkts [][]byte)
	icmp      bool // register the ICMP transports (Egress answers echoes)
	// setup configures the NIC for its owner once it exists (addresses,
	// promiscuity, transport handlers); on failure it names the step.
	setup func(s *stack.Stack) (what string, err tcpip.Error)
	// release gives a packet passed to Submit back to its owner once the
	// stack has its copy (nil: nothing to do).
	release func(pkt []byte)
}

// submitQueueLen bounds packets Submit queues for the stack.
const submitQueueLen = 4096

// stackCore is embedded by Egress and Proxy; see the top of this file.
type stackCore struct {
	mtu int
	log *slog.Logger

	out   func(pkts [][]byte)
	outMu sync.Mutex // serializes calls to out

	stack *stack.Stack
	link  *linkEndpoint
	ow    *outWriter // the pump's; its drop count is read under outMu

	// ctx is cancelled by Close; everything the owner starts derives from it.
	ctx    context.Context
	cancel context.CancelFunc

	// intercept, if set, sees each well-formed injected packet before the
	// stack does and returns true if it consumed it. Set before start.
	intercept func(pkt []byte) bool

	// injectMu is held shared by inject while it feeds the stack and
	// exclusively by shutdown, so no packet enters a stack being torn down.
	injectMu sync.RWMutex
	closed   atomic.Bool

	mu      sync.Mutex // guards done, closers and wg.Add
	done    bool
	closers map[io.Closer]struct{}
	wg      sync.WaitGroup

	closeOnce sync.Once

	// Counters both Stats report.
	injected, malformed, outPackets atomic.Uint64
	subDropped                      atomic.Uint64 // Submit: queue full

	subq       *batchq.Fair[netip.Addr, []byte] // packets Submit queued, by source (a client's fair share)
	release    func(pkt []byte)
	unwritable atomic.Uint64 // a copy of ow.dropped
	// Copies of ow.syn's counters (synstamp.go).
	synRestamped, synForgotten atomic.Uint64
}

// outDropped counts the stack's outbound packets that never reached out:
// the link's queue was full, or the packet could not be written.
func (c *stackCore) outDropped() uint64 {
	return c.link.dropped.Load() + c.unwritable.Load()
}

// stackMTU applies the default and checks the range, so both constructors
// reject the same values with the same message.
func stackMTU(who string, mtu, def int) (int, error) {
	if mtu == 0 {
		mtu = def
	}
	if mtu < 1280 || mtu > egMaxIPPacket {
		return 0, errors.New("netstack: " + who + ": MTU must be between 1280 and 65535")
	}
	return mtu, nil
}

// init creates the tuned stack and its NIC. It does not start the pump: the
// owner finishes its own setup first and then calls start.
func (c *stackCore) init(cfg stackConfig) error {
	c.subq = batchq.NewFair[netip.Addr, []byte](submitQueueLen)
	c.release = cfg.release
	c.mtu = cfg.mtu
	c.out = cfg.out
	c.closers = make(map[io.Closer]struct{})
	c.log = cfg.log
	if c.log == nil {
		c.log = slog.Default()
	}
	c.log = c.log.With("component", cfg.component)
	c.ctx, c.cancel = context.WithCancel(context.Background())

	transports := []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol}
	if cfg.icmp {
		transports = append(transports, gicmp.NewProtocol4, gicmp.NewProtocol6)
	}
	s := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			// Loopback destinations are let into the stack: through the
			// tunnel 127.0.0.1 is the agent's own loopback, and whether a
			// client may reach it is the agent's Allow decision.
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: transports,
	})
	fail := func(what string, err tcpip.Error) error {
		s.Close()
		s.Wait()
		c.cancel()
		return errors.New("netstack: " + cfg.who + ": " + what + ": " + err.String())
	}

	tcpOpts := []tcpip.SettableTransportProtocolOption{
		stackPtr(tcpip.TCPSACKEnabled(true)),
		stackPtr(tcpip.TCPRecovery(tcpip.TCPRACKLossDetection)), // see above
		stackPtr(tcpip.TCPMinRTOOption(stackMinRTO)),
		stackPtr(tcpip.CongestionControlOption("rate")), // our gVisor patch 0001: see above
		stackPtr(tcpip.TCPModerateReceiveBufferOption(true)),
		&tcpip.TCPSendBufferSizeRangeOption{Min: stackTCPBufMin, Default: stackTCPBufDefault, Max: stackTCPBufMax},
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: stackTCPBufMin, Default: stackTCPBufDefault, Max: stackTCPBufMax},
	}
	for _, o := range tcpOpts {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fail("tcp option", err)
		}
	}

	c.link = newLinkEndpoint(cfg.mtu)
	c.ow = newOutWriter(cfg.mtu, c.flushOut)
	c.ow.syn = newSynStamps(s.Clock())
	if err := s.CreateNIC(stackNIC, c.link); err != nil {
		return fail("create NIC", err)
	}
	if cfg.setup != nil {
		if what, err := cfg.setup(s); err != nil {
			return fail(what, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: stackNIC},
		{Destination: header.IPv6EmptySubnet, NIC: stackNIC},
	})
	c.stack = s
	return nil
}

func stackPtr[T any](v T) *T { return &v }

// start runs the output pump; from here on out may be called.
func (c *stackCore) start() {
	c.wg.Add(2)
	go c.pump()
	go c.runSubmitted()
}

// Submit queues a raw IP packet from the tunnel for the stack and never
// blocks: it is called on a QUIC connection's goroutine. The stack takes
// everything queued since its last round as one batch (so that GRO can
// merge a flow's consecutive TCP segments) on a goroutine of its own. It
// takes ownership of pkt and gives it back through the release function
// it was configured with, once injected or dropped; a full queue drops it
// and counts (SubmitDropped). The queue is shared fairly by the packets'
// sources (on the agent: the clients): one client sending faster than the
// stack takes fills its own share and loses its own packets, not the
// others'.
func (c *stackCore) Submit(pkt []byte) bool {
	if c.intercept != nil && isEchoRequest(pkt) {
		// An echo request never enters the stack and costs only a
		// non-blocking sendto (Egress.handleEcho): handled here, it skips
		// the hand-off to runSubmitted's goroutine, a wake-up that is a
		// good part of a tunnel ping's time on an idle agent.
		c.inject([][]byte{pkt})
		if c.release != nil {
			c.release(pkt)
		}
		return true
	}
	// A client's IPv4 and IPv6 overlay addresses share one fair share.
	if !c.subq.Put(wire.OverlayOwner(srcOf(pkt)), pkt) {
		c.subDropped.Add(1)
		if c.release != nil {
			c.release(pkt)
		}
		return false
	}
	return true
}

// isEchoRequest tells whether p looks like an ICMP or ICMPv6 echo request
// (inject checks it properly).
func isEchoRequest(p []byte) bool {
	switch {
	case len(p) >= 28 && p[0]>>4 == 4 && p[9] == egProtoICMPv4:
		ihl := int(p[0]&0x0f) * 4
		return len(p) > ihl && p[ihl] == egICMPv4EchoRequest
	case len(p) >= 48 && p[0]>>4 == 6 && p[6] == egProtoICMPv6:
		return p[40] == egICMPv6EchoRequest
	}
	return false
}

// srcOf is an IP packet's source address, the zero Addr if it has none;
// the stack checks the rest.
func srcOf(p []byte) netip.Addr {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(p[12:16]))
	case len(p) >= 40 && p[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(p[8:24]))
	}
	return netip.Addr{}
}

// runSubmitted injects what Submit queued until shutdown.
func (c *stackCore) runSubmitted() {
	defer c.wg.Done()
	var batch [][]byte
	for {
		var err error
		if batch, err = c.subq.Take(c.ctx, batch); err != nil {
			return
		}
		c.inject(batch) // copies: the buffers are free again
		if c.release != nil {
			for _, b := range batch {
				c.release(b)
			}
		}
	}
}

// inject feeds a batch of raw IP packets to the stack: each counted,
// dropped if malformed (including a bad TCP/UDP checksum) or after shutdown
// has begun, offered to intercept first. Consecutive segments of one TCP
// flow are merged by GRO and everything is delivered before inject returns.
// It copies what it keeps of pkts.
func (c *stackCore) inject(pkts [][]byte) {
	c.injected.Add(uint64(len(pkts)))
	c.injectMu.RLock()
	defer c.injectMu.RUnlock()
	if c.closed.Load() {
		return
	}
	d := c.link.currentDispatcher()
	if d == nil {
		return
	}
	g := groPool.Get().(*gro.GRO)
	g.Dispatcher = d
	for _, pkt := range pkts {
		b, proto, ok := egParseIP(pkt)
		if !ok || !rxTransportValid(b) {
			c.malformed.Add(1)
			continue
		}
		if c.intercept != nil && c.intercept(b) {
			continue
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
		pb.NetworkProtocolNumber = proto
		pb.RXChecksumValidated = true
		g.Enqueue(pb)
		pb.DecRef()
	}
	g.Flush()
	g.Dispatcher = nil
	groPool.Put(g)
}

// pump moves the packets the stack wrote to the link to out, in batches.
func (c *stackCore) pump() {
	defer c.wg.Done()
	var spare []*stack.PacketBuffer
	for {
		pkts := c.link.take(c.ctx, spare)
		if pkts == nil {
			return
		}
		c.outMu.Lock()
		for _, p := range pkts {
			c.ow.Write(p)
		}
		c.ow.Flush()
		c.unwritable.Store(c.ow.dropped)
		c.synRestamped.Store(c.ow.syn.restamped)
		c.synForgotten.Store(c.ow.syn.forgotten)
		c.outMu.Unlock()
		for i, p := range pkts {
			p.DecRef()
			pkts[i] = nil
		}
		spare = pkts[:0]
	}
}

// flushOut passes a batch to out; the caller holds outMu. None reaches out
// once shutdown has cancelled ctx.
func (c *stackCore) flushOut(pkts [][]byte) {
	if c.ctx.Err() != nil {
		return
	}
	c.outPackets.Add(uint64(len(pkts)))
	c.out(pkts)
}

// emit passes one packet made outside the stack (an echo reply) to out,
// serialized with the pump's batches.
func (c *stackCore) emit(b []byte) {
	if len(b) == 0 || len(b) > c.mtu {
		return
	}
	c.outMu.Lock()
	defer c.outMu.Unlock()
	c.flushOut([][]byte{b})
}

// shutdown runs the close sequence once: stop inject, refuse new work, cancel,
// close every registered closer, wait for the tracked goroutines, run
// afterWait (owner resources that those goroutines may still have used),
// then tear the stack down and log stopped.
func (c *stackCore) shutdown(afterWait func(), stopped string) {
	c.closeOnce.Do(func() {
		c.injectMu.Lock()
		c.closed.Store(true)
		c.injectMu.Unlock()

		c.mu.Lock()
		c.done = true
		closers := c.closers
		c.closers = map[io.Closer]struct{}{}
		c.mu.Unlock()

		c.cancel()
		for cl := range closers {
			_ = cl.Close()
		}
		c.wg.Wait()
		if afterWait != nil {
			afterWait()
		}
		c.link.Close()
		c.stack.Close()
		c.stack.Wait()
		c.log.Info(stopped)
	})
}

// track registers one more goroutine of work; it fails once shutdown has begun.
func (c *stackCore) track() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return false
	}
	c.wg.Add(1)
	return true
}

// addCloser registers cl to be closed by shutdown; if shutdown has already
// begun it closes cl at once and returns false.
func (c *stackCore) addCloser(cl io.Closer) bool {
	c.mu.Lock()
	if c.done {
		c.mu.Unlock()
		_ = cl.Close()
		return false
	}
	c.closers[cl] = struct{}{}
	c.mu.Unlock()
	return true
}

// removeCloser forgets cl and closes it.
func (c *stackCore) removeCloser(cl io.Closer) {
	c.mu.Lock()
	delete(c.closers, cl)
	c.mu.Unlock()
	_ = cl.Close()
}

// StackDrops are the stack's counters of packets it dropped, ours and
// gVisor's own, by name: where a tunneled flow loses packets inside it.
func (c *stackCore) StackDrops() map[string]uint64 {
	s := c.stack.Stats()
	return map[string]uint64{
		"netstack_queue_full":         c.subDropped.Load(),
		"netstack_queue_share":        c.subq.OverShare(), // of those: a source over its fair share
		"netstack_out_dropped":        c.outDropped(),
		"netstack_malformed":          c.malformed.Load(),
		"gvisor_dropped":              s.DroppedPackets.Value(),
		"gvisor_tcp_invalid_segments": s.TCP.InvalidSegmentsReceived.Value(),
		"gvisor_tcp_checksum_errors":  s.TCP.ChecksumErrors.Value(),
		"gvisor_tcp_send_errors":      s.TCP.SegmentSendErrors.Value(),
		"gvisor_tcp_forward_inflight": s.TCP.ForwardMaxInFlightDrop.Value(),
		"gvisor_tcp_listen_overflow":  s.TCP.ListenOverflowSynDrop.Value() + s.TCP.ListenOverflowAckDrop.Value(),
		"gvisor_udp_receive_overflow": s.UDP.ReceiveBufferErrors.Value(),
	}
}

// StackRecovery counts gVisor's TCP loss recovery: how often it had to
// retransmit, and how often only a retransmission timeout helped.
func (c *stackCore) StackRecovery() (retransmits, timeouts uint64) {
	s := c.stack.Stats()
	return s.TCP.Retransmits.Value(), s.TCP.Timeouts.Value()
}

// StackTCP is gVisor's TCP counters that say how the stack, as a sender,
// got through loss (by name, as status shows them): which recovery it
// entered, how often, how often it was spurious, and what it cost in
// resent segments. Read next to segments_sent they show why a lossy
// transfer is slow (timeouts vs. fast recovery). syn_restamped counts
// retransmitted SYNs and SYN-ACKs we gave a fresh timestamp (synstamp.go),
// syn_stamps_forgotten handshakes the bounded table forgot.
func (c *stackCore) StackTCP() map[string]uint64 {
	t := c.stack.Stats().TCP
	return map[string]uint64{
		"segments_sent":          t.SegmentsSent.Value(),
		"retransmits":            t.Retransmits.Value(),
		"timeouts":               t.Timeouts.Value(),
		"fast_recovery":          t.FastRecovery.Value(),
		"sack_recovery":          t.SACKRecovery.Value(),
		"tlp_recovery":           t.TLPRecovery.Value(),
		"fast_retransmit":        t.FastRetransmit.Value(),
		"slow_start_retransmits": t.SlowStartRetransmits.Value(),
		"spurious_recovery":      t.SpuriousRecovery.Value(),
		"spurious_rto_recovery":  t.SpuriousRTORecovery.Value(),
		"dsack_acked_segments":   t.SegmentsAckedWithDSACK.Value(),
		"syn_restamped":          c.synRestamped.Load(),
		"syn_stamps_forgotten":   c.synForgotten.Load(),
	}
}
