package session

import (
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

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

// Path sends a peer session's packets one way: through the relay or directly.
type Path interface {
	// Send transmits one QUIC packet of session id. It must not retain pkt.
	Send(id uint64, pkt []byte) error
}

// inQueueLen bounds packets waiting to be read by the QUIC stack.
const inQueueLen = 4096

type inbound struct {
	id  uint64
	pkt []byte
}

// Conn is the net.PacketConn under all of a node's peer sessions. Writes go
// to the session's current Path (the relay unless another is set); packets
// arriving by any path are handed in with Deliver.
type Conn struct {
	relay Path

	mu    sync.RWMutex
	paths map[uint64]Path

	in     chan inbound
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
	return &Conn{relay: relay, paths: make(map[uint64]Path), in: make(chan inbound, inQueueLen), closed: make(chan struct{}), dlCh: make(chan struct{})}
}

// SetPath makes p the path for session id; nil restores the relay.
func (c *Conn) SetPath(id uint64, p Path) {
	c.mu.Lock()
	if p == nil {
		delete(c.paths, id)
	} else {
		c.paths[id] = p
	}
	c.mu.Unlock()
}

// Deliver hands in a packet of session id that arrived on some path. It
// takes ownership of pkt and never blocks: when the QUIC stack is behind,
// the packet is dropped and counted, as a full socket buffer would.
func (c *Conn) Deliver(id uint64, pkt []byte) {
	select {
	case c.in <- inbound{id, pkt}:
	default:
		c.dropInFull.Add(1)
	}
}

// Drops returns packets dropped because the inbound queue was full, and
// writes the path refused.
func (c *Conn) Drops() (inFull, sendFailed uint64) {
	return c.dropInFull.Load(), c.dropSend.Load()
}

// ReadFrom implements net.PacketConn.
func (c *Conn) ReadFrom(p []byte) (int, net.Addr, error) {
	c.dmu.Lock()
	dl := c.dlCh
	c.dmu.Unlock()
	select {
	case m := <-c.in:
		return copy(p, m.pkt), Addr(m.id), nil
	case <-c.closed:
		return 0, nil, net.ErrClosed
	case <-dl:
		return 0, nil, os.ErrDeadlineExceeded
	}
}

// WriteTo implements net.PacketConn; addr must be an Addr.
func (c *Conn) WriteTo(p []byte, addr net.Addr) (int, error) {
	a, ok := addr.(Addr)
	if !ok {
		return 0, fmt.Errorf("session: cannot write to %T %v", addr, addr)
	}
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
	}
	c.mu.RLock()
	path := c.paths[uint64(a)]
	c.mu.RUnlock()
	if path == nil {
		path = c.relay
	}
	if err := path.Send(uint64(a), p); err != nil {
		// Like a UDP socket: a lost packet is QUIC's to recover, not an
		// error that should tear the connection down.
		c.dropSend.Add(1)
	}
	return len(p), nil
}

// Close implements net.PacketConn.
func (c *Conn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

// LocalAddr implements net.PacketConn.
func (c *Conn) LocalAddr() net.Addr { return Addr(0) }

// SetDeadline implements net.PacketConn (reads only; writes never block).
func (c *Conn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetWriteDeadline implements net.PacketConn; writes never block.
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
