// Package session is the peer session: one QUIC connection between a client
// and an agent, mutually authenticated with the two nodes' own keys, end to
// end. IP packets ride in QUIC DATAGRAM frames (unreliable, so a tunneled TCP
// never suffers head-of-line blocking or TCP-over-TCP meltdown); control
// rides on one stream. The connection runs over a Conn, whose paths (relay
// or direct) can change underneath it.
package session

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/sys/cpu"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// QUICConfig is the peer connection's configuration on full-size paths.
func QUICConfig() *quic.Config { return QUICConfigSized(wire.PeerPacketSize) }

// QUICConfigSized is the peer connection's configuration with packets of
// packetSize bytes (Sizes.Peer). The listening agent uses its own size: it
// advertises it and sends no more than the dialing client's (quic-go patch
// 0007), which dials with the session's.
func QUICConfigSized(packetSize int) *quic.Config {
	return &quic.Config{
		EnableDatagrams:         true,
		InitialPacketSize:       uint16(packetSize),
		DisablePathMTUDiscovery: true,
		HandshakeIdleTimeout:    10 * time.Second,
		// Long enough to ride out a gateway restart on the relay path.
		MaxIdleTimeout:  90 * time.Second,
		KeepAlivePeriod: 5 * time.Second,
		// One stream: the agent's session info to the client. Nothing else
		// is read, so nothing else may be opened (a peer cannot make us
		// buffer streams nobody reads).
		MaxIncomingStreams:    1,
		MaxIncomingUniStreams: -1,
		DatagramSendQueueLen:  SendQueueLen,
		MaxUnprocessedPackets: RecvQueueLen,
		// The session carries IP packets whose own transports (TCP above
		// all) control congestion end to end; a second controller here
		// only halves the rate on every random loss (quic-go patch 0004).
		DisableCongestionControl: true,
		// The session's Conn only queues a packet on its path (the
		// underlay's batching writer, the relay's queue): no goroutine of
		// quic-go's is needed in front of it (quic-go patch 0015).
		SendWithoutQueue: true,
	}
}

// DialQUICConfigSized is QUICConfigSized for the side that dials, the
// client. Its sessions end at one TUN device or netstack, so when one falls
// behind, quic-go's read loop waits for it (DialRecvWait) instead of
// dropping what overflows the connection's queue, and that queue can be
// short. The backlog then waits in the session Conn's queue. Packets from
// the underlay's frame socket (the direct path, the relay's UDP frames)
// hold its receive buffers there, at most 32, and beyond them the rest
// stays unread in the socket's receive buffer, which the kernel holds.
// Packets that reach the Conn as copies (relayed over the gateway's
// connection, from a wide round's extra socket) wait in its queue, up to
// inQueueLen. The agent listens with QUICConfig: it serves many clients on
// one Transport, where a wait for one client's connection would hold back
// every other client's packets too.
func DialQUICConfigSized(packetSize int) *quic.Config {
	c := QUICConfigSized(packetSize)
	c.MaxUnprocessedPackets = DialRecvQueueLen
	c.UnprocessedPacketsWait = DialRecvWait
	return c
}

// DialRecvQueueLen is RecvQueueLen on the dialing side. Packets queued there
// are the process's memory (quic-go's 1.5 KB buffers): 4096 of them, full
// on every four-stream download, were ~6 MB of the client's ~17 MB live
// heap, which with the runtime's own memory reached the client's 24 MiB
// limit and made the collector run back to back.
//
// nlvpn-lab bench --paths direct, three alternated rounds, 4096 without
// the wait -> 512 with it: client peak RSS 38.3-38.5 -> 35.3-35.6 MiB,
// four-stream download 1625-1934 -> 2014-2215 Mbit/s at 3.58-4.85 ->
// 2.78-3.04 client s/GB, packets dropped on the single-stream download
// 0/373/0 -> 0/0/0 (0 at the socket in all). 256 did as well (three
// rounds of the four-stream rows); 512 leaves more room for a burst while
// the connection is busy.
const DialRecvQueueLen = 512

// DialRecvWait bounds how long quic-go's read loop waits for room on the
// dialing side. Longer than the TUN writer's own bounded wait (tun.MaxWait,
// 50 ms), so that a connection held back by its device is waited for; a
// connection that takes no packet in that time has its packets dropped, as
// before, until it takes one (quic-go patch 0019).
const DialRecvWait = 100 * time.Millisecond

// RecvQueueLen bounds received packets waiting for the QUIC connection's
// goroutine (quic-go's default is 256). quic-go's read loop moves packets
// from the Conn to this queue as fast as they come, so this, not the Conn's
// own queue, is what absorbs a burst while the connection is busy.
const RecvQueueLen = 4096

// ClientTLS is the dialing side's TLS: it presents key and accepts only an
// agent that proves it holds agentKey.
func ClientTLS(key *identity.Key, agentKey identity.PublicKey) (*tls.Config, error) {
	cert, err := key.Certificate()
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:         tls.VersionTLS13,
		Certificates:       []tls.Certificate{cert},
		NextProtos:         []string{wire.ALPNPeer},
		ServerName:         "nlvpn-node",
		InsecureSkipVerify: true, // replaced by the key check below: there is no CA
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			got, err := identity.PeerKey(raw)
			if err != nil {
				return err
			}
			if !got.Equal(agentKey) {
				return fmt.Errorf("agent presented key %s, expected %s", got, agentKey)
			}
			return nil
		},
	}, nil
}

// ServerTLS is the agent's TLS: it requires a client certificate whose key
// the caller checks against the gateway's offer after the handshake
// (PeerKeyOf), since one listener serves every session.
func ServerTLS(key *identity.Key) (*tls.Config, error) {
	cert, err := key.Certificate()
	if err != nil {
		return nil, err
	}
	return identity.ServerTLS(cert, wire.ALPNPeer), nil
}

// PeerKeyOf returns the key the remote end of an established connection
// proved it holds.
func PeerKeyOf(c *quic.Conn) (identity.PublicKey, error) {
	return identity.KeyOf(c.ConnectionState().TLS)
}

// SendQueueLen bounds packets waiting to be packed into QUIC packets (the
// connection's DATAGRAM queue). The pump must never stall on it, so packets
// beyond this are dropped and counted, as a full NIC queue would.
const SendQueueLen = 1024

// Stats counts a session's traffic.
type Stats struct {
	TxPackets, TxBytes, RxPackets, RxBytes uint64
	DropQueueFull, DropTooLarge, DropSend  uint64
	// DropRxTooLarge counts received datagrams over TunMTU (the largest
	// any session has).
	DropRxTooLarge uint64
}

// Session is one established peer connection with its packet pump.
type Session struct {
	ID   uint64
	Conn *quic.Conn
	log  *slog.Logger

	done chan struct{}

	// The per-packet counters, each direction on its own cache line: the
	// sender and the receiver run on different CPUs, and sharing a line
	// made every packet one way evict it from the other's cache (s.rxb.Add
	// was 4 % of the agent's CPU in an upload's profile).
	tx, rx                         dirCounters
	dropQueue, dropLarge, dropSend atomic.Uint64
	dropRxLarge                    atomic.Uint64
	stalled                        atomic.Bool   // SendWait's last wait ran out; no more waits until the queue takes a packet
	waitsRanOut                    atomic.Uint64 // SendWait calls that waited SendWaitMax in vain (tests)
	mtu                            atomic.Int32  // largest packet Send takes: the session's Sizes.TUN
}

// dirCounters counts one direction's packets and bytes, alone on a cache
// line.
type dirCounters struct {
	_           cpu.CacheLinePad
	pkts, bytes atomic.Uint64
	_           cpu.CacheLinePad
}

func (c *dirCounters) add(n int) {
	c.pkts.Add(1)
	c.bytes.Add(uint64(n))
}

func (c *dirCounters) addAll(pkts [][]byte) {
	n := 0
	for _, p := range pkts {
		n += len(p)
	}
	c.pkts.Add(uint64(len(pkts)))
	c.bytes.Add(uint64(n))
}

// New wraps an established connection. Call Start to receive, then Wait.
func New(id uint64, c *quic.Conn, log *slog.Logger) *Session {
	s := &Session{ID: id, Conn: c, log: log, done: make(chan struct{})}
	s.mtu.Store(wire.TunMTU)
	return s
}

// SetMTU sets the largest IP packet the session carries (its Sizes.TUN; at
// most TunMTU, the default).
func (s *Session) SetMTU(n int) { s.mtu.Store(int32(min(n, wire.TunMTU))) }

// MTU is the largest IP packet the session carries.
func (s *Session) MTU() int { return int(s.mtu.Load()) }

// ErrTooLarge is returned by Send for a packet over the session's MTU.
var ErrTooLarge = errors.New("packet larger than the tunnel MTU")

// Send queues one IP packet for the peer. It copies pkt (into a buffer the
// connection reuses: nothing is allocated) and never blocks: with
// SendQueueLen packets already waiting, pkt is dropped and counted. It may
// be called before Start and from several goroutines.
func (s *Session) Send(pkt []byte) error {
	if len(pkt) > int(s.mtu.Load()) {
		s.dropLarge.Add(1)
		return ErrTooLarge
	}
	switch err := s.Conn.TrySendDatagram(pkt); {
	case err == nil:
		s.tx.add(len(pkt))
	case errors.Is(err, quic.ErrDatagramQueueFull):
		s.dropQueue.Add(1)
	default:
		// The connection is closing (or the peer refused datagrams,
		// which the handshake rules out).
		s.dropSend.Add(1)
	}
	return nil
}

// SendWait is Send for a source of the session's packets that may be held
// back: when the queue is full it waits, at most SendWaitMax, instead of
// dropping. The client's TUN reader uses it, so that a burst of segments
// read from the kernel (a TSO segment is ~45 packets) pushes back on the
// sending TCP, as a full NIC queue does, instead of being dropped here and
// retransmitted; the agent's netstack output does the same for the
// netstack's TCP. While the path takes packets the queue drains at CPU
// speed (the congestion controller is off). When it stops (a peer gone
// silent, a direct path lost before the fallback) the queue can stay full
// for seconds: then one wait runs out, and until the queue takes a packet
// again SendWait drops at once, so a shared producer (the agent's output
// pump serves every client) is held up once per stall, not per packet.
func (s *Session) SendWait(pkt []byte) error {
	if len(pkt) > int(s.mtu.Load()) {
		s.dropLarge.Add(1)
		return ErrTooLarge
	}
	one := [1][]byte{pkt}
	s.SendWaitBatch(one[:])
	return nil
}

// SendWaitBatch is SendWait for each of pkts in order, queued with one
// lock and one wake-up of the connection for as many as there is room for:
// the client's TUN reader and the agent's netstack output hand over what
// one read gave them (a TSO segment is ~45 packets). Packets over the MTU
// are dropped and counted, as by SendWait; once a wait has run out, the
// rest of the burst is dropped and counted as SendWait would drop each.
func (s *Session) SendWaitBatch(pkts [][]byte) {
	mtu := int(s.mtu.Load())
	for len(pkts) > 0 {
		k := 0 // the run of packets that fit the MTU
		for k < len(pkts) && len(pkts[k]) <= mtu {
			k++
		}
		if k == 0 {
			s.dropLarge.Add(1)
			pkts = pkts[1:]
			continue
		}
		wait := SendWaitMax
		if s.stalled.Load() {
			wait = 0
		}
		n, err := s.Conn.SendDatagramsWait(pkts[:k], wait)
		if n > 0 {
			s.stalled.Store(false)
			s.tx.addAll(pkts[:n])
		}
		pkts, k = pkts[n:], k-n
		switch {
		case err == nil:
		case errors.Is(err, quic.ErrDatagramQueueFull):
			if wait > 0 {
				s.waitsRanOut.Add(1)
			}
			s.stalled.Store(true)
			s.dropQueue.Add(uint64(k))
			pkts = pkts[k:]
		default:
			// Too large for the path's packets just now, or the
			// connection is closing (then the rest fail as fast).
			s.dropSend.Add(1)
			pkts = pkts[1:]
		}
	}
}

// SendWaitMax bounds how long SendWait waits for room.
const SendWaitMax = 20 * time.Millisecond

// Done is closed when the session has ended.
func (s *Session) Done() <-chan struct{} { return s.done }

// Alive reports whether the session still runs.
func (s *Session) Alive() bool {
	select {
	case <-s.done:
		return false
	default:
		return s.Conn.Context().Err() == nil
	}
}

// Start makes recv receive every datagram of the session from now on,
// beginning with those that arrived before (up to quic-go's 128-deep
// queue; datagrams beyond it are dropped and counted in Drops.RxEarly).
// Call it before the peer is told to send: the agent starts its session
// before it sends its peer info. Start may be called once.
//
// recv runs on the QUIC connection's own goroutine (quic-go's datagram
// queue and its copy are bypassed), so it must not block for long: hand
// the packet on, waiting (briefly, bounded) at most for room in the next
// queue, or drop it; while it waits, the connection receives and sends
// nothing. It owns pkt, a pooled buffer: when done with it, it gives it
// back with ReleasePacket (or lets it be collected). recv must be safe for
// concurrent use: datagrams that arrived before Start are handed to it
// from Start's goroutine while new ones already arrive.
func (s *Session) Start(recv func(pkt []byte)) {
	deliver := func(b []byte) {
		if len(b) > wire.TunMTU {
			// No peer of ours sends these (Send refuses them).
			s.dropRxLarge.Add(1)
			return
		}
		pkt := getPacket(len(b))
		copy(pkt, b)
		s.rx.add(len(b))
		recv(pkt)
	}
	for _, b := range s.Conn.SetDatagramHandler(deliver) {
		deliver(b)
	}
}

// Wait blocks until the connection ends and returns why; the session is
// then done.
func (s *Session) Wait() error {
	defer close(s.done)
	ctx := s.Conn.Context()
	<-ctx.Done()
	return context.Cause(ctx)
}

// Stats returns the session's counters.
func (s *Session) Stats() Stats {
	return Stats{
		TxPackets: s.tx.pkts.Load(), TxBytes: s.tx.bytes.Load(), RxPackets: s.rx.pkts.Load(), RxBytes: s.rx.bytes.Load(),
		DropQueueFull: s.dropQueue.Load(), DropTooLarge: s.dropLarge.Load(), DropSend: s.dropSend.Load(),
		DropRxTooLarge: s.dropRxLarge.Load(),
	}
}
