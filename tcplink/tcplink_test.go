package tcplink

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"io"
	"math/big"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// listen starts a Mux on loopback with cfg.
func listen(t *testing.T, cfg MuxConfig) *Mux {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := Listen(ln, cfg)
	t.Cleanup(func() { m.Close() })
	return m
}

func dial(t *testing.T, m *Mux) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", m.ListenAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// readPacket reads one packet from pc with a deadline.
func readPacket(t *testing.T, pc net.PacketConn, d time.Duration) ([]byte, net.Addr) {
	t.Helper()
	pc.SetReadDeadline(time.Now().Add(d))
	defer pc.SetReadDeadline(time.Time{})
	buf := make([]byte, MaxPacket)
	n, from, err := pc.ReadFrom(buf)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return buf[:n], from
}

// waitFor polls cond every 10 ms for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: not after %v", what, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Packets keep their boundaries both ways, each stream has its own
// address, and what the Mux writes to an address reaches only that stream.
func TestMuxDemultiplexesStreams(t *testing.T) {
	m := listen(t, MuxConfig{})
	a, b := NewConn(dial(t, m)), NewConn(dial(t, m))
	defer a.Close()
	defer b.Close()
	sizes := []int{1, 100, 1452, MaxPacket}
	for _, n := range sizes {
		if _, err := a.WriteTo(bytes.Repeat([]byte{'a'}, n), nil); err != nil {
			t.Fatal(err)
		}
	}
	b.WriteTo([]byte("from b"), nil)
	var fromA, fromB net.Addr
	got := map[string]int{}
	for range len(sizes) + 1 {
		p, from := readPacket(t, m, 2*time.Second)
		switch p[0] {
		case 'a':
			if fromA != nil && fromA.String() != from.String() {
				t.Fatalf("a's packets from two addresses: %v, %v", fromA, from)
			}
			fromA = from
			got["a"]++
			if len(p) != sizes[got["a"]-1] {
				t.Fatalf("a's packet %d: %d bytes, want %d", got["a"], len(p), sizes[got["a"]-1])
			}
		default:
			fromB = from
			if string(p) != "from b" {
				t.Fatalf("b's packet %q", p)
			}
		}
	}
	if fromA == nil || fromB == nil || fromA.String() == fromB.String() {
		t.Fatalf("addresses: a %v, b %v; want two distinct", fromA, fromB)
	}
	if fromA.(Addr).TCP().Addr() != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("a's TCP address %v", fromA.(Addr).TCP())
	}
	m.WriteTo([]byte("to b"), fromB)
	m.WriteTo([]byte("to a"), fromA)
	if p, _ := readPacket(t, b, 2*time.Second); string(p) != "to b" {
		t.Fatalf("b read %q", p)
	}
	if p, _ := readPacket(t, a, 2*time.Second); string(p) != "to a" {
		t.Fatalf("a read %q", p)
	}
	if _, err := a.WriteTo(make([]byte, MaxPacket+1), nil); err == nil {
		t.Fatal("a packet above MaxPacket was taken")
	}
	if s := m.Stats(); s.PacketsIn != uint64(len(sizes)+1) || s.PacketsOut != 2 {
		t.Fatalf("mux stats %+v", s)
	}
}

// A frame length of 0 or above MaxPacket closes the stream and is counted;
// the other streams carry on.
func TestMuxClosesStreamOnBadFrame(t *testing.T) {
	for _, n := range []uint16{0, MaxPacket + 1, 0xffff} {
		m := listen(t, MuxConfig{})
		good := NewConn(dial(t, m))
		defer good.Close()
		bad := dial(t, m)
		var hdr [2]byte
		binary.BigEndian.PutUint16(hdr[:], n)
		bad.Write(hdr[:])
		bad.Write(make([]byte, 100))
		bad.SetReadDeadline(time.Now().Add(2 * time.Second))
		// The mux closes with the rest of the bad frame unread, so the
		// kernel may answer with a reset instead of a FIN: both mean closed.
		if _, err := bad.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("length %d: the stream was not closed: %v", n, err)
		}
		if s := m.Stats(); s.BadFrames != 1 || s.PacketsIn != 0 {
			t.Fatalf("length %d: stats %+v", n, s)
		}
		good.WriteTo([]byte("still here"), nil)
		if p, _ := readPacket(t, m, 2*time.Second); string(p) != "still here" {
			t.Fatalf("read %q", p)
		}
	}
}

// Streams that are not admitted are bounded per source and in time: a
// stranger that never finishes TLS, or never authenticates, loses the
// connection; admitted streams stay and free their slot.
func TestMuxBoundsPendingStreams(t *testing.T) {
	var mu sync.Mutex
	refused := map[Refusal]int{}
	onRefuse := func(r Refusal, _ netip.AddrPort) { mu.Lock(); refused[r]++; mu.Unlock() }
	count := func(r Refusal) int { mu.Lock(); defer mu.Unlock(); return refused[r] }

	t.Run("tls never finished", func(t *testing.T) {
		// The timeout leaves c3 time to arrive while c1 and c2 still hold
		// their slots, on a loaded machine too.
		m := listen(t, MuxConfig{TLS: serverTLS(t), HandshakeTimeout: time.Second, MaxPendingPerSource: 2, OnRefuse: onRefuse})
		c1, c2 := dial(t, m), dial(t, m)
		waitFor(t, 2*time.Second, "two pending", func() bool { return m.Pending() == 2 })
		c3 := dial(t, m)
		c3.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c3.Read(make([]byte, 1)); err == nil {
			t.Fatal("a third connection from one source was served")
		}
		if count(RefusedPerSource) != 1 {
			t.Fatalf("per-source refusals %d, want 1", count(RefusedPerSource))
		}
		for _, c := range []net.Conn{c1, c2} {
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("a connection without TLS was kept past the handshake timeout: %v", err)
			}
		}
		waitFor(t, 2*time.Second, "slots back", func() bool { return m.Pending() == 0 })
		// The refusal is reported just after the slot is given back.
		waitFor(t, 2*time.Second, "two handshake refusals", func() bool { return count(RefusedHandshake) == 2 })
	})
	t.Run("never admitted", func(t *testing.T) {
		m := listen(t, MuxConfig{AdmitTimeout: 300 * time.Millisecond, OnRefuse: onRefuse})
		late, ok := NewConn(dial(t, m)), NewConn(dial(t, m))
		defer late.Close()
		defer ok.Close()
		ok.WriteTo([]byte("x"), nil)
		_, from := readPacket(t, m, 2*time.Second)
		m.Admitted(from)
		select {
		case <-late.Done():
		case <-time.After(3 * time.Second):
			t.Fatal("a stream never admitted was kept past AdmitTimeout")
		}
		if count(RefusedNotAdmitted) != 1 {
			t.Fatalf("not-admitted refusals %d", count(RefusedNotAdmitted))
		}
		select {
		case <-ok.Done():
			t.Fatal("the admitted stream was closed")
		case <-time.After(300 * time.Millisecond):
		}
		if m.Pending() != 0 || m.Streams() != 1 {
			t.Fatalf("pending %d, streams %d; want 0, 1", m.Pending(), m.Streams())
		}
	})
}

// A peer that never reads cannot make the gateway's side hold more than
// the queue: the Mux's WriteTo never blocks, drops beyond the bound and
// counts them. A node's Conn waits for room instead (its transport has one
// connection), but only until writeTimeout passes with nothing taken:
// then the stream is closed and counted, and the wait ends.
func TestWriteQueueBounded(t *testing.T) {
	old := writeTimeout
	t.Cleanup(func() { writeTimeout = old }) // after the Mux's cleanup
	writeTimeout = 500 * time.Millisecond
	pkt := make([]byte, 1400)
	const n = 20000 // 28 MB: far beyond the socket buffers and the queue

	m := listen(t, MuxConfig{})
	raw := dial(t, m) // a node that sends one frame and never reads
	var hdr [2]byte
	binary.BigEndian.PutUint16(hdr[:], 1)
	raw.Write(append(hdr[:], 'x'))
	_, from := readPacket(t, m, 2*time.Second)
	// Write until the stream is closed for not reading (the socket
	// buffers take megabytes first), for 10 s at most.
	var sent int
	var slowest time.Duration
	deadline := time.Now().Add(10 * time.Second)
	for closed := false; !closed && time.Now().Before(deadline); {
		select {
		case <-m.Done(from):
			closed = true
			continue
		default:
		}
		t0 := time.Now()
		m.WriteTo(pkt, from)
		slowest = max(slowest, time.Since(t0))
		sent++
	}
	select {
	case <-m.Done(from):
	default:
		t.Fatalf("the stream of a peer that does not read was kept (%d packets written)", sent)
	}
	if slowest > 200*time.Millisecond {
		t.Fatalf("Mux.WriteTo blocked for %v", slowest)
	}
	s := m.Stats()
	if s.DropQueueFull == 0 || uint64(sent)-s.DropQueueFull-s.PacketsOut > queueLen+1 {
		t.Fatalf("mux stats %+v after %d packets: want drops, and at most the queue (%d) and the one being written unaccounted", s, sent, queueLen)
	}
	if s := m.Stats(); s.WriteTimeouts != 1 {
		t.Fatalf("write timeouts %d, want 1", s.WriteTimeouts)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); accepted <- c }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer := <-accepted // never read
	defer peer.Close()
	k := NewConn(c)
	start := time.Now()
	var werr error
	for i := 0; i < n && werr == nil; i++ {
		_, werr = k.WriteTo(pkt, nil)
	}
	if !errors.Is(werr, net.ErrClosed) {
		t.Fatalf("Conn.WriteTo to a peer that does not read: %v, want the stream closed", werr)
	}
	if el := time.Since(start); el > 8*time.Second {
		t.Fatalf("Conn.WriteTo waited %v, far past the write timeout", el)
	}
	if s := k.Stats(); s.DropQueueFull != 0 || s.WriteTimeouts != 1 {
		t.Fatalf("conn stats %+v: want no drops, one write timeout", s)
	}
	done := make(chan struct{})
	go func() { k.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Close hung on a peer that does not read")
	}
}

// Close writes what was queued first (a CONNECTION_CLOSE must reach the
// other end), and ends the other side's reads: CloseAddr ends a node's
// ReadFrom, a node's Close ends its stream at the Mux.
func TestCloseBothWays(t *testing.T) {
	m := listen(t, MuxConfig{})
	k := NewConn(dial(t, m))
	k.WriteTo([]byte("hello"), nil)
	_, from := readPacket(t, m, 2*time.Second)
	for i := range 100 {
		k.WriteTo([]byte{byte(i)}, nil)
	}
	k.Close()
	for i := range 100 {
		if p, _ := readPacket(t, m, 2*time.Second); p[0] != byte(i) {
			t.Fatalf("packet %d: got %d", i, p[0])
		}
	}
	select {
	case <-m.Done(from):
	case <-time.After(2 * time.Second):
		t.Fatal("the node's Close did not end its stream at the Mux")
	}
	waitFor(t, 2*time.Second, "no streams left", func() bool { return m.Streams() == 0 })

	k2 := NewConn(dial(t, m))
	k2.WriteTo([]byte("hi"), nil)
	_, from2 := readPacket(t, m, 2*time.Second)
	m.WriteTo([]byte("bye"), from2)
	m.CloseAddr(from2)
	if p, _ := readPacket(t, k2, 2*time.Second); string(p) != "bye" {
		t.Fatalf("read %q before the close", p)
	}
	k2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, _, err := k2.ReadFrom(make([]byte, MaxPacket)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom after CloseAddr: %v", err)
	}
	k2.Close()
	m.WriteTo([]byte("late"), from2) // to a stream that is gone: dropped
	if s := m.Stats(); s.DropNoStream != 1 {
		t.Fatalf("stats %+v", s)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := m.ReadFrom(make([]byte, 10)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Mux ReadFrom after Close: %v", err)
	}
}

// quic-go runs over the framing as over UDP: a node dials the Mux through
// TLS, the QUIC handshake completes, a stream echoes, and datagrams pass.
func TestQUICOverTLSStream(t *testing.T) {
	stls := serverTLS(t)
	m := listen(t, MuxConfig{TLS: stls})
	str := &quic.Transport{Conn: m}
	defer str.Close()
	qconf := &quic.Config{EnableDatagrams: true, InitialPacketSize: 1452, DisablePathMTUDiscovery: true, HandshakeIdleTimeout: 5 * time.Second}
	sq := stls.Clone()
	sq.NextProtos = []string{"test-quic"}
	ln, err := str.Listen(sq, qconf)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		qc, err := ln.Accept(context.Background())
		if err != nil {
			return
		}
		m.Admitted(qc.RemoteAddr())
		st, err := qc.AcceptStream(context.Background())
		if err != nil {
			return
		}
		io.Copy(st, st)
		st.Close()
	}()

	raw := dial(t, m)
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"test-tcp"}})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	k := NewConn(tc)
	ctr := &quic.Transport{Conn: k}
	defer ctr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := ctr.Dial(ctx, k.RemoteAddr(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"test-quic"}}, qconf)
	if err != nil {
		t.Fatal(err)
	}
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("nlvpn "), 100000) // 600 KB: many packets, flow control
	go func() { st.Write(msg); st.Close() }()
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(st)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %d of %d bytes, %v", len(got), len(msg), err)
	}
	qc.CloseWithError(0, "done")
	if m.Pending() != 0 {
		t.Fatalf("admitted stream still pending: %d", m.Pending())
	}
}

// serverTLS is a self-signed TLS 1.3 server config.
func serverTLS(t *testing.T) *tls.Config {
	t.Helper()
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: priv}},
		NextProtos: []string{"test-tcp"}}
}

// FuzzReadFrame feeds arbitrary streams to the frame reader: it never
// panics, never returns a packet outside 1..MaxPacket, and what it reads
// frames back to exactly the bytes it consumed.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{0, 3, 'a', 'b', 'c', 0, 1, 'x'})
	f.Add([]byte{0xff, 0xff, 1, 2, 3})
	f.Add([]byte{0, 0})
	f.Add([]byte{0x08, 0x00})
	f.Add([]byte{0x08, 0x01, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		buf := make([]byte, MaxPacket)
		var again bytes.Buffer
		for range len(data) + 1 {
			n, err := readFrame(r, buf)
			if err != nil {
				switch {
				case errors.Is(err, ErrFrame):
					l := int(binary.BigEndian.Uint16(data[again.Len():]))
					if l != 0 && l <= MaxPacket {
						t.Fatalf("length %d refused", l)
					}
				case errors.Is(err, io.EOF):
					if again.Len() != len(data) {
						t.Fatalf("EOF with %d of %d bytes consumed", again.Len(), len(data))
					}
				case errors.Is(err, io.ErrUnexpectedEOF):
				default:
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if n < 1 || n > MaxPacket {
				t.Fatalf("packet of %d bytes", n)
			}
			fb := newFrame(buf[:n])
			again.Write(fb.bytes())
			fb.free()
			if !bytes.Equal(again.Bytes(), data[:again.Len()]) {
				t.Fatal("frames read do not re-frame to the input")
			}
		}
		t.Fatal("more frames than bytes")
	})
}
