// Package udpbatch reads and writes a UDP socket in batches: many datagrams
// per system call (recvmmsg/sendmmsg on Linux), trains of equal-size
// datagrams coalesced by the kernel (UDP GRO in, UDP GSO out), and no
// allocation per datagram. The node's port (underlay) and the gateway's
// relay both stand on it; the per-packet system call is most of what a
// UDP path costs, so this is where a path gets fast.
package udpbatch

import (
	"net"
	"net/netip"
	"sync/atomic"
)

// Message is one datagram, or, with Seg > 0, a train of datagrams of Seg
// bytes each (the last may be shorter) that the kernel moves as one.
type Message struct {
	// Buf is the payload to write, or the buffer to read into (len(Buf) is
	// what a read may fill; with GRO on, give it MaxTrain bytes).
	Buf []byte
	// N is how many bytes a read filled.
	N int
	// Addr is the destination of a write, the source of a read.
	Addr netip.AddrPort
	// Seg is the datagram size of a train: set by a read that received one
	// (GRO), or by the writer that wants one sent (GSO). 0: one datagram.
	Seg int
}

// Datagrams calls f with each datagram of a received message, in order.
func (m *Message) Datagrams(f func(b []byte)) {
	b := m.Buf[:m.N]
	if m.Seg <= 0 || m.Seg >= len(b) {
		f(b)
		return
	}
	for len(b) > 0 {
		n := min(m.Seg, len(b))
		f(b[:n])
		b = b[n:]
	}
}

// Limits of one GSO train, from the kernel: at most 64 segments in at most
// 64 KiB of UDP payload.
const (
	MaxSegments = 64
	MaxTrain    = 65535 - 8 - 40 // the largest UDP payload over IPv6 (and IPv4)
)

// Conn is a UDP socket with batched reads and writes. One goroutine may
// read and one may write at a time.
type Conn struct {
	uc  *net.UDPConn
	sys sysConn

	gso atomic.Bool // UDP GSO usable on writes (turned off by the first refusal)
	gro bool        // the socket delivers GRO trains

	readCalls, readDatagrams   atomic.Uint64
	writeCalls, writeDatagrams atomic.Uint64
	writeErrors                atomic.Uint64
}

// New wraps uc for batches of up to maxBatch messages, turning UDP GRO on
// where the kernel has it.
func New(uc *net.UDPConn, maxBatch int) (*Conn, error) {
	c := &Conn{uc: uc}
	if err := c.sys.init(uc, maxBatch); err != nil {
		return nil, err
	}
	c.gro = c.sys.enableGRO()
	c.gso.Store(c.sys.hasGSO())
	return c, nil
}

// UDPConn is the socket underneath.
func (c *Conn) UDPConn() *net.UDPConn { return c.uc }

// GRO reports whether reads may return trains (Seg > 0): read buffers
// should then hold MaxTrain bytes.
func (c *Conn) GRO() bool { return c.gro }

// GSO reports whether writes send trains in one go; without it a train is
// written as separate datagrams, still in one system call where possible.
func (c *Conn) GSO() bool { return c.gso.Load() }

// ReadBatch blocks until at least one datagram arrives and fills ms[:n]
// (N, Addr, Seg). Datagrams that were truncated are dropped here.
func (c *Conn) ReadBatch(ms []Message) (int, error) {
	n, err := c.sys.readBatch(c, ms)
	if n > 0 {
		c.readCalls.Add(1)
		var d uint64
		for i := range ms[:n] {
			if s := ms[i].Seg; s > 0 && ms[i].N > s {
				d += uint64((ms[i].N + s - 1) / s)
			} else {
				d++
			}
		}
		c.readDatagrams.Add(d)
	}
	return n, err
}

// WriteBatch sends every message of ms (a message with Seg > 0 as a train)
// and returns how many datagrams it could not send (a refused destination,
// an unreachable network) along with the last such error. It never blocks
// longer than the socket's send buffer takes to drain.
func (c *Conn) WriteBatch(ms []Message) (failed int, err error) {
	return c.sys.writeBatch(c, ms)
}

// Stats counts system calls and datagrams each way: datagrams per call is
// what batching buys.
type Stats struct {
	ReadCalls, ReadDatagrams   uint64
	WriteCalls, WriteDatagrams uint64
	WriteErrors                uint64
}

// Stats returns the counters.
func (c *Conn) Stats() Stats {
	return Stats{c.readCalls.Load(), c.readDatagrams.Load(), c.writeCalls.Load(), c.writeDatagrams.Load(), c.writeErrors.Load()}
}
