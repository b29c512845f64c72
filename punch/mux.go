package punch

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

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

	dropUnknown, dropMalformed atomic.Uint64
}

// NewMux returns a Mux delivering direct packets into sconn. With frames
// (the frame socket of the node's port, see platform.ListenUDPPair) it
// reads and writes frames there; without, it takes them from tr's
// non-QUIC packet queue and writes through tr.
func NewMux(tr *quic.Transport, frames *net.UDPConn, sconn *session.Conn) *Mux {
	return &Mux{tr: tr, frames: frames, sconn: sconn, punches: make(map[uint64]*Punch)}
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

// Drops counts frames for no known session and malformed ones.
func (m *Mux) Drops() (unknown, malformed uint64) {
	return m.dropUnknown.Load(), m.dropMalformed.Load()
}

// Run reads non-QUIC packets until ctx ends.
func (m *Mux) Run(ctx context.Context) {
	if m.frames != nil {
		stop := context.AfterFunc(ctx, func() { m.frames.Close() })
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

// Send implements session.Path.
func (d *Path) Send(id uint64, pkt []byte) error {
	b := make([]byte, 0, wire.FrameHeaderLen+len(pkt))
	b = wire.AppendFrameHeader(b, wire.FrameDirect, id)
	b = append(b, pkt...)
	return d.Mux.Send(b, d.Remote)
}

// Blackhole is the path of a direct-only session before it has a direct
// path: nothing may go through the relay, so packets wait for QUIC to
// retransmit them once the direct path exists.
type Blackhole struct{}

// Send implements session.Path.
func (Blackhole) Send(uint64, []byte) error { return nil }
