// Package relay carries a peer session's packets through the gateway when no
// direct path exists. A relay frame is a wire frame header (kind, session ID)
// and an opaque payload, the peer session's own QUIC packet. Nodes send
// frames as plain UDP datagrams to the gateway's port, from the port their
// gateway connection uses; the gateway matches the session ID to a route
// between exactly two node connections, checks that the frame came from
// one end's address, and sends it, unchanged, to the other end's address:
// nothing is decrypted, nothing is wrapped again. Where frames cannot pass
// as UDP, a node sends them in DATAGRAMs of its gateway connection instead,
// and the hub sends it its frames the same way.
//
// The gateway never sees more than that ciphertext, and it sends only to
// addresses that proved themselves: a node's address is the one its QUIC
// connection comes from (QUIC validated it in the handshake), frames go to
// it as UDP only after it sent a relay check from there, and each forwarded
// frame is one received frame of the same size. A frame from anywhere else
// is dropped and counted.
package relay

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// DatagramSender is the part of a QUIC connection the relay needs: it
// sends frames in DATAGRAMs, and its RemoteAddr is the node's address now.
type DatagramSender interface {
	SendDatagram([]byte) error
	RemoteAddr() net.Addr
}

// UDPSender writes datagrams from the gateway's port (udpbatch.Writer): it
// copies b and reports false when it dropped it. Write never blocks;
// WriteWait waits, boundedly, for room in a full queue first. If it also
// has Queued() int and Cap() int (the datagrams waiting in its queue, and
// how many it holds), the hub shares that queue fairly between senders
// while it is more than half full (see fair.go).
type UDPSender interface {
	Write(to netip.AddrPort, b []byte) bool
	WriteWait(to netip.AddrPort, b []byte) bool
}

// Frame builds a relay frame around pkt.
func Frame(id uint64, pkt []byte) []byte { return wire.NewFrame(wire.FrameRelay, id, pkt) }

// QueueLen is how many frames may wait for one node's connection on the
// DATAGRAM carrier. Beyond it frames are dropped and counted: a slow
// receiver must not stall the reader of the connection the frame came from
// (quic-go's SendDatagram blocks when its own queue is full).
const QueueLen = 1024

// UDPLapse is how long a node's relay frames count as passing over UDP
// after its last relay check (nodes check every 5 s once confirmed).
const UDPLapse = 15 * time.Second

// Stats are the hub's counters.
type Stats struct {
	Frames          uint64       `json:"frames"` // forwarded
	Bytes           uint64       `json:"bytes"`
	UDPFrames       uint64       `json:"udp_frames"`           // of those, sent as UDP datagrams
	DropUnknown     uint64       `json:"drop_unknown_session"` // no route for the session ID
	DropNotEndpoint uint64       `json:"drop_not_endpoint"`    // sender is not an end of that route (spoofed)
	DropQueueFull   uint64       `json:"drop_queue_full"`
	DropUnfair      uint64       `json:"drop_unfair"` // the queue to the node was congested and the sender above its fair share
	DropMalformed   uint64       `json:"drop_malformed"`
	DropSendFailed  uint64       `json:"drop_send_failed"`
	ChecksAnswered  uint64       `json:"checks_answered"`
	ChecksRefused   uint64       `json:"checks_refused"` // relay checks from an address that is no node's
	Routes          int          `json:"routes"`
	Sessions        []RouteStats `json:"sessions"`
}

// RouteStats counts one route's relayed traffic.
type RouteStats struct {
	ID           uint64 `json:"id"`
	A            string `json:"a"`
	B            string `json:"b"`
	BytesAToB    uint64 `json:"bytes_a_to_b"`
	BytesBToA    uint64 `json:"bytes_b_to_a"`
	PacketsAToB  uint64 `json:"packets_a_to_b"`
	PacketsBToA  uint64 `json:"packets_b_to_a"`
	RelayedTotal uint64 `json:"relayed_bytes"`
}

// Hub is the gateway's relay: routes between node connections.
type Hub struct {
	log *slog.Logger
	udp UDPSender // nil until SetUDP: frames go in DATAGRAMs only
	// udpDepth is udp's queue depth, if it tells (nil: never congested).
	udpDepth queueDepth

	mu     sync.Mutex // serializes changes to routes, byAddr and peers
	routes sync.Map   // uint64 → *route; read per frame without a lock
	byAddr sync.Map   // netip.AddrPort → *Peer: the nodes' addresses
	peers  map[*Peer]struct{}
	nroute atomic.Int64

	frames, bytes, udpFrames                               atomic.Uint64
	dropUnknown, dropNotEndpoint, dropQueue, dropMalformed atomic.Uint64
	dropSend, checksOK, checksRefused, dropUnfair          atomic.Uint64
}

type route struct {
	id       uint64
	a, b     *Peer
	ab, ba   atomic.Uint64 // bytes
	pab, pba atomic.Uint64 // packets
	fab, fba fairSender    // a's and b's shares of the queue to the other
}

// NewHub returns an empty hub.
func NewHub(log *slog.Logger) *Hub {
	if log == nil {
		log = slog.Default()
	}
	return &Hub{log: log, peers: make(map[*Peer]struct{})}
}

// SetUDP gives the hub the gateway port's writer; from then on frames go
// as UDP to nodes whose relay checks arrive. Call it before traffic flows.
func (h *Hub) SetUDP(s UDPSender) {
	h.udp = s
	h.udpDepth, _ = s.(queueDepth)
}

// Peer is one node connection as the hub sees it.
type Peer struct {
	Name string
	// OnGone, if set (before any Bind), is called with the ID of each of
	// this peer's routes removed because the other end closed, so the
	// gateway can tell this node at once instead of letting it find out
	// by silence.
	OnGone func(id uint64)
	// OnMoved, if set (before any Bind), is called by Refresh with the ID
	// of each of this peer's routes whose other end moved to a new
	// address, and that address, so the gateway can tell this node where
	// its peer is now (to punch the direct path again).
	OnMoved func(id uint64, to netip.AddrPort)
	hub     *Hub
	// addr is where the node's gateway connection comes from now (its NAT
	// may rebind; the gateway moves it with SetAddr); nil: none (another
	// node took the address).
	addr    atomic.Pointer[netip.AddrPort]
	token   [CheckTokenLen]byte // what the node's relay checks must carry
	conn    DatagramSender
	out     chan []byte // made by queue
	outOnce sync.Once
	fair    fairLink // shares of out between the senders toward this node
	// udpFair: shares of the gateway port's write queue between the
	// senders toward this node.
	udpFair fairLink
	done    chan struct{}
	once    sync.Once
	closed  bool         // guarded by hub.mu
	udpAt   atomic.Int64 // unix nanoseconds of its last relay check
}

// ErrPeerClosed is returned by Bind when one end's connection is gone.
var ErrPeerClosed = errors.New("relay: peer closed")

// CheckTokenLen is the length of the secret a node's relay checks carry
// (after the frame header): the gateway gives it to the node over the
// authenticated gateway connection, so a check with a forged source
// address cannot make the gateway send frames as UDP to that address.
const CheckTokenLen = 16

// NewPeer registers a node connection coming from addr (its QUIC
// connection's remote address), whose relay checks carry token. Its
// DATAGRAM queue and sender start with the first frame that needs them.
// Close it when the connection ends; that also removes its routes.
func (h *Hub) NewPeer(name string, addr netip.AddrPort, token [CheckTokenLen]byte, conn DatagramSender) *Peer {
	p := &Peer{Name: name, hub: h, token: token, conn: conn, done: make(chan struct{})}
	h.mu.Lock()
	h.peers[p] = struct{}{}
	h.mu.Unlock()
	p.SetAddr(addr)
	return p
}

// queue is the node's DATAGRAM queue, made with its sender on first use:
// most relayed frames go as UDP, and an idle node should cost the gateway
// little (the queue is 24 KiB, its goroutine's stack 8 KiB; together a
// fifth of an idle node, BenchmarkGatewayIdleNodes).
func (p *Peer) queue() chan []byte {
	p.outOnce.Do(func() {
		p.out = make(chan []byte, QueueLen)
		go p.send()
	})
	return p.out
}

// Move is a node's address change that Refresh made.
type Move struct {
	Name     string
	From, To netip.AddrPort
}

// Refresh moves every node whose connection now comes from another address
// (SetAddr) and returns the moves; the other end of each route of a moved
// node is told (Peer.OnMoved). The gateway calls it every second.
func (h *Hub) Refresh() []Move {
	h.mu.Lock()
	ps := make([]*Peer, 0, len(h.peers))
	for p := range h.peers {
		ps = append(ps, p)
	}
	h.mu.Unlock()
	var moves []Move
	for _, p := range ps {
		ua, ok := p.conn.RemoteAddr().(*net.UDPAddr)
		if !ok {
			continue
		}
		now := ua.AddrPort()
		now = netip.AddrPortFrom(now.Addr().Unmap(), now.Port())
		if was := p.addr.Load(); was == nil || *was != now {
			if was == nil && h.takenByOther(now, p) {
				continue // another node holds that address now
			}
			from := p.Addr()
			p.SetAddr(now)
			moves = append(moves, Move{p.Name, from, now})
			h.tellMoved(p, now)
		}
	}
	return moves
}

// tellMoved calls OnMoved of the other end of each of p's routes.
func (h *Hub) tellMoved(p *Peer, to netip.AddrPort) {
	if p.Addr() != to {
		return // another node holds that address: nothing to probe there
	}
	h.routes.Range(func(_, v any) bool {
		r := v.(*route)
		other := r.b
		switch p {
		case r.a:
		case r.b:
			other = r.a
		default:
			return true
		}
		if other.OnMoved != nil {
			other.OnMoved(r.id, to)
		}
		return true
	})
}

// takenByOther reports whether addr is registered to a node other than p.
func (h *Hub) takenByOther(addr netip.AddrPort, p *Peer) bool {
	v, ok := h.byAddr.Load(addr)
	return ok && v.(*Peer) != p
}

// Addr is the node's address now (not valid if another node took it).
func (p *Peer) Addr() netip.AddrPort {
	if a := p.addr.Load(); a != nil {
		return *a
	}
	return netip.AddrPort{}
}

// SetAddr moves the node to the address its gateway connection comes from
// now (a NAT rebinding, a new network). Frames from and to the old address
// stop at once, and frames go to the new one as UDP only after a relay
// check from there. If another node was registered at that address (its
// NAT gave the address on), that node loses it: a frame must never be
// taken for a session its sender is not part of.
func (p *Peer) SetAddr(addr netip.AddrPort) {
	addr = netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
	h := p.hub
	h.mu.Lock()
	defer h.mu.Unlock()
	if old := p.Addr(); old == addr && p.addr.Load() != nil {
		return
	} else if old.IsValid() {
		h.byAddr.CompareAndDelete(old, p)
	}
	p.udpAt.Store(0)
	if !addr.IsValid() || p.closed {
		p.addr.Store(nil)
		return
	}
	if v, ok := h.byAddr.Load(addr); ok && v.(*Peer) != p {
		prev := v.(*Peer)
		prev.addr.Store(nil)
		prev.udpAt.Store(0)
	}
	h.byAddr.Store(addr, p)
	p.addr.Store(&addr)
}

// overUDP reports whether frames to this node go as UDP datagrams.
func (p *Peer) overUDP(now int64) bool {
	at := p.udpAt.Load()
	return at != 0 && now-at < int64(UDPLapse)
}

func (p *Peer) send() {
	for {
		select {
		case <-p.done:
			return
		case b := <-p.out:
			if err := p.conn.SendDatagram(b); err != nil {
				p.hub.dropSend.Add(1)
			}
		}
	}
}

// Close stops the peer's sender and removes every route it is an end of.
func (p *Peer) Close() {
	p.once.Do(func() {
		close(p.done)
		h := p.hub
		type gone struct {
			id   uint64
			peer *Peer
		}
		var survivors []gone
		h.mu.Lock()
		p.closed = true
		delete(h.peers, p)
		if a := p.addr.Load(); a != nil {
			h.byAddr.CompareAndDelete(*a, p)
		}
		h.routes.Range(func(k, v any) bool {
			r := v.(*route)
			switch p {
			case r.a:
				survivors = append(survivors, gone{r.id, r.b})
			case r.b:
				survivors = append(survivors, gone{r.id, r.a})
			default:
				return true
			}
			h.routes.Delete(k)
			h.nroute.Add(-1)
			return true
		})
		h.mu.Unlock()
		for _, g := range survivors {
			if g.peer.OnGone != nil {
				g.peer.OnGone(g.id)
			}
		}
	})
}

// ErrInUse is returned by Bind for a session ID held by another pair.
var ErrInUse = errors.New("session ID in use by another pair")

// Bind routes session id between a and b, replacing a stale route of the
// same pair (a resumed session). It fails if the ID belongs to other nodes.
func (h *Hub) Bind(id uint64, a, b *Peer) error {
	if id == 0 || a == nil || b == nil || a == b {
		return fmt.Errorf("relay: bad route %d", id)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if a.closed || b.closed {
		return ErrPeerClosed // its connection is gone; a route would dangle
	}
	if v, ok := h.routes.Load(id); ok {
		if r := v.(*route); !(r.a == a && r.b == b) {
			return ErrInUse
		}
	} else {
		h.nroute.Add(1)
	}
	h.routes.Store(id, &route{id: id, a: a, b: b})
	return nil
}

// Unbind removes a route.
func (h *Hub) Unbind(id uint64) {
	h.mu.Lock()
	if _, ok := h.routes.LoadAndDelete(id); ok {
		h.nroute.Add(-1)
	}
	h.mu.Unlock()
}

// Has reports whether a route exists.
func (h *Hub) Has(id uint64) bool {
	_, ok := h.routes.Load(id)
	return ok
}

// lookup finds the route direction of a relay frame (its sender's fair
// share counts) and the node it goes to, given the node it came from; it
// counts what it drops.
func (h *Hub) lookup(buf []byte, from func(r *route) *Peer) (*fairSender, *Peer) {
	kind, id, _, err := wire.ParseFrame(buf)
	if err != nil || kind != wire.FrameRelay {
		h.dropMalformed.Add(1)
		return nil, nil
	}
	v, ok := h.routes.Load(id)
	if !ok {
		h.dropUnknown.Add(1)
		return nil, nil
	}
	r := v.(*route)
	src := from(r)
	switch src {
	case r.a:
		r.ab.Add(uint64(len(buf)))
		r.pab.Add(1)
		return &r.fab, r.b
	case r.b:
		r.ba.Add(uint64(len(buf)))
		r.pba.Add(1)
		return &r.fba, r.a
	default:
		h.dropNotEndpoint.Add(1)
		return nil, nil
	}
}

// Forward relays one frame that came in a DATAGRAM of from's connection.
// It never blocks. The frame is passed on as is (same header), so buf must
// not be reused by the caller.
func (h *Hub) Forward(from *Peer, buf []byte) {
	if s, to := h.lookup(buf, func(*route) *Peer { return from }); to != nil {
		h.deliver(s, to, buf, true, time.Now().UnixNano())
	}
}

// ForwardBorrowed is Forward for a frame that stays the caller's: buf is
// copied if it must be kept (quic-go's DATAGRAM handler lends it only
// for the call).
func (h *Hub) ForwardBorrowed(from *Peer, buf []byte) {
	if s, to := h.lookup(buf, func(*route) *Peer { return from }); to != nil {
		h.deliver(s, to, buf, false, time.Now().UnixNano())
	}
}

// HandleUDP takes one datagram that arrived at the gateway's port from
// addr and is not QUIC: a relay frame to forward, or a relay check to
// answer. buf is only read during the call.
func (h *Hub) HandleUDP(from netip.AddrPort, buf []byte) {
	h.HandleUDPAt(from, buf, time.Now().UnixNano())
}

// HandleUDPAt is HandleUDP for a reader of batches, with the time its
// batch was read (Unix ns): the clock is read once per batch, not per
// frame (a read per frame was 4-8 % of the gateway's CPU while relaying).
func (h *Hub) HandleUDPAt(from netip.AddrPort, buf []byte, now int64) {
	if len(buf) > 0 && buf[0] == wire.FrameRelayCheck {
		h.check(from, buf, now)
		return
	}
	// The sender must be an end of the route, at the address its gateway
	// connection comes from: a frame with any other source is spoofed.
	s, to := h.lookup(buf, func(r *route) *Peer {
		if a := r.a.addr.Load(); a != nil && *a == from {
			return r.a
		}
		if b := r.b.addr.Load(); b != nil && *b == from {
			return r.b
		}
		return nil
	})
	if to != nil {
		h.deliver(s, to, buf, false, now)
	}
}

// check answers a node's relay check with the same frame, to the same
// address, if that address is a node's and the check carries that node's
// token; it also tells the hub that frames to that node may go as UDP.
func (h *Hub) check(from netip.AddrPort, buf []byte, now int64) {
	if len(buf) != wire.FrameHeaderLen+CheckTokenLen {
		h.dropMalformed.Add(1)
		return
	}
	if _, _, _, err := wire.ParseFrame(buf); err != nil {
		h.dropMalformed.Add(1)
		return
	}
	v, ok := h.byAddr.Load(from)
	if !ok || h.udp == nil {
		h.checksRefused.Add(1)
		return
	}
	p := v.(*Peer)
	if subtle.ConstantTimeCompare(buf[wire.FrameHeaderLen:], p.token[:]) != 1 {
		h.checksRefused.Add(1)
		return
	}
	if !h.udp.Write(from, buf) {
		h.dropQueue.Add(1)
		return
	}
	p.udpAt.Store(now)
	h.checksOK.Add(1)
}

// deliver sends a frame from sender s to node to, as UDP where its checks
// arrive, in a DATAGRAM otherwise, unless the queue it would wait in is
// congested and s above its fair share of it. owned says buf may be kept
// (queued); now is the time (Unix ns) the frame was read.
func (h *Hub) deliver(s *fairSender, to *Peer, buf []byte, owned bool, now int64) {
	if a := to.addr.Load(); a != nil && h.udp != nil && to.overUDP(now) {
		// The gateway port's write queue is one for every destination,
		// but its shares are among the senders toward this destination,
		// as on the DATAGRAM carrier: counted over all destinations, the
		// two directions of one session would be two senders of one
		// queue, and a lone download's data, being more than its "half"
		// next to its own ACKs, was dropped (make bench: 2326 frames in
		// a 5 s relayed single stream). Flooders toward one agent, what
		// the rule is for, share one destination.
		congested := false
		if d := h.udpDepth; d != nil {
			congested = d.Queued() > d.Cap()/2
		}
		if !to.udpFair.allow(s, congested) {
			h.dropUnfair.Add(1)
			return
		}
		// A full write queue holds the reader back (boundedly) rather
		// than dropping: frames then wait in the socket's receive buffer,
		// as they would at a router whose output is busy. Dropping here
		// cost a relayed TCP stream ~270 retransmits in 5 s (make bench).
		if !h.udp.WriteWait(*a, buf) {
			h.dropQueue.Add(1)
			return
		}
		to.udpFair.add(s, len(buf))
		h.udpFrames.Add(1)
	} else {
		// len of a channel reads its count without its lock.
		q := to.queue()
		if !to.fair.allow(s, len(q) > cap(q)/2) {
			h.dropUnfair.Add(1)
			return
		}
		if !owned {
			buf = append([]byte(nil), buf...)
		}
		select {
		case q <- buf:
		default:
			h.dropQueue.Add(1)
			return
		}
		to.fair.add(s, len(buf))
	}
	h.frames.Add(1)
	h.bytes.Add(uint64(len(buf)))
}

// Stats returns the hub's counters and per-route byte counts.
func (h *Hub) Stats() Stats {
	s := h.Counters()
	h.routes.Range(func(_, v any) bool {
		r := v.(*route)
		rs := RouteStats{ID: r.id, A: r.a.Name, B: r.b.Name,
			BytesAToB: r.ab.Load(), BytesBToA: r.ba.Load(), PacketsAToB: r.pab.Load(), PacketsBToA: r.pba.Load()}
		rs.RelayedTotal = rs.BytesAToB + rs.BytesBToA
		s.Sessions = append(s.Sessions, rs)
		return true
	})
	return s
}

// Counters is Stats without the per-session part: cheap, for metrics.
func (h *Hub) Counters() Stats {
	return Stats{
		Frames: h.frames.Load(), Bytes: h.bytes.Load(), UDPFrames: h.udpFrames.Load(),
		DropUnknown: h.dropUnknown.Load(), DropNotEndpoint: h.dropNotEndpoint.Load(),
		DropQueueFull: h.dropQueue.Load(), DropUnfair: h.dropUnfair.Load(), DropMalformed: h.dropMalformed.Load(),
		DropSendFailed: h.dropSend.Load(), ChecksAnswered: h.checksOK.Load(), ChecksRefused: h.checksRefused.Load(),
		Routes: int(h.nroute.Load()),
	}
}
