package session

import (
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/cowmap"
	"github.com/nlvpn/nlvpn/wire"
)

// Addr is the remote address a peer session's QUIC stack sees: the session
// ID, not an IP address. Because QUIC never sees the real address, the path
// underneath (relay, or a direct UDP path later) can change without the
// session, or any TCP connection inside it, noticing.
type Addr uint64

// Network implements net.Addr.
func (Addr) Network() string { return "nlvpn-session" }

func (a Addr) String() string { return "session/" + wire.SessionID(uint64(a)) }

// IDOf returns the session ID of an address that a Conn handed out or
// was given.
func IDOf(a net.Addr) (uint64, bool) {
	switch a := a.(type) {
	case Addr:
		return uint64(a), true
	case *namedAddr:
		return a.id, true
	}
	return 0, false
}

// namedAddr is the address ReadFrom hands out: a session ID with its name
// made once. quic-go compares a server connection's address with each
// packet's by their String, and formatting them anew would be two
// allocations per packet.
type namedAddr struct {
	id   uint64
	name string
}

func (*namedAddr) Network() string  { return "nlvpn-session" }
func (a *namedAddr) String() string { return a.name }

// Path sends a peer session's packets one way: through the relay or directly.
type Path interface {
	// Send transmits one QUIC packet of session id. It must not retain pkt.
	// It may wait briefly for room, as a blocking socket write does, but
	// never for the network.
	Send(id uint64, pkt []byte) error
}

// Releaser is the owner of a received packet's memory: Release is called
// once the packet has been read, so the buffer can be reused.
type Releaser interface{ Release() }

// Inbound is one packet handed in by a path: Data belongs to Owner (nil:
// to nobody, the garbage collector frees it).
type Inbound struct {
	ID    uint64
	Data  []byte
	Owner Releaser
}

// inQueueLen bounds packets waiting to be read by the QUIC stack.
const inQueueLen = 4096

// Conn is the net.PacketConn under all of a node's peer sessions. Writes go
// to the session's current Path (the relay unless another is set); packets
// arriving by any path are handed in with Deliver or DeliverBatch.
//
// The hot path takes no shared lock per packet: WriteTo reads the path
// table through an atomic pointer (it changes only when a path does), and
// ReadFrom takes the whole inbound queue at once and then reads from its
// own copy.
type Conn struct {
	relay Path
	paths cowmap.Map[uint64, Path]

	mu      sync.Mutex // guards in, waiting
	in      []Inbound  // delivered, not yet taken by ReadFrom
	waiting bool       // ReadFrom sleeps on ready
	ready   chan struct{}
	local   []Inbound // taken by ReadFrom; only its goroutine touches it
	li      int       // next packet of local
	// addrs caches each session's address for ReadFrom (only its
	// goroutine touches it): a new one would be allocations per packet.
	addrs map[uint64]*namedAddr

	closed chan struct{}
	once   sync.Once

	dmu     sync.Mutex
	dlGen   uint64        // bumped by every SetReadDeadline
	dlCh    chan struct{} // closed when the read deadline passes
	dlTimer *time.Timer

	dropInFull, dropSend atomic.Uint64
}

// NewConn returns a Conn whose default path is relay.
func NewConn(relay Path) *Conn {
	c := &Conn{relay: relay, ready: make(chan struct{}, 1), closed: make(chan struct{}), dlCh: make(chan struct{}),
		in: make([]Inbound, 0, 256), local: make([]Inbound, 0, 256)}
	return c
}

// SetPath makes p the path for session id; nil restores the relay.
func (c *Conn) SetPath(id uint64, p Path) {
	if p == nil {
		c.paths.Delete(id)
	} else {
		c.paths.Store(id, p)
	}
}

// Deliver hands in one packet of session id that arrived on some path. It
// takes ownership of pkt and never blocks: when the QUIC stack is behind,
// the packet is dropped and counted, as a full socket buffer would.
func (c *Conn) Deliver(id uint64, pkt []byte) {
	c.DeliverBatch([]Inbound{{ID: id, Data: pkt}})
}

// DeliverBatch hands in packets that arrived on some path; each one's
// Owner is released once it has been read, or at once if it is dropped
// because the queue is full. It never blocks.
func (c *Conn) DeliverBatch(ps []Inbound) {
	c.mu.Lock()
	k := min(len(ps), inQueueLen-len(c.in))
	c.in = append(c.in, ps[:k]...)
	wake := c.waiting
	c.waiting = false
	c.mu.Unlock()
	if k < len(ps) {
		c.dropInFull.Add(uint64(len(ps) - k))
		for _, p := range ps[k:] {
			if p.Owner != nil {
				p.Owner.Release()
			}
		}
	}
	if wake {
		select {
		case c.ready <- struct{}{}:
		default:
		}
	}
}

// Drops returns packets dropped because the inbound queue was full, and
// writes the path refused.
func (c *Conn) Drops() (inFull, sendFailed uint64) {
	return c.dropInFull.Load(), c.dropSend.Load()
}

// ReadFrom implements net.PacketConn. One goroutine reads (quic-go's
// transport does): it takes every queued packet at once and hands them out
// one per call without further locking.
func (c *Conn) ReadFrom(p []byte) (int, net.Addr, error) {
	for c.li == len(c.local) {
		c.mu.Lock()
		if len(c.in) > 0 {
			// Swap the two halves: what was delivered becomes ours to read,
			// and our drained slice (references cleared) takes deliveries.
			clear(c.local)
			c.local, c.in, c.li = c.in, c.local[:0], 0
			c.mu.Unlock()
			break
		}
		c.waiting = true
		c.mu.Unlock()
		c.dmu.Lock()
		dl := c.dlCh
		c.dmu.Unlock()
		select {
		case <-c.ready:
		case <-c.closed:
			return 0, nil, net.ErrClosed
		case <-dl:
			return 0, nil, os.ErrDeadlineExceeded
		}
	}
	m := c.local[c.li]
	c.local[c.li] = Inbound{}
	c.li++
	n := copy(p, m.Data)
	if m.Owner != nil {
		m.Owner.Release()
	}
	return n, c.addr(m.ID), nil
}

// maxCachedAddrs bounds ReadFrom's cache of session addresses.
const maxCachedAddrs = 1024

func (c *Conn) addr(id uint64) *namedAddr {
	if a, ok := c.addrs[id]; ok {
		return a
	}
	if c.addrs == nil || len(c.addrs) >= maxCachedAddrs {
		c.addrs = make(map[uint64]*namedAddr)
	}
	a := &namedAddr{id: id, name: Addr(id).String()}
	c.addrs[id] = a
	return a
}

// WriteTo implements net.PacketConn; addr must be an Addr.
func (c *Conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	id, ok := IDOf(addr)
	if !ok {
		return 0, fmt.Errorf("session: cannot write to %T %v", addr, addr)
	}
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
	}
	path := c.paths.Load(id)
	if path == nil {
		path = c.relay
	}
	if err := path.Send(id, p); err != nil {
		// Like a UDP socket: a lost packet is QUIC's to recover, not an
		// error that should tear the connection down.
		c.dropSend.Add(1)
	}
	return len(p), nil
}

// Close implements net.PacketConn. Packets still queued are released.
func (c *Conn) Close() error {
	c.once.Do(func() {
		close(c.closed)
		c.mu.Lock()
		for _, p := range c.in {
			if p.Owner != nil {
				p.Owner.Release()
			}
		}
		c.in = c.in[:0]
		c.mu.Unlock()
	})
	return nil
}

// LocalAddr implements net.PacketConn.
func (c *Conn) LocalAddr() net.Addr { return Addr(0) }

// SetDeadline implements net.PacketConn (reads only).
func (c *Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetWriteDeadline implements net.PacketConn; writes wait at most briefly
// for room (Path), never for a deadline.
func (c *Conn) SetWriteDeadline(time.Time) error { return nil }

// SetReadDeadline implements net.PacketConn.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.dmu.Lock()
	defer c.dmu.Unlock()
	if c.dlTimer != nil {
		c.dlTimer.Stop()
		c.dlTimer = nil
	}
	// A passed deadline leaves dlCh closed; a new one needs a fresh channel.
	select {
	case <-c.dlCh:
		c.dlCh = make(chan struct{})
	default:
	}
	// A timer that already fired may still be waiting for the lock; the
	// generation tells it that its deadline is no longer the one in force.
	c.dlGen++
	if t.IsZero() {
		return nil
	}
	ch, gen := c.dlCh, c.dlGen
	if time.Until(t) <= 0 {
		close(ch)
		return nil
	}
	c.dlTimer = time.AfterFunc(time.Until(t), func() {
		c.dmu.Lock()
		defer c.dmu.Unlock()
		if c.dlGen == gen {
			close(ch)
		}
	})
	return nil
}

var _ net.PacketConn = (*Conn)(nil)
