package underlay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/udpbatch"
	"github.com/nlvpn/nlvpn/wire"
)

// Receive sizes: a read takes up to rxBatch messages (each a datagram or,
// with GRO, a train of them); rxBuffers bounds the receive buffers in use,
// those the reader holds and those whose packets wait in the sessions'
// queue. With GRO a buffer is 64 KiB, so that is at most 2 MiB, made as
// traffic needs them; when all are in use the reader waits and the
// kernel's socket buffer absorbs the burst, as it would for any slow
// reader.
const (
	rxBatch   = 8
	rxBuffers = 32
)

// rxBuf is one receive buffer. The reader holds one reference while it
// handles what was read into it, and every packet handed to a session
// holds another until the session has read it; the last Release returns
// the buffer to its pool. Packets are handed on, not copied.
type rxBuf struct {
	b    []byte
	refs atomic.Int32
	pool *rxPool
}

// Release implements session.Releaser.
func (r *rxBuf) Release() {
	if n := r.refs.Add(-1); n == 0 {
		r.pool.put(r)
	} else if n < 0 {
		panic("underlay: receive buffer released twice")
	}
}

// rxPool is a bounded pool of receive buffers of one size, made on demand.
type rxPool struct {
	size int
	free chan *rxBuf // buffers made and not in use; its capacity is the bound
	made atomic.Int32
}

func newRxPool(size, n int) *rxPool {
	return &rxPool{size: size, free: make(chan *rxBuf, n)}
}

// get takes a free buffer, makes one while fewer than the bound exist, or
// waits for one; it returns it holding one reference.
func (p *rxPool) get(ctx context.Context) *rxBuf {
	var r *rxBuf
	select {
	case r = <-p.free:
	default:
		if p.made.Load() < int32(cap(p.free)) {
			p.made.Add(1) // only the reader makes buffers
			r = &rxBuf{b: make([]byte, p.size), pool: p}
			break
		}
		select {
		case r = <-p.free:
		case <-ctx.Done():
			return nil
		}
	}
	r.refs.Store(1)
	return r
}

func (p *rxPool) put(r *rxBuf) { p.free <- r }

// readFrames reads the port's frames until the frame socket closes (or,
// without one, until ctx ends) and hands each to where it goes.
func (u *Underlay) readFrames(ctx context.Context) {
	if u.bio == nil {
		u.readFramesThroughQUIC(ctx)
		return
	}
	ms := make([]udpbatch.Message, rxBatch)
	bufs := make([]*rxBuf, rxBatch)
	defer func() {
		for _, b := range bufs {
			if b != nil {
				b.Release()
			}
		}
	}()
	out := make([]session.Inbound, 0, rxBatch*udpbatch.MaxSegments)
	for {
		for i := range ms {
			if bufs[i] == nil {
				if bufs[i] = u.rx.get(ctx); bufs[i] == nil {
					return
				}
			}
			ms[i] = udpbatch.Message{Buf: bufs[i].b}
		}
		n, err := u.bio.ReadBatch(ms)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue // a transient error (e.g. an ICMP-reported refusal)
		}
		out = out[:0]
		for i := range ms[:n] {
			rb := bufs[i]
			from := ms[i].Addr
			ms[i].Datagrams(func(b []byte) {
				if u.handleFrame(b, from, &out) {
					rb.refs.Add(1)
					out[len(out)-1].Owner = rb
				}
			})
			if rb.refs.Load() > 1 {
				// Packets of this buffer went to a session: it is theirs
				// until read, and the next read takes a fresh one.
				rb.Release()
				bufs[i] = nil
			}
		}
		if len(out) > 0 {
			u.Conn.DeliverBatch(out)
			clear(out)
		}
	}
}

// readFramesThroughQUIC is the reader where the kernel refused the frame
// socket's steering program: quic-go hands over every datagram that is
// not QUIC, one at a time, through a short queue.
func (u *Underlay) readFramesThroughQUIC(ctx context.Context) {
	buf := make([]byte, 2048)
	var out []session.Inbound
	for {
		n, addr, err := u.tr.ReadNonQUICPacket(ctx, buf)
		if err != nil {
			return
		}
		ua, ok := addr.(*net.UDPAddr)
		if !ok {
			continue
		}
		from := ua.AddrPort()
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		out = out[:0]
		if u.handleFrame(buf[:n], from, &out) {
			// buf is reused for the next read: the session gets a copy.
			out[0].Data = append([]byte(nil), out[0].Data...)
			u.Conn.DeliverBatch(out)
		}
	}
}

// handleFrame takes one datagram from the frame socket. A packet for a
// session is appended to out (true); probes and relay checks are answered
// here; the rest is dropped and counted.
func (u *Underlay) handleFrame(b []byte, from netip.AddrPort, out *[]session.Inbound) bool {
	kind, id, payload, err := wire.ParseFrame(b)
	if err != nil {
		if len(b) > 0 && b[0]&0x40 != 0 {
			u.c.misrouted.Add(1) // QUIC's, lost to it: QUIC retransmits
		} else {
			u.c.malformed.Add(1)
		}
		return false
	}
	switch kind {
	case wire.FrameRelay:
		// Only the gateway relays; anyone else naming a session is lying.
		if from != u.relay.gateway() {
			u.c.foreign.Add(1)
			return false
		}
		u.relay.in.Add(1)
		*out = append(*out, session.Inbound{ID: id, Data: payload})
		return true
	case wire.FrameRelayCheck:
		if from != u.relay.gateway() {
			u.c.foreign.Add(1)
			return false
		}
		u.relay.answered(id)
		return false
	}
	p := u.punches.Load(id)
	if p == nil {
		u.c.unknown.Add(1)
		return false
	}
	switch kind {
	case wire.FrameProbe:
		p.Handle(b[:wire.FrameHeaderLen], payload, from)
	case wire.FrameDirect:
		// QUIC authenticates the packet itself; any source may carry it
		// (the peer's NAT may have rebound), we reply on our path.
		*out = append(*out, session.Inbound{ID: id, Data: payload})
		return true
	default:
		u.c.malformed.Add(1)
	}
	return false
}

// addPunch registers a session's punch so its probes and direct frames
// are accepted; removePunch undoes it (only for that same punch).
func (u *Underlay) addPunch(id uint64, p *punch.Punch) { u.punches.Store(id, p) }

func (u *Underlay) removePunch(id uint64, p *punch.Punch) { u.punches.CompareAndDelete(id, p) }
