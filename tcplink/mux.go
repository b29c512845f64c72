package tcplink

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/cowmap"
)

// Defaults of MuxConfig's bounds.
const (
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultAdmitTimeout     = 20 * time.Second
	DefaultIdleTimeout      = 60 * time.Second
	DefaultMaxPending       = 1024
	DefaultMaxPendingPerSrc = 16
)

// MuxConfig configures a Mux. Zero values take the defaults.
type MuxConfig struct {
	// TLS is the server's TLS configuration; nil serves plain framed TCP
	// (tests).
	TLS *tls.Config
	// HandshakeTimeout bounds the TLS handshake from accept: a stranger
	// that opens connections and never finishes it holds them no longer.
	HandshakeTimeout time.Duration
	// AdmitTimeout bounds how long a stream may go, from accept, before
	// the Mux's user calls Admitted for it (its node authenticated).
	AdmitTimeout time.Duration
	// IdleTimeout closes a stream that carries nothing for this long.
	IdleTimeout time.Duration
	// Streams not admitted yet, per source (an IPv4 address, an IPv6 /64)
	// and in total: beyond either, a new TCP connection is closed at once.
	MaxPendingPerSource, MaxPending int
	// OnRefuse, if set, is told of each stream turned away or closed
	// before its admission, and why.
	OnRefuse func(r Refusal, from netip.AddrPort)
}

// Refusal is why a Mux turned a stream away before its admission.
type Refusal int

const (
	RefusedPerSource   Refusal = iota // MaxPendingPerSource reached
	RefusedTotal                      // MaxPending reached
	RefusedHandshake                  // TLS handshake failed or timed out
	RefusedNotAdmitted                // not admitted within AdmitTimeout
)

// Mux is the gateway's end: every accepted stream behind one
// net.PacketConn for one quic.Transport. Each stream has an Addr of its
// own; what is written to that address goes to that stream.
type Mux struct {
	ln    net.Listener
	cfg   MuxConfig
	in    *inbox
	cnt   counters
	local Addr

	streams cowmap.Map[uint64, *muxStream]
	nextID  atomic.Uint64

	mu      sync.Mutex
	pending int
	bySrc   map[netip.Prefix]int
	closed  bool
	conns   map[net.Conn]struct{} // in their TLS handshake
	stopped chan struct{}
}

type muxStream struct {
	*stream
	src      netip.Prefix
	admitted bool // guarded by Mux.mu; also set once the pending slot is given back
	timer    *time.Timer
}

// muxInbox is how many packets from all streams may wait for the
// transport's reader.
const muxInbox = 1024

// Listen serves streams accepted from ln until Close.
func Listen(ln net.Listener, cfg MuxConfig) *Mux {
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.AdmitTimeout <= 0 {
		cfg.AdmitTimeout = DefaultAdmitTimeout
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.MaxPendingPerSource <= 0 {
		cfg.MaxPendingPerSource = DefaultMaxPendingPerSrc
	}
	m := &Mux{ln: ln, cfg: cfg, in: newInbox(muxInbox), local: Addr{tcp: addrPortOf(ln.Addr())},
		bySrc: make(map[netip.Prefix]int), conns: make(map[net.Conn]struct{}), stopped: make(chan struct{})}
	go m.accept()
	return m
}

// sourceOf is the unit MaxPendingPerSource counts.
func sourceOf(ap netip.AddrPort) netip.Prefix {
	ip := ap.Addr().Unmap().WithZone("")
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

func (m *Mux) refuse(r Refusal, from netip.AddrPort) {
	if m.cfg.OnRefuse != nil {
		m.cfg.OnRefuse(r, from)
	}
}

func (m *Mux) accept() {
	defer close(m.stopped)
	backoff := 5 * time.Millisecond
	for {
		c, err := m.ln.Accept()
		if err != nil {
			m.mu.Lock()
			closed := m.closed
			m.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait, boundedly.
			time.Sleep(backoff)
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		from := addrPortOf(c.RemoteAddr())
		src := sourceOf(from)
		m.mu.Lock()
		switch {
		case m.closed:
			m.mu.Unlock()
			c.Close()
			return
		// A refusal is counted before the stream is closed, so that whoever
		// sees the close also finds it counted.
		case m.pending >= m.cfg.MaxPending:
			m.mu.Unlock()
			m.refuse(RefusedTotal, from)
			c.Close()
			continue
		case m.bySrc[src] >= m.cfg.MaxPendingPerSource:
			m.mu.Unlock()
			m.refuse(RefusedPerSource, from)
			c.Close()
			continue
		}
		m.pending++
		m.bySrc[src]++
		m.conns[c] = struct{}{}
		m.mu.Unlock()
		go m.start(c, from, src)
	}
}

// release gives back a pending slot.
func (m *Mux) release(src netip.Prefix) {
	m.pending--
	if m.bySrc[src]--; m.bySrc[src] <= 0 {
		delete(m.bySrc, src)
	}
}

// start runs the TLS handshake of an accepted connection and then its
// stream.
func (m *Mux) start(c net.Conn, from netip.AddrPort, src netip.Prefix) {
	nc := c
	err := c.SetDeadline(time.Now().Add(m.cfg.HandshakeTimeout))
	if err == nil && m.cfg.TLS != nil {
		tc := tls.Server(c, m.cfg.TLS)
		ctx, cancel := context.WithTimeout(context.Background(), m.cfg.HandshakeTimeout)
		err = tc.HandshakeContext(ctx)
		cancel()
		nc = tc
	}
	if err == nil {
		err = c.SetDeadline(time.Time{})
	}
	m.mu.Lock()
	delete(m.conns, c)
	if err != nil || m.closed {
		m.release(src)
		m.mu.Unlock()
		c.Close()
		if err != nil {
			m.refuse(RefusedHandshake, from)
		}
		return
	}
	a := Addr{id: m.nextID.Add(1), tcp: from}
	ms := &muxStream{stream: newStream(nc, a, &m.cnt, m.cfg.IdleTimeout), src: src}
	ms.timer = time.AfterFunc(m.cfg.AdmitTimeout, func() {
		m.mu.Lock()
		late := !ms.admitted
		m.mu.Unlock()
		if late {
			m.refuse(RefusedNotAdmitted, from)
			ms.close(false)
		}
	})
	m.streams.Store(a.id, ms)
	m.mu.Unlock()
	go ms.writeLoop()
	ms.readLoop(func(f *frameBuf) bool { return m.in.put(packet{f: f, from: a}, ms.done) })
	// readLoop closed the stream.
	ms.timer.Stop()
	m.streams.CompareAndDelete(a.id, ms)
	m.mu.Lock()
	if !ms.admitted {
		ms.admitted = true
		m.release(src)
	}
	m.mu.Unlock()
}

func (m *Mux) lookup(a net.Addr) *muxStream {
	sa, ok := a.(Addr)
	if !ok {
		return nil
	}
	return m.streams.Load(sa.id)
}

// Admitted tells the Mux that the stream at a carries an authenticated
// node: it no longer counts against the pending limits or AdmitTimeout.
func (m *Mux) Admitted(a net.Addr) {
	ms := m.lookup(a)
	if ms == nil {
		return
	}
	m.mu.Lock()
	if !ms.admitted {
		ms.admitted = true
		m.release(ms.src)
		ms.timer.Stop()
	}
	m.mu.Unlock()
}

// CloseAddr closes the stream at a after writing what is queued for it
// (its QUIC connection ended).
func (m *Mux) CloseAddr(a net.Addr) {
	if ms := m.lookup(a); ms != nil {
		ms.close(true)
	}
}

// closedChan is a closed channel, for Done of a stream that is gone.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// Done is closed when the stream at a has ended (at once if there is no
// such stream).
func (m *Mux) Done(a net.Addr) <-chan struct{} {
	if ms := m.lookup(a); ms != nil {
		return ms.done
	}
	return closedChan
}

// Streams is the number of streams open now.
func (m *Mux) Streams() int { return len(m.streams.Snapshot()) }

// Pending is the number of streams not admitted yet, TLS handshakes
// included.
func (m *Mux) Pending() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pending
}

// ReadFrom implements net.PacketConn.
func (m *Mux) ReadFrom(p []byte) (int, net.Addr, error) { return m.in.read(p, nil) }

// WriteTo implements net.PacketConn: it queues p for the stream at addr;
// a packet for a stream that is gone, or whose queue is full, is dropped
// and counted.
func (m *Mux) WriteTo(p []byte, addr net.Addr) (int, error) {
	ms := m.lookup(addr)
	if ms == nil {
		m.cnt.noStream.Add(1)
		return len(p), nil
	}
	if err := ms.send(p, false); errors.Is(err, net.ErrClosed) {
		m.cnt.noStream.Add(1) // closing: as good as gone
	} else if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close stops accepting and closes every stream.
func (m *Mux) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for c := range m.conns {
		c.Close()
	}
	m.mu.Unlock()
	err := m.ln.Close()
	<-m.stopped
	for _, ms := range m.streams.Snapshot() {
		ms.close(false)
	}
	m.in.close()
	return err
}

// LocalAddr implements net.PacketConn.
func (m *Mux) LocalAddr() net.Addr { return m.local }

// ListenAddr is the TCP address the Mux accepts on.
func (m *Mux) ListenAddr() net.Addr { return m.ln.Addr() }

// SetDeadline sets the read deadline (writes never block).
func (m *Mux) SetDeadline(t time.Time) error { return m.SetReadDeadline(t) }

// SetReadDeadline implements net.PacketConn.
func (m *Mux) SetReadDeadline(t time.Time) error { m.in.setDeadline(t); return nil }

// SetWriteDeadline does nothing: writes never block.
func (m *Mux) SetWriteDeadline(time.Time) error { return nil }

// Stats reports the counters of all streams.
func (m *Mux) Stats() Stats { return m.cnt.stats() }

// SetReadBuffer and SetWriteBuffer are accepted and do nothing (quic-go
// asks for large socket buffers): the stream's queues are tcplink's own.
func (m *Mux) SetReadBuffer(int) error { return nil }

// SetWriteBuffer: see SetReadBuffer.
func (m *Mux) SetWriteBuffer(int) error { return nil }
