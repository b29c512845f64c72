// Package tcplink carries a QUIC connection over a TCP stream (TLS in
// practice), for networks where UDP does not pass: each QUIC packet is one
// frame on the stream, and the stream is given to quic-go as a
// net.PacketConn. Conn is a node's end (one stream to the gateway); Mux is
// the gateway's (every accepted stream behind one PacketConn, each with an
// address of its own, so one quic.Transport serves them all with the same
// code as UDP).
//
// QUIC keeps its own loss recovery and congestion control on top; a packet
// that cannot be queued is dropped and counted, which QUIC takes for loss,
// so a stalled stream never blocks the transport's other connections.
package tcplink

import (
	"encoding/binary"
	"errors"
	"io"
	"sync"
)

// MaxPacket is the largest packet a frame may carry. The gateway
// connection's packets are at most wire.GatewayPacketSize (1452 bytes);
// anything longer on the stream is not ours, and the stream is closed.
const MaxPacket = 2048

// hdrLen is a frame's header: the packet's length, 2 bytes big-endian.
const hdrLen = 2

// ErrFrame is a frame whose length is 0 or above MaxPacket: the stream
// does not carry our framing (or was corrupted) and cannot be resynced.
var ErrFrame = errors.New("tcplink: frame length out of range")

// readFrame reads one frame from r into buf (at least MaxPacket long) and
// returns the packet's length. A stream that ends between frames returns
// io.EOF, one that ends inside a frame io.ErrUnexpectedEOF.
func readFrame(r io.Reader, buf []byte) (int, error) {
	var hdr [hdrLen]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, err
	}
	n := int(binary.BigEndian.Uint16(hdr[:]))
	if n == 0 || n > MaxPacket {
		return 0, ErrFrame
	}
	if _, err := io.ReadFull(r, buf[:n]); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	return n, nil
}

// frameBuf holds one frame: header and packet.
type frameBuf struct {
	b [hdrLen + MaxPacket]byte
	n int // bytes of b in use
}

var framePool = sync.Pool{New: func() any { return new(frameBuf) }}

// newFrame copies pkt (at most MaxPacket) into a pooled frame.
func newFrame(pkt []byte) *frameBuf {
	f := framePool.Get().(*frameBuf)
	binary.BigEndian.PutUint16(f.b[:], uint16(len(pkt)))
	f.n = hdrLen + copy(f.b[hdrLen:], pkt)
	return f
}

func (f *frameBuf) bytes() []byte { return f.b[:f.n] }

func (f *frameBuf) free() { framePool.Put(f) }
