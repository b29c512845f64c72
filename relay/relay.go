// Package relay carries a peer session's packets through the gateway when no
// direct path exists. A relay frame is a wire frame header (kind, session ID)
// and an opaque payload, the peer session's own QUIC packet, sent as a QUIC
// DATAGRAM on the node↔gateway connection. The gateway never sees more than
// that ciphertext: it matches the session ID to a route between two node
// connections and forwards the frame unchanged.
package relay

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/nlvpn/nlvpn/wire"
)

// DatagramSender is the part of a QUIC connection the relay needs.
type DatagramSender interface {
	SendDatagram([]byte) error
}

// Frame builds a relay frame around pkt.
func Frame(id uint64, pkt []byte) []byte { return wire.NewFrame(wire.FrameRelay, id, pkt) }

// QueueLen is how many frames may wait for one node's connection. Beyond it
// frames are dropped and counted: a slow receiver must not stall the reader
// of the connection the frame came from (quic-go's SendDatagram blocks when
// its own queue is full).
const QueueLen = 1024

// Stats are the hub's counters.
type Stats struct {
	Frames          uint64       `json:"frames"` // forwarded
	Bytes           uint64       `json:"bytes"`
	DropUnknown     uint64       `json:"drop_unknown_session"` // no route for the session ID
	DropNotEndpoint uint64       `json:"drop_not_endpoint"`    // sender is not an end of that route
	DropQueueFull   uint64       `json:"drop_queue_full"`
	DropMalformed   uint64       `json:"drop_malformed"`
	DropSendFailed  uint64       `json:"drop_send_failed"`
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

	mu     sync.RWMutex
	routes map[uint64]*route

	frames, bytes                                          atomic.Uint64
	dropUnknown, dropNotEndpoint, dropQueue, dropMalformed atomic.Uint64
	dropSend                                               atomic.Uint64
}

type route struct {
	id       uint64
	a, b     *Peer
	ab, ba   atomic.Uint64 // bytes
	pab, pba atomic.Uint64 // packets
}

// NewHub returns an empty hub.
func NewHub(log *slog.Logger) *Hub {
	if log == nil {
		log = slog.Default()
	}
	return &Hub{log: log, routes: make(map[uint64]*route)}
}

// Peer is one node connection as the hub sees it.
type Peer struct {
	Name string
	// OnGone, if set (before any Bind), is called with the ID of each of
	// this peer's routes removed because the other end closed, so the
	// gateway can tell this node at once instead of letting it find out
	// by silence.
	OnGone func(id uint64)
	hub    *Hub
	conn   DatagramSender
	out    chan []byte
	done   chan struct{}
	once   sync.Once
	closed bool // guarded by hub.mu
}

var errPeerClosed = errors.New("relay: peer closed")

// NewPeer registers a node connection and starts its sender. Close it when
// the connection ends; that also removes its routes.
func (h *Hub) NewPeer(name string, conn DatagramSender) *Peer {
	p := &Peer{Name: name, hub: h, conn: conn, out: make(chan []byte, QueueLen), done: make(chan struct{})}
	go p.send()
	return p
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
		for id, r := range h.routes {
			switch p {
			case r.a:
				survivors = append(survivors, gone{id, r.b})
			case r.b:
				survivors = append(survivors, gone{id, r.a})
			default:
				continue
			}
			delete(h.routes, id)
		}
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
		return errPeerClosed // its connection is gone; a route would dangle
	}
	if r, ok := h.routes[id]; ok && !(r.a == a && r.b == b) {
		return ErrInUse
	}
	h.routes[id] = &route{id: id, a: a, b: b}
	return nil
}

// Unbind removes a route.
func (h *Hub) Unbind(id uint64) {
	h.mu.Lock()
	delete(h.routes, id)
	h.mu.Unlock()
}

// Has reports whether a route exists.
func (h *Hub) Has(id uint64) bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	_, ok := h.routes[id]
	return ok
}

// Forward relays one frame received from a node's connection. It never
// blocks: a full queue drops the frame and counts it. The frame is passed
// on as is (same header), so buf must not be reused by the caller.
func (h *Hub) Forward(from *Peer, buf []byte) {
	kind, id, _, err := wire.ParseFrame(buf)
	if err != nil || kind != wire.FrameRelay {
		h.dropMalformed.Add(1)
		return
	}
	h.mu.RLock()
	r := h.routes[id]
	h.mu.RUnlock()
	if r == nil {
		h.dropUnknown.Add(1)
		return
	}
	var to *Peer
	switch from {
	case r.a:
		to = r.b
		r.ab.Add(uint64(len(buf)))
		r.pab.Add(1)
	case r.b:
		to = r.a
		r.ba.Add(uint64(len(buf)))
		r.pba.Add(1)
	default:
		h.dropNotEndpoint.Add(1)
		return
	}
	select {
	case to.out <- buf:
		h.frames.Add(1)
		h.bytes.Add(uint64(len(buf)))
	default:
		h.dropQueue.Add(1)
	}
}

// Stats returns the hub's counters and per-route byte counts.
func (h *Hub) Stats() Stats {
	s := Stats{
		Frames: h.frames.Load(), Bytes: h.bytes.Load(),
		DropUnknown: h.dropUnknown.Load(), DropNotEndpoint: h.dropNotEndpoint.Load(),
		DropQueueFull: h.dropQueue.Load(), DropMalformed: h.dropMalformed.Load(),
		DropSendFailed: h.dropSend.Load(),
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	s.Routes = len(h.routes)
	for _, r := range h.routes {
		rs := RouteStats{ID: r.id, A: r.a.Name, B: r.b.Name,
			BytesAToB: r.ab.Load(), BytesBToA: r.ba.Load(), PacketsAToB: r.pab.Load(), PacketsBToA: r.pba.Load()}
		rs.RelayedTotal = rs.BytesAToB + rs.BytesBToA
		s.Sessions = append(s.Sessions, rs)
	}
	return s
}
