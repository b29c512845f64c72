package punch

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// Mux shares the node's one UDP socket between the gateway connection and
// the direct paths: quic-go hands it every packet that is not QUIC (our
// frame kinds keep the QUIC fixed bit clear), and it sends direct frames
// through the same transport, so the NAT mapping the gateway observed is
// the one peers punch towards.
type Mux struct {
	tr     *quic.Transport
	frames *net.UDPConn // the port's frame socket (platform.ListenUDPPair), or nil
	sconn  *session.Conn

	mu      sync.RWMutex
	punches map[uint64]*Punch

	outq chan outFrame // direct frames for the batch writer

	dropUnknown, dropMalformed, dropOut atomic.Uint64
	gsoWrites                           atomic.Uint64 // batched system calls
}

// NewMux returns a Mux delivering direct packets into sconn. With frames
// (the frame socket of the node's port, see platform.ListenUDPPair) it
// reads and writes frames there; without, it takes them from tr's
// non-QUIC packet queue and writes through tr.
func NewMux(tr *quic.Transport, frames *net.UDPConn, sconn *session.Conn) *Mux {
	return &Mux{tr: tr, frames: frames, sconn: sconn, punches: make(map[uint64]*Punch), outq: make(chan outFrame, outQueueLen)}
}

// Add registers a session's punch so its probes and direct packets are
// accepted. Remove undoes it.
func (m *Mux) Add(id uint64, p *Punch) {
	m.mu.Lock()
	m.punches[id] = p
	m.mu.Unlock()
}

// Remove unregisters a session.
func (m *Mux) Remove(id uint64, p *Punch) {
	m.mu.Lock()
	if m.punches[id] == p {
		delete(m.punches, id)
	}
	m.mu.Unlock()
}

// Send writes a raw frame to addr from the shared socket.
func (m *Mux) Send(b []byte, to netip.AddrPort) error {
	if m.frames != nil {
		_, err := m.frames.WriteToUDPAddrPort(b, to)
		return err
	}
	_, err := m.tr.WriteTo(b, net.UDPAddrFromAddrPort(to))
	return err
}

// Flush waits, at most d, until the direct frames queued so far are out.
func (m *Mux) Flush(d time.Duration) {
	deadline := time.Now().Add(d)
	for len(m.outq) > 0 && time.Now().Before(deadline) {
		time.Sleep(2 * time.Millisecond)
	}
}

// Drops counts frames for no known session and malformed ones.
func (m *Mux) Drops() (unknown, malformed uint64) {
	return m.dropUnknown.Load(), m.dropMalformed.Load()
}

// Run reads non-QUIC packets until ctx ends.
func (m *Mux) Run(ctx context.Context) {
	if m.frames != nil {
		wdone := make(chan struct{})
		go func() { m.runWriter(ctx); close(wdone) }()
		// Close the socket (ending the read below) once the writer has sent
		// what was queued.
		stop := context.AfterFunc(ctx, func() { <-wdone; m.frames.Close() })
		defer stop()
	}
	buf := make([]byte, 2048)
	for {
		var n int
		var from netip.AddrPort
		if m.frames != nil {
			var err error
			if n, from, err = m.frames.ReadFromUDPAddrPort(buf); err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				continue // a transient error (e.g. an ICMP-reported refusal)
			}
		} else {
			k, addr, err := m.tr.ReadNonQUICPacket(ctx, buf)
			if err != nil {
				return
			}
			ua, ok := addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			n, from = k, ua.AddrPort()
		}
		kind, id, payload, err := wire.ParseFrame(buf[:n])
		if err != nil {
			m.dropMalformed.Add(1)
			continue
		}
		m.mu.RLock()
		p := m.punches[id]
		m.mu.RUnlock()
		if p == nil {
			m.dropUnknown.Add(1)
			continue
		}
		switch kind {
		case wire.FrameProbe:
			p.Handle(buf[:wire.FrameHeaderLen], payload, from)
		case wire.FrameDirect:
			// QUIC authenticates the packet itself; any source may carry
			// it (the peer's NAT may have rebound), we reply on our path.
			m.sconn.Deliver(id, append([]byte(nil), payload...))
		default:
			m.dropMalformed.Add(1)
		}
	}
}

// Path is a confirmed direct path, as a session.Path.
type Path struct {
	Mux    *Mux
	Remote netip.AddrPort
}

// Send implements session.Path. With the port's own frame socket, packets
// are queued for the batch writer (which never blocks the session);
// otherwise they are written at once through quic-go's transport.
func (d *Path) Send(id uint64, pkt []byte) error {
	b := wire.NewFrame(wire.FrameDirect, id, pkt)
	m := d.Mux
	if m.frames == nil {
		return m.Send(b, d.Remote)
	}
	select {
	case m.outq <- outFrame{b, d.Remote}:
		return nil
	default:
		m.dropOut.Add(1)
		return errQueueFull
	}
}

var errQueueFull = errors.New("direct path queue full")

type outFrame struct {
	b  []byte
	to netip.AddrPort
}

// outQueueLen bounds direct frames waiting for the socket.
const outQueueLen = 2048

// maxBatch bounds the datagrams one GSO write carries (the kernel's limit
// is 64 segments and 64 KiB).
const maxBatch = 32

// runWriter writes queued direct frames. Consecutive frames to one address
// of one size go out in a single GSO system call: the per-packet system
// call is most of what a direct path costs.
func (m *Mux) runWriter(ctx context.Context) {
	gso := true
	batch := make([]outFrame, 0, maxBatch)
	buf := make([]byte, 0, 64<<10)
	for {
		select {
		case <-ctx.Done():
			// Last frames (a session's goodbye) still go out.
			for {
				select {
				case f := <-m.outq:
					m.frames.WriteToUDPAddrPort(f.b, f.to)
				default:
					return
				}
			}
		case f := <-m.outq:
			batch = append(batch[:0], f)
		}
	fill:
		for len(batch) < maxBatch {
			select {
			case f := <-m.outq:
				batch = append(batch, f)
			default:
				break fill
			}
		}
		for len(batch) > 0 {
			// A run: same address, same size (the last may be shorter).
			n, seg := 1, len(batch[0].b)
			for n < len(batch) && batch[n].to == batch[0].to && len(batch[n].b) <= seg && (n+1)*seg <= cap(buf) {
				short := len(batch[n].b) < seg
				n++
				if short {
					break
				}
			}
			sent := false
			if gso && n > 1 {
				buf = buf[:0]
				for _, f := range batch[:n] {
					buf = append(buf, f.b...)
				}
				err := sendSegments(m.frames, buf, seg, batch[0].to)
				if sent = err == nil; sent {
					m.gsoWrites.Add(1)
				} else if gsoUnsupported(err) {
					gso = false // the kernel or route cannot; one write per frame from now on
				}
			}
			if !sent {
				for _, f := range batch[:n] {
					m.frames.WriteToUDPAddrPort(f.b, f.to)
				}
			}
			batch = batch[n:]
		}
	}
}

// Fallback is the path a session takes while it has no direct path: the
// relay (nil: session.Conn's default), or, for a direct-only session, none.
func Fallback(mode string) session.Path {
	if mode == wire.ModeDirect {
		return Blackhole{}
	}
	return nil
}

// Blackhole is the path of a direct-only session before it has a direct
// path: nothing may go through the relay, so packets wait for QUIC to
// retransmit them once the direct path exists.
type Blackhole struct{}

// Send implements session.Path.
func (Blackhole) Send(uint64, []byte) error { return nil }
