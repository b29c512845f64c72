package tcplink

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Bounds of one stream.
const (
	// queueLen bounds the packets waiting to be written to one stream
	// (at most about 0.5 MiB); beyond it they are dropped and counted.
	queueLen = 256
	// closeLinger is how long a close waits for queued packets (a QUIC
	// CONNECTION_CLOSE) to be written.
	closeLinger = time.Second
	// deadlineEvery is how often the reader moves its idle deadline on:
	// not for every packet, it costs a timer update.
	deadlineEvery = time.Second
)

// writeTimeout: a peer that takes nothing from the stream for this long
// (it stopped reading, or the path is dead) loses the stream. A variable
// for the tests.
var writeTimeout = 10 * time.Second

// Addr names one stream: its TCP peer's address, and a number that tells
// apart streams from the same address over time, so that quic-go never
// takes a new stream for an old one's connection.
type Addr struct {
	id  uint64
	tcp netip.AddrPort
}

// Network is "tcp".
func (a Addr) Network() string { return "tcp" }

func (a Addr) String() string { return fmt.Sprintf("tcp/%s#%d", a.tcp, a.id) }

// TCP is the stream's TCP peer address, as this end sees it (a proxy's, if
// the stream came through one).
func (a Addr) TCP() netip.AddrPort { return a.tcp }

// addrPortOf is the address of a TCP endpoint, IPv4 unmapped.
func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	if ta, ok := a.(*net.TCPAddr); ok {
		ap = ta.AddrPort()
	} else if a != nil {
		ap, _ = netip.ParseAddrPort(a.String())
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Stats counts what a Conn or a Mux moved and dropped.
type Stats struct {
	PacketsIn, PacketsOut uint64
	// DropQueueFull counts packets not sent because their stream's write
	// queue was full; DropNoStream (Mux) packets to a stream that is gone.
	DropQueueFull, DropNoStream uint64
	// BadFrames counts streams closed for a frame length out of range;
	// WriteTimeouts streams closed because the peer took nothing for
	// writeTimeout.
	BadFrames, WriteTimeouts uint64
}

type counters struct {
	in, out, queueFull, noStream, badFrames, writeTimeouts atomic.Uint64
}

func (c *counters) stats() Stats {
	return Stats{PacketsIn: c.in.Load(), PacketsOut: c.out.Load(), DropQueueFull: c.queueFull.Load(),
		DropNoStream: c.noStream.Load(), BadFrames: c.badFrames.Load(), WriteTimeouts: c.writeTimeouts.Load()}
}

// errTooLong is a packet that does not fit a frame.
var errTooLong = errors.New("tcplink: packet longer than MaxPacket")

// stream is one framed connection: a reader that hands each packet on, and
// a writer that takes packets from a bounded queue.
type stream struct {
	c    net.Conn
	addr Addr
	cnt  *counters
	idle time.Duration // read deadline; 0: none

	q       chan *frameBuf
	closing chan struct{} // close asked: write what is queued, then stop
	done    chan struct{} // closed: the conn is closed
	wdone   chan struct{} // the writer has returned
	once    sync.Once
	cmu     sync.Mutex // serializes closing's close
	asked   bool
}

func newStream(c net.Conn, addr Addr, cnt *counters, idle time.Duration) *stream {
	return &stream{c: c, addr: addr, cnt: cnt, idle: idle, q: make(chan *frameBuf, queueLen),
		closing: make(chan struct{}), done: make(chan struct{}), wdone: make(chan struct{})}
}

// send queues pkt. With wait false it never blocks: a full queue drops
// it (counted) and reports no error; to QUIC that is loss, as on a full
// socket buffer. With wait true it waits for room, or for the stream to
// close (which the writer does once the peer has taken nothing for
// writeTimeout).
func (s *stream) send(pkt []byte, wait bool) error {
	if len(pkt) == 0 || len(pkt) > MaxPacket {
		return errTooLong
	}
	select {
	case <-s.done:
		return net.ErrClosed
	case <-s.closing:
		return net.ErrClosed
	default:
	}
	f := newFrame(pkt)
	select {
	case s.q <- f:
		return nil
	default:
	}
	if !wait {
		f.free()
		s.cnt.queueFull.Add(1)
		return nil
	}
	select {
	case s.q <- f:
		return nil
	case <-s.done:
	case <-s.closing:
	}
	f.free()
	return net.ErrClosed
}

// writeLoop writes queued frames, many per flush, until the stream
// closes, or after a close was asked, until the queue is empty.
func (s *stream) writeLoop() {
	defer close(s.wdone)
	bw := bufio.NewWriterSize(s.c, 32<<10)
	write := func(f *frameBuf) error {
		_, err := bw.Write(f.bytes())
		f.free()
		s.cnt.out.Add(1)
		return err
	}
	for {
		var f *frameBuf
		stopping := false
		select {
		case f = <-s.q:
		case <-s.closing:
			stopping = true
		case <-s.done:
			return
		}
		s.c.SetWriteDeadline(time.Now().Add(writeTimeout))
		var err error
		if f != nil {
			err = write(f)
		}
	more:
		for err == nil {
			select {
			case f = <-s.q:
				err = write(f)
			default:
				break more
			}
		}
		if err == nil {
			err = bw.Flush()
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				s.cnt.writeTimeouts.Add(1)
			}
			s.c.Close() // the reader sees it and finishes the close
			return
		}
		if stopping {
			return
		}
	}
}

// readLoop reads frames and hands each to deliver, which owns it and
// reports false to stop, until the stream fails; then it closes the stream.
func (s *stream) readLoop(deliver func(*frameBuf) bool) {
	defer s.close(false)
	br := bufio.NewReaderSize(s.c, 16<<10)
	var moved time.Time
	for {
		if s.idle > 0 {
			if now := time.Now(); now.Sub(moved) >= deadlineEvery {
				s.c.SetReadDeadline(now.Add(s.idle))
				moved = now
			}
		}
		f := framePool.Get().(*frameBuf)
		n, err := readFrame(br, f.b[:])
		if err != nil {
			f.free()
			if errors.Is(err, ErrFrame) {
				s.cnt.badFrames.Add(1)
			}
			return
		}
		f.n = n
		s.cnt.in.Add(1)
		if !deliver(f) {
			return
		}
	}
}

// close closes the stream; graceful first gives the writer closeLinger to
// write what is queued. Later calls do nothing.
func (s *stream) close(graceful bool) {
	if graceful {
		s.cmu.Lock()
		if !s.asked {
			s.asked = true
			close(s.closing)
		}
		s.cmu.Unlock()
		select {
		case <-s.wdone:
		case <-s.done:
		case <-time.After(closeLinger):
		}
	}
	s.once.Do(func() {
		close(s.done)
		s.c.Close()
	})
}

// inbox is where readers put the packets they read and ReadFrom takes
// them: a reader waits while it is full (the TCP stream then pushes back on
// its sender).
type inbox struct {
	ch       chan packet
	closed   chan struct{}
	once     sync.Once
	deadline atomic.Int64 // unix nanoseconds of the read deadline; 0: none
	wake     chan struct{}
}

type packet struct {
	f    *frameBuf
	from Addr
}

func newInbox(n int) *inbox {
	return &inbox{ch: make(chan packet, n), closed: make(chan struct{}), wake: make(chan struct{}, 1)}
}

// put hands p on; false if the inbox or the stream (gone) closed first.
func (b *inbox) put(p packet, gone <-chan struct{}) bool {
	select {
	case b.ch <- p:
		return true
	case <-b.closed:
	case <-gone:
	}
	p.f.free()
	return false
}

// read takes one packet into p. It fails once the inbox closes, or gone
// does, and at the read deadline.
func (b *inbox) read(p []byte, gone <-chan struct{}) (int, net.Addr, error) {
	for {
		var timeout <-chan time.Time
		var t *time.Timer
		if d := b.deadline.Load(); d != 0 {
			wait := time.Until(time.Unix(0, d))
			if wait <= 0 {
				return 0, nil, os.ErrDeadlineExceeded
			}
			t = time.NewTimer(wait)
			timeout = t.C
		}
		stop := func() {
			if t != nil {
				t.Stop()
			}
		}
		select {
		case pk := <-b.ch:
			stop()
			n := copy(p, pk.f.b[:pk.f.n])
			pk.f.free()
			return n, pk.from, nil
		case <-b.closed:
			stop()
			return 0, nil, net.ErrClosed
		case <-gone:
			stop()
			// What the stream delivered before it ended comes first.
			select {
			case pk := <-b.ch:
				n := copy(p, pk.f.b[:pk.f.n])
				pk.f.free()
				return n, pk.from, nil
			default:
			}
			return 0, nil, net.ErrClosed
		case <-timeout:
			return 0, nil, os.ErrDeadlineExceeded
		case <-b.wake:
			stop()
		}
	}
}

func (b *inbox) setDeadline(t time.Time) {
	if t.IsZero() {
		b.deadline.Store(0)
	} else {
		b.deadline.Store(t.UnixNano())
	}
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *inbox) close() { b.once.Do(func() { close(b.closed) }) }
