package tcplink

import (
	"net"
	"time"
)

// Conn is a node's end: one stream to the gateway, as a net.PacketConn for
// a quic.Transport that dials only the gateway (at RemoteAddr). Packets
// are written to the stream whatever address they are for; every packet
// read comes from RemoteAddr. Once the stream ends, ReadFrom fails, which
// ends the transport and its connection at once.
type Conn struct {
	s      *stream
	in     *inbox
	cnt    counters
	local  Addr
	remote Addr
}

// connInbox is a few packets: the transport's reader takes them at once.
const connInbox = 64

// NewConn frames packets over c (a TLS connection to the gateway) and
// takes ownership of it.
func NewConn(c net.Conn) *Conn {
	k := &Conn{in: newInbox(connInbox), local: Addr{tcp: addrPortOf(c.LocalAddr())}, remote: Addr{tcp: addrPortOf(c.RemoteAddr())}}
	k.s = newStream(c, k.remote, &k.cnt, 0)
	go k.s.writeLoop()
	go k.s.readLoop(func(f *frameBuf) bool { return k.in.put(packet{f: f, from: k.remote}, k.s.done) })
	return k
}

// ReadFrom implements net.PacketConn.
func (k *Conn) ReadFrom(p []byte) (int, net.Addr, error) { return k.in.read(p, k.s.done) }

// WriteTo implements net.PacketConn: it queues p for the stream, waiting
// for room while the queue is full. The transport on a Conn sends for one
// connection only, so waiting holds up nothing else, and it lets the TCP
// stream's pace set QUIC's (dropping instead made QUIC halve its window
// again and again: 17,000 retransmits of the tunnelled TCP in 5 s of
// iperf3 upload, at 266 Mbit/s; see the bench's tcp column). A peer that
// takes nothing for writeTimeout ends the stream, and the wait.
func (k *Conn) WriteTo(p []byte, _ net.Addr) (int, error) {
	if err := k.s.send(p, true); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close writes what is queued (for at most a second) and closes the stream.
func (k *Conn) Close() error {
	k.s.close(true)
	k.in.close()
	return nil
}

// Done is closed when the stream has ended.
func (k *Conn) Done() <-chan struct{} { return k.s.done }

// LocalAddr implements net.PacketConn.
func (k *Conn) LocalAddr() net.Addr { return k.local }

// RemoteAddr is the gateway's end of the stream (the proxy's, through one).
func (k *Conn) RemoteAddr() net.Addr { return k.remote }

// SetDeadline sets the read deadline (writes never block).
func (k *Conn) SetDeadline(t time.Time) error { return k.SetReadDeadline(t) }

// SetReadDeadline implements net.PacketConn.
func (k *Conn) SetReadDeadline(t time.Time) error { k.in.setDeadline(t); return nil }

// SetWriteDeadline does nothing: writes never block.
func (k *Conn) SetWriteDeadline(time.Time) error { return nil }

// Stats reports the stream's counters.
func (k *Conn) Stats() Stats { return k.cnt.stats() }

// SetReadBuffer and SetWriteBuffer are accepted and do nothing (quic-go
// asks for large socket buffers): the stream's queues are tcplink's own.
func (k *Conn) SetReadBuffer(int) error { return nil }

// SetWriteBuffer: see SetReadBuffer.
func (k *Conn) SetWriteBuffer(int) error { return nil }
