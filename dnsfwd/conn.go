package dnsfwd

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"
)

// tcpIdle is how long a TCP connection may wait for its next query (RFC
// 7766 suggests seconds), and how long writing one answer may take.
const tcpIdle = 10 * time.Second

// ServeUDP answers the queries received on pc until reading from it fails
// (a closed pc returns nil). Each query is answered on its own goroutine,
// MaxInflight at most; the sender's address is the client for
// MaxInflightPerClient.
func (f *Forwarder) ServeUDP(pc net.PacketConn) error {
	buf := make([]byte, maxQuery+1)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "closed") { // gonet's endpoint-closed errors
				return nil
			}
			return err
		}
		client := addrOf(from)
		if !f.acquire(client) {
			continue
		}
		q := append([]byte(nil), buf[:n]...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer f.release(client)
			if resp := f.Answer(context.Background(), q, false); resp != nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}()
	}
}

// ServeTCP answers DNS over TCP on the connections ln accepts until
// accepting fails (a closed ln returns nil). See ServeStream.
func (f *Forwarder) ServeTCP(ln net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.ServeStream(c, addrOf(c.RemoteAddr()))
		}()
	}
}

// ServeStream answers the queries of one DNS-over-TCP connection of client
// (RFC 7766: length-prefixed, one after the other) and closes it when the
// peer does, after tcpIdle without a query, or on anything malformed.
func (f *Forwarder) ServeStream(c net.Conn, client netip.Addr) {
	defer c.Close()
	for range 1 << 16 { // bounded; a client reconnects for more
		_ = c.SetDeadline(time.Now().Add(tcpIdle))
		q, err := readFramed(c, maxQuery)
		if err != nil {
			if errors.Is(err, errBadLength) {
				f.malformed.Add(1)
			}
			return
		}
		if !f.acquire(client) {
			return // the client sees the connection close and may retry
		}
		resp := f.Answer(context.Background(), q, true)
		f.release(client)
		if resp == nil {
			return
		}
		_ = c.SetDeadline(time.Now().Add(tcpIdle))
		framed := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(resp)), uint16(len(resp)))
		if _, err := c.Write(append(framed, resp...)); err != nil {
			return
		}
	}
}

func addrOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap()
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// StreamConn returns one end of an in-memory connection whose other end is
// served as DNS over TCP for client (ServeStream): what the agent hands its
// egress for a client's TCP connection to its DNS address.
func (f *Forwarder) StreamConn(client netip.Addr) net.Conn {
	a, b := net.Pipe()
	go f.ServeStream(b, client)
	return a
}

// PacketConn returns an in-memory datagram connection for client's queries
// (the zero address: bounded in total only): each Write is one query, each
// Read returns one answer. It is what the agent hands its egress for a
// client's UDP flow to its DNS address.
func (f *Forwarder) PacketConn(client netip.Addr) net.Conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &packetConn{f: f, client: client, answers: make(chan []byte, 64), ctx: ctx, cancel: cancel, wake: make(chan struct{})}
}

type packetConn struct {
	f       *Forwarder
	client  netip.Addr
	answers chan []byte
	ctx     context.Context
	cancel  context.CancelFunc

	mu       sync.Mutex
	deadline time.Time
	wake     chan struct{} // closed and replaced when the deadline changes
}

var packetConnAddr = &net.UDPAddr{IP: net.IPv4(127, 0, 0, 53), Port: 53}

func (c *packetConn) Read(b []byte) (int, error) {
	for {
		c.mu.Lock()
		dl, wake := c.deadline, c.wake
		c.mu.Unlock()
		var timer *time.Timer
		var expired <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, &net.OpError{Op: "read", Net: "udp", Err: os.ErrDeadlineExceeded}
			}
			timer = time.NewTimer(d)
			expired = timer.C
		}
		var n int
		var err error
		done := true
		select {
		case a := <-c.answers:
			n = copy(b, a)
		case <-c.ctx.Done():
			err = net.ErrClosed
		case <-expired:
			done = false
		case <-wake:
			done = false
		}
		if timer != nil {
			timer.Stop()
		}
		if done {
			return n, err
		}
	}
}

func (c *packetConn) Write(b []byte) (int, error) {
	if c.ctx.Err() != nil {
		return 0, net.ErrClosed
	}
	if !c.f.acquire(c.client) {
		return len(b), nil // dropped (counted), like a full socket buffer
	}
	q := append([]byte(nil), b...)
	go func() {
		defer c.f.release(c.client)
		if resp := c.f.Answer(c.ctx, q, false); resp != nil {
			select {
			case c.answers <- resp:
			default: // reader not keeping up: drop, like a full socket buffer
				c.f.unread.Add(1)
			}
		}
	}()
	return len(b), nil
}

func (c *packetConn) Close() error { c.cancel(); return nil }

// MaxDatagram tells the egress how big a read buffer an answer needs.
func (c *packetConn) MaxDatagram() int { return udpPayload }

func (c *packetConn) LocalAddr() net.Addr  { return packetConnAddr }
func (c *packetConn) RemoteAddr() net.Addr { return packetConnAddr }

func (c *packetConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }
func (c *packetConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	close(c.wake)
	c.wake = make(chan struct{})
	c.mu.Unlock()
	return nil
}
func (c *packetConn) SetWriteDeadline(time.Time) error { return nil }
