package netstack

// Tests of the link endpoint (GRO in, GSO out) against a real stack: a
// Proxy, whose stack owns lkLocal4/lkLocal6 and listens with gonet, talks to
// a hand-written TCP peer made of packets built and checked here, with our
// own checksum code (package packet), not the code under test.

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/packet"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

var (
	lkLocal4 = netip.MustParseAddr("100.64.7.1")
	lkLocal6 = netip.MustParseAddr("fd7a:115c:a1e0::7:1")
	lkPeer4  = netip.MustParseAddr("100.64.7.2")
	lkPeer4b = netip.MustParseAddr("100.64.7.3")
	lkPeer6  = netip.MustParseAddr("fd7a:115c:a1e0::7:2")
)

const (
	lkPort = 8080
	lkMSS  = 1300 // what the peer announces; fits egTestMTU for v4 and v6
)

// lkSeg is one TCP segment of the hand-written peer.
type lkSeg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    uint8
	win      uint16
	opts     []byte
	data     []byte
	ttl      uint8 // 0: 64
}

// lkBuild makes the IP packet of s with valid checksums.
func lkBuild(s lkSeg) []byte {
	thLen := header.TCPMinimumSize + len(s.opts)
	tcpLen := thLen + len(s.data)
	ttl := s.ttl
	if ttl == 0 {
		ttl = 64
	}
	var b []byte
	var tcp []byte
	var pseudo uint32
	if s.src.Addr().Is4() {
		b = make([]byte, header.IPv4MinimumSize+tcpLen)
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:4], uint16(len(b)))
		b[6] = 0x40
		b[8] = ttl
		b[9] = 6
		src, dst := s.src.Addr().As4(), s.dst.Addr().As4()
		copy(b[12:16], src[:])
		copy(b[16:20], dst[:])
		binary.BigEndian.PutUint16(b[10:12], ^packet.Sum(b[:20], 0))
		tcp = b[20:]
		for i := 0; i < 4; i += 2 {
			pseudo += uint32(src[i])<<8 | uint32(src[i+1])
			pseudo += uint32(dst[i])<<8 | uint32(dst[i+1])
		}
		pseudo += 6 + uint32(tcpLen)
	} else {
		b = make([]byte, header.IPv6MinimumSize+tcpLen)
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[4:6], uint16(tcpLen))
		b[6] = 6
		b[7] = ttl
		src, dst := s.src.Addr().As16(), s.dst.Addr().As16()
		copy(b[8:24], src[:])
		copy(b[24:40], dst[:])
		tcp = b[40:]
		pseudo = packet.PseudoSum6(s.src.Addr(), s.dst.Addr(), tcpLen, 6)
	}
	binary.BigEndian.PutUint16(tcp[0:2], s.src.Port())
	binary.BigEndian.PutUint16(tcp[2:4], s.dst.Port())
	binary.BigEndian.PutUint32(tcp[4:8], s.seq)
	binary.BigEndian.PutUint32(tcp[8:12], s.ack)
	tcp[12] = uint8(thLen/4) << 4
	tcp[13] = s.flags
	binary.BigEndian.PutUint16(tcp[14:16], s.win)
	copy(tcp[20:], s.opts)
	copy(tcp[thLen:], s.data)
	binary.BigEndian.PutUint16(tcp[16:18], ^packet.Sum(tcp, pseudo))
	return b
}

// lkParse checks one packet the stack emitted, as a receiver would: IP
// header (v4 checksum, lengths) and TCP (checksum over the pseudo-header).
func lkParse(b []byte) (lkSeg, error) {
	var s lkSeg
	var tcp []byte
	var pseudo uint32
	if len(b) < 1 {
		return s, errors.New("empty")
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 || b[0] != 0x45 {
			return s, fmt.Errorf("bad IPv4 header %x", b[:min(len(b), 20)])
		}
		if int(binary.BigEndian.Uint16(b[2:4])) != len(b) {
			return s, fmt.Errorf("IPv4 total length %d, packet %d", binary.BigEndian.Uint16(b[2:4]), len(b))
		}
		if packet.Sum(b[:20], 0) != 0xffff {
			return s, errors.New("bad IPv4 header checksum")
		}
		if b[9] != 6 {
			return s, fmt.Errorf("protocol %d", b[9])
		}
		src, dst := [4]byte(b[12:16]), [4]byte(b[16:20])
		s.src = netip.AddrPortFrom(netip.AddrFrom4(src), 0)
		s.dst = netip.AddrPortFrom(netip.AddrFrom4(dst), 0)
		tcp = b[20:]
		for i := 0; i < 4; i += 2 {
			pseudo += uint32(src[i])<<8 | uint32(src[i+1])
			pseudo += uint32(dst[i])<<8 | uint32(dst[i+1])
		}
		pseudo += 6 + uint32(len(tcp))
	case 6:
		if len(b) < 40 || b[6] != 6 {
			return s, errors.New("bad IPv6 header or not TCP")
		}
		if int(binary.BigEndian.Uint16(b[4:6]))+40 != len(b) {
			return s, fmt.Errorf("IPv6 payload length %d, packet %d", binary.BigEndian.Uint16(b[4:6]), len(b))
		}
		s.src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), 0)
		s.dst = netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[24:40])), 0)
		tcp = b[40:]
		pseudo = packet.PseudoSum6(s.src.Addr(), s.dst.Addr(), len(tcp), 6)
	default:
		return s, fmt.Errorf("IP version %d", b[0]>>4)
	}
	if len(tcp) < 20 || int(tcp[12]>>4)*4 < 20 || int(tcp[12]>>4)*4 > len(tcp) {
		return s, errors.New("bad TCP header")
	}
	if packet.Sum(tcp, pseudo) != 0xffff {
		return s, errors.New("bad TCP checksum")
	}
	s.src = netip.AddrPortFrom(s.src.Addr(), binary.BigEndian.Uint16(tcp[0:2]))
	s.dst = netip.AddrPortFrom(s.dst.Addr(), binary.BigEndian.Uint16(tcp[2:4]))
	s.seq = binary.BigEndian.Uint32(tcp[4:8])
	s.ack = binary.BigEndian.Uint32(tcp[8:12])
	s.flags = tcp[13]
	s.win = binary.BigEndian.Uint16(tcp[14:16])
	s.opts = tcp[20 : int(tcp[12]>>4)*4]
	s.data = tcp[int(tcp[12]>>4)*4:]
	return s, nil
}

const (
	lkFIN = uint8(header.TCPFlagFin)
	lkSYN = uint8(header.TCPFlagSyn)
	lkRST = uint8(header.TCPFlagRst)
	lkPSH = uint8(header.TCPFlagPsh)
	lkACK = uint8(header.TCPFlagAck)
	lkCWR = uint8(header.TCPFlagCwr)
)

// lkHarness is a Proxy stack listening on lkPort, with every packet it
// emits parsed and routed to the peer it is for.
type lkHarness struct {
	p   *Proxy
	ln  *gonet.TCPListener
	ln6 *gonet.TCPListener

	mu    sync.Mutex
	peers map[netip.AddrPort]chan lkSeg
	bad   []string
	total int // packets emitted
}

func lkNewHarness(t testing.TB) *lkHarness {
	t.Helper()
	h := &lkHarness{peers: make(map[netip.AddrPort]chan lkSeg)}
	p, err := NewProxy(ProxyConfig{Addr: lkLocal4, Addr6: lkLocal6, MTU: egTestMTU,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, h.out)
	if err != nil {
		t.Fatal(err)
	}
	h.p = p
	for _, a := range []netip.Addr{lkLocal4, lkLocal6} {
		fa, proto := proxyFullAddr(netip.AddrPortFrom(a, lkPort))
		ln, err := gonet.ListenTCP(p.stack, fa, proto)
		if err != nil {
			t.Fatal(err)
		}
		if a.Is4() {
			h.ln = ln
		} else {
			h.ln6 = ln
		}
	}
	t.Cleanup(func() {
		h.ln.Close()
		h.ln6.Close()
		p.Close()
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, b := range h.bad {
			t.Error(b)
		}
	})
	return h
}

func (h *lkHarness) out(pkts [][]byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, b := range pkts {
		h.total++
		if len(b) > egTestMTU {
			h.bad = append(h.bad, fmt.Sprintf("emitted a %d-byte packet, MTU %d", len(b), egTestMTU))
			continue
		}
		s, err := lkParse(b)
		if err != nil {
			h.bad = append(h.bad, fmt.Sprintf("emitted a broken packet: %v: %x", err, b))
			continue
		}
		s.opts, s.data = bytes.Clone(s.opts), bytes.Clone(s.data)
		if ch := h.peers[s.dst]; ch != nil {
			select {
			case ch <- s:
			default:
				h.bad = append(h.bad, "test peer's queue overflowed")
			}
		}
	}
}

func (h *lkHarness) emitted() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.total
}

// lkConn is one connection: the hand-written peer's side and the stack's.
type lkConn struct {
	h           *lkHarness
	peer, local netip.AddrPort
	in          chan lkSeg
	sndNxt      uint32 // next sequence number the peer sends
	rcvNxt      uint32 // next sequence number the peer expects
	conn        net.Conn
}

// connect opens a connection from peer to the stack's listener.
func (h *lkHarness) connect(t testing.TB, peer netip.AddrPort) *lkConn {
	t.Helper()
	local := netip.AddrPortFrom(lkLocal4, lkPort)
	ln := h.ln
	if peer.Addr().Is6() {
		local = netip.AddrPortFrom(lkLocal6, lkPort)
		ln = h.ln6
	}
	c := &lkConn{h: h, peer: peer, local: local, in: make(chan lkSeg, 4096), sndNxt: 1_000_000}
	h.mu.Lock()
	h.peers[peer] = c.in
	h.mu.Unlock()
	mssOpt := []byte{2, 4, lkMSS >> 8, lkMSS & 0xff}
	h.p.Inject(lkBuild(lkSeg{src: peer, dst: local, seq: c.sndNxt, flags: lkSYN, win: 65535, opts: mssOpt}))
	synack := c.wait(t, "SYN-ACK", func(s lkSeg) bool { return s.flags&(lkSYN|lkACK) == lkSYN|lkACK })
	if synack.ack != c.sndNxt+1 {
		t.Fatalf("SYN-ACK acks %d, want %d", synack.ack, c.sndNxt+1)
	}
	c.sndNxt++
	c.rcvNxt = synack.seq + 1
	h.p.Inject(c.seg(lkACK, nil))
	type res struct {
		c   net.Conn
		err error
	}
	done := make(chan res, 1)
	go func() { a, err := ln.Accept(); done <- res{a, err} }()
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
		c.conn = r.c
	case <-time.After(5 * time.Second):
		t.Fatal("no connection accepted")
	}
	t.Cleanup(func() { c.conn.Close() })
	return c
}

// seg is the peer's next segment: at sndNxt, acking rcvNxt, with data.
func (c *lkConn) seg(flags uint8, data []byte) []byte {
	return lkBuild(lkSeg{src: c.peer, dst: c.local, seq: c.sndNxt, ack: c.rcvNxt, flags: flags, win: 65535, data: data})
}

// segAt is a data segment at seq offset off from base.
func (c *lkConn) segAt(base uint32, off int, data []byte) []byte {
	return lkBuild(lkSeg{src: c.peer, dst: c.local, seq: base + uint32(off), ack: c.rcvNxt, flags: lkACK, win: 65535, data: data})
}

// wait returns the first packet to the peer that satisfies ok.
func (c *lkConn) wait(t testing.TB, what string, ok func(lkSeg) bool) lkSeg {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case s := <-c.in:
			if s.flags&lkRST != 0 {
				t.Fatalf("waiting for %s: got a RST", what)
			}
			if ok(s) {
				return s
			}
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// readAll reads exactly n bytes from the stack's side of c.
func (c *lkConn) readAll(t testing.TB, n int) []byte {
	t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, n)
	if _, err := io.ReadFull(c.conn, got); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return got
}

func lkRandom(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func lkTCPStat(p *Proxy) (rcvd, sent uint64) {
	st := p.stack.Stats().TCP
	return st.ValidSegmentsReceived.Value(), st.SegmentsSent.Value()
}

var lkFamilies = []struct {
	name string
	peer netip.Addr
}{{"v4", lkPeer4}, {"v6", lkPeer6}}

// TestLinkGROCoalesces injects an in-order burst of one flow as one batch:
// the stack must see it as one segment (not 40), acknowledge it with a
// handful of ACKs, and deliver exactly the bytes sent. Fed one packet per
// Inject call, the same burst is 40 segments: batching is what merges.
func TestLinkGROCoalesces(t *testing.T) {
	const segs = 40
	for _, fam := range lkFamilies {
		for _, batched := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/batched=%v", fam.name, batched), func(t *testing.T) {
				h := lkNewHarness(t)
				c := h.connect(t, netip.AddrPortFrom(fam.peer, 40000))
				data := lkRandom(segs * lkMSS)
				burst := make([][]byte, segs)
				for i := range burst {
					flags := lkACK
					if i == segs-1 {
						flags |= lkPSH
					}
					burst[i] = lkBuild(lkSeg{src: c.peer, dst: c.local, seq: c.sndNxt + uint32(i*lkMSS), ack: c.rcvNxt,
						flags: flags, win: 65535, data: data[i*lkMSS : (i+1)*lkMSS]})
				}
				rcvd0, _ := lkTCPStat(h.p)
				if batched {
					h.p.Inject(burst...)
				} else {
					for _, b := range burst {
						h.p.Inject(b)
					}
				}
				rcvd1, _ := lkTCPStat(h.p)
				if got := c.readAll(t, len(data)); !bytes.Equal(got, data) {
					t.Fatal("the stack delivered different bytes than were sent")
				}
				end := c.sndNxt + uint32(len(data))
				acks := 0
				c.wait(t, "the ACK of the whole burst", func(s lkSeg) bool {
					if s.flags&lkACK != 0 && len(s.data) == 0 {
						acks++
					}
					return s.ack == end
				})
				segments := rcvd1 - rcvd0
				t.Logf("%d packets injected: the stack handled %d segments and sent %d ACKs up to the burst's end", segs, segments, acks)
				if batched {
					if segments != 1 {
						t.Fatalf("an in-order burst of %d MSS segments in one batch reached the stack as %d segments, want 1", segs, segments)
					}
					if acks > 3 {
						t.Fatalf("%d ACKs for one merged burst", acks)
					}
				} else if segments != segs {
					t.Fatalf("one packet per Inject: the stack handled %d segments, want %d", segments, segs)
				}
				if st := h.p.Stats(); st.Malformed != 0 {
					t.Fatalf("stats %+v", st)
				}
			})
		}
	}
}

// TestLinkGRONoWrongMerge injects batches that GRO must not merge blindly:
// two flows that differ only in the peer's address, interleaved;
// reordered, overlapping and duplicated segments; a segment with a bad
// checksum (dropped, not merged: its retransmission completes the stream);
// different TTLs and flags. Each stack-side connection must read exactly
// its own stream.
func TestLinkGRONoWrongMerge(t *testing.T) {
	h := lkNewHarness(t)
	a := h.connect(t, netip.AddrPortFrom(lkPeer4, 40000))
	b := h.connect(t, netip.AddrPortFrom(lkPeer4b, 40000)) // same port, other address
	const n = 12
	da, db := lkRandom(n*lkMSS), lkRandom(n*lkMSS)
	chunk := func(d []byte, i int) []byte { return d[i*lkMSS : (i+1)*lkMSS] }

	var batch [][]byte
	// a: 0 1 3 2 4 5 ... (a swap); b: 0, then [650, 1950) overlapping,
	// then 1 2 ..., every other one sent twice.
	order := []int{0, 1, 3, 2}
	for i := 4; i < n; i++ {
		order = append(order, i)
	}
	var corrupt []byte
	for k, i := range order {
		pa := a.segAt(a.sndNxt, i*lkMSS, chunk(da, i))
		if i == 7 {
			corrupt = pa
			bad := bytes.Clone(pa)
			bad[len(bad)-1] ^= 0x5a // payload flipped, checksum not updated
			pa = bad
		}
		batch = append(batch, pa)
		switch {
		case k == 0:
			batch = append(batch, b.segAt(b.sndNxt, 0, chunk(db, 0)))
			batch = append(batch, b.segAt(b.sndNxt, lkMSS/2, db[lkMSS/2:lkMSS/2+lkMSS]))
		case k < n:
			seg := b.segAt(b.sndNxt, k*lkMSS, chunk(db, k))
			batch = append(batch, seg)
			if k%2 == 0 {
				batch = append(batch, seg)
			}
		}
	}
	// A segment with a different TTL and one with PSH mid-stream: both
	// legal, both must land in place.
	ttlSeg := lkBuild(lkSeg{src: b.peer, dst: b.local, seq: b.sndNxt + n*lkMSS, ack: b.rcvNxt, flags: lkACK, win: 65535, ttl: 17, data: []byte("ttl")})
	pshSeg := lkBuild(lkSeg{src: b.peer, dst: b.local, seq: b.sndNxt + n*lkMSS + 3, ack: b.rcvNxt, flags: lkACK | lkPSH, win: 65535, data: []byte("push")})
	batch = append(batch, ttlSeg, pshSeg)
	db = append(db, "ttlpush"...)

	h.p.Inject(batch...)
	if st := h.p.Stats(); st.Malformed != 1 {
		t.Fatalf("the corrupted segment was not dropped as malformed: %+v", st)
	}
	if got := b.readAll(t, len(db)); !bytes.Equal(got, db) {
		t.Fatal("flow b: wrong bytes")
	}
	// a is stuck before segment 7 until it comes again.
	if got := a.readAll(t, 7*lkMSS); !bytes.Equal(got, da[:7*lkMSS]) {
		t.Fatal("flow a: wrong bytes before the dropped segment")
	}
	h.p.Inject(corrupt)
	if got := a.readAll(t, len(da)-7*lkMSS); !bytes.Equal(got, da[7*lkMSS:]) {
		t.Fatal("flow a: wrong bytes after the retransmission")
	}
}

// TestLinkGSOSplit has the stack send a large write to the hand-written
// peer: the stack's TCP emits GSO segments (fewer segments counted than
// packets emitted), and every packet that leaves the link is at most the
// MTU, at most the peer's MSS of payload, with valid IP and TCP checksums
// (checked by the harness), and the bytes arrive in order, complete.
func TestLinkGSOSplit(t *testing.T) {
	for _, fam := range lkFamilies {
		t.Run(fam.name, func(t *testing.T) {
			h := lkNewHarness(t)
			c := h.connect(t, netip.AddrPortFrom(fam.peer, 40001))
			data := lkRandom(1 << 20)
			_, sent0 := lkTCPStat(h.p)
			emitted0 := h.emitted()
			werr := make(chan error, 1)
			go func() {
				_, err := c.conn.Write(data)
				if err == nil {
					err = c.conn.(*gonet.TCPConn).CloseWrite()
				}
				werr <- err
			}()
			var got []byte
			deadline := time.After(10 * time.Second)
			for done := false; !done; {
				select {
				case s := <-c.in:
					if len(s.data) > lkMSS {
						t.Fatalf("a packet with %d bytes of payload, the peer's MSS is %d", len(s.data), lkMSS)
					}
					if s.seq == c.rcvNxt {
						got = append(got, s.data...)
						c.rcvNxt += uint32(len(s.data))
						if s.flags&lkFIN != 0 {
							c.rcvNxt++
							done = true
						}
					}
					// ACK what has arrived once the burst is read, as a
					// receiver with GRO does.
					if len(c.in) == 0 {
						h.p.Inject(c.seg(lkACK, nil))
					}
				case <-deadline:
					t.Fatalf("timed out with %d of %d bytes", len(got), len(data))
				}
			}
			if err := <-werr; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("the peer received different bytes than the stack was given")
			}
			_, sent1 := lkTCPStat(h.p)
			segments, packets := sent1-sent0, h.emitted()-emitted0
			t.Logf("1 MiB: the stack sent %d segments, the link emitted %d packets", segments, packets)
			if uint64(packets) < 2*segments {
				t.Fatalf("the stack sent %d segments for %d packets: no GSO", segments, packets)
			}
		})
	}
}

// lkGSOPacket builds the kind of PacketBuffer gVisor's TCP hands a host-GSO
// link: IP and TCP headers pushed in front of payload, a partial checksum.
func lkGSOPacket(nh, th, payload []byte, gso stack.GSO) *stack.PacketBuffer {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: len(nh) + len(th)})
	pkt.Data().AppendView(lkView(payload))
	copy(pkt.TransportHeader().Push(len(th)), th)
	copy(pkt.NetworkHeader().Push(len(nh)), nh)
	pkt.GSOOptions = gso
	return pkt
}

// TestLinkGSOHeaders checks what each split packet carries, for both
// families: IPv4 IDs counting up, sequence numbers following the payload,
// FIN and PSH only on the last packet, CWR only on the first.
func TestLinkGSOHeaders(t *testing.T) {
	for _, fam := range []struct {
		name     string
		src, dst netip.AddrPort
		typ      stack.GSOType
	}{
		{"v4", netip.AddrPortFrom(lkLocal4, 80), netip.AddrPortFrom(lkPeer4, 40000), stack.GSOTCPv4},
		{"v6", netip.AddrPortFrom(lkLocal6, 80), netip.AddrPortFrom(lkPeer6, 40000), stack.GSOTCPv6},
	} {
		t.Run(fam.name, func(t *testing.T) {
			const mss = 1000
			payload := lkRandom(5*mss + 123)
			full := lkBuild(lkSeg{src: fam.src, dst: fam.dst, seq: 0xfffff000, ack: 7, flags: lkACK | lkPSH | lkFIN | lkCWR, win: 999,
				opts: []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}, data: payload})
			hl := 20
			if fam.src.Addr().Is6() {
				hl = 40
			}
			nh, th := full[:hl], full[hl:hl+32]
			if fam.src.Addr().Is4() {
				binary.BigEndian.PutUint16(nh[4:6], 0xfffe) // the ID wraps in the middle
			}
			th[16], th[17] = 0x12, 0x34 // a partial checksum, to be replaced
			pkt := lkGSOPacket(nh, th, payload, stack.GSO{Type: fam.typ, NeedsCsum: true, CsumOffset: 16, MSS: mss, L3HdrLen: uint16(hl)})
			defer pkt.DecRef()
			var out [][]byte
			w := newOutWriter(egTestMTU, func(pkts [][]byte) {
				for _, p := range pkts {
					out = append(out, bytes.Clone(p))
				}
			})
			w.Write(pkt)
			w.Flush()
			if w.dropped != 0 || len(out) != 6 {
				t.Fatalf("%d packets, %d dropped; want 6, 0", len(out), w.dropped)
			}
			var got []byte
			for i, b := range out {
				s, err := lkParse(b)
				if err != nil {
					t.Fatalf("packet %d: %v", i, err)
				}
				if s.src != fam.src || s.dst != fam.dst || s.ack != 7 || s.win != 999 || len(s.opts) != 12 {
					t.Fatalf("packet %d: header fields not carried over: %+v", i, s)
				}
				if s.seq != 0xfffff000+uint32(len(got)) {
					t.Fatalf("packet %d: seq %#x after %d bytes", i, s.seq, len(got))
				}
				last := i == len(out)-1
				want := lkACK
				if last {
					want |= lkPSH | lkFIN
				}
				if i == 0 {
					want |= lkCWR
				}
				if s.flags != want {
					t.Fatalf("packet %d: flags %#x, want %#x", i, s.flags, want)
				}
				if fam.src.Addr().Is4() {
					if id := binary.BigEndian.Uint16(b[4:6]); id != 0xfffe+uint16(i) {
						t.Fatalf("packet %d: IPv4 ID %#x", i, id)
					}
				}
				got = append(got, s.data...)
			}
			if !bytes.Equal(got, payload) {
				t.Fatal("payload not split faithfully")
			}
		})
	}
}

// TestLinkQueueBounded fills the outbound queue past its bound: the excess
// is refused and counted, not queued without limit.
func TestLinkQueueBounded(t *testing.T) {
	l := newLinkEndpoint(egTestMTU)
	defer l.Close()
	var list stack.PacketBufferList
	for range stackLinkQueueDepth + 10 {
		list.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: lkBuffer(make([]byte, 100))}))
	}
	n, err := l.WritePackets(list)
	list.DecRef()
	if n != stackLinkQueueDepth || err != nil || l.dropped.Load() != 10 {
		t.Fatalf("wrote %d (err %v), dropped %d; want %d, nil, 10", n, err, l.dropped.Load(), stackLinkQueueDepth)
	}
	var one stack.PacketBufferList
	one.PushBack(stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: lkBuffer(make([]byte, 100))}))
	if n, err := l.WritePackets(one); n != 0 || err == nil {
		t.Fatalf("a full queue took a packet: %d, %v", n, err)
	}
	one.DecRef()
	if l.dropped.Load() != 11 {
		t.Fatalf("dropped %d", l.dropped.Load())
	}
}

func lkView(b []byte) *buffer.View { return buffer.NewViewWithData(b) }

func lkBuffer(b []byte) buffer.Buffer { return buffer.MakeWithData(b) }

// lkRefTransportValid is an independent statement of rxTransportValid for
// packets without IPv6 extension headers: the TCP or UDP checksum, computed
// byte by byte with package packet.
func lkRefTransportValid(p []byte) (valid, known bool) {
	var l4 []byte
	var proto uint8
	var pseudo uint32
	switch p[0] >> 4 {
	case 4:
		if binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 {
			return true, true
		}
		proto, l4 = p[9], p[int(p[0]&0x0f)*4:]
		for i := 12; i < 20; i += 2 {
			pseudo += uint32(p[i])<<8 | uint32(p[i+1])
		}
	case 6:
		proto, l4 = p[6], p[40:]
		switch proto {
		case 0, 43, 44, 60:
			return false, false
		}
		for i := 8; i < 40; i += 2 {
			pseudo += uint32(p[i])<<8 | uint32(p[i+1])
		}
	}
	switch proto {
	case 6:
		if len(l4) < 20 {
			return false, true
		}
	case 17:
		if len(l4) < 8 {
			return false, true
		}
		if p[0]>>4 == 4 && l4[6] == 0 && l4[7] == 0 {
			return true, true
		}
		ulen := int(binary.BigEndian.Uint16(l4[4:6]))
		if ulen < 8 || ulen > len(l4) {
			return false, true
		}
		l4 = l4[:ulen]
	default:
		return true, true
	}
	return packet.Sum(l4, pseudo+uint32(proto)+uint32(len(l4))) == 0xffff, true
}

// FuzzLinkRXChecksum: on any input that passes egParseIP the inbound check
// never panics, and where the reference applies it agrees with it.
func FuzzLinkRXChecksum(f *testing.F) {
	f.Add(lkBuild(lkSeg{src: netip.AddrPortFrom(lkPeer4, 1), dst: netip.AddrPortFrom(lkLocal4, 2), flags: lkACK, data: []byte("x")}))
	f.Add(lkBuild(lkSeg{src: netip.AddrPortFrom(lkPeer6, 1), dst: netip.AddrPortFrom(lkLocal6, 2), flags: lkACK, data: []byte("xy")}))
	f.Add([]byte{0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2, 0, 8, 0, 0})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 0, 64, 15: 0, 39: 0, 17, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		b, _, ok := egParseIP(pkt)
		if !ok {
			return
		}
		got := rxTransportValid(b)
		if want, known := lkRefTransportValid(b); known && got != want {
			t.Fatalf("rxTransportValid = %v, reference %v, for %x", got, want, b)
		}
	})
}

// FuzzLinkGSOSplit gives the output writer GSO packets with hostile headers,
// MSS and lengths. It never panics and never emits more than the MTU; when
// the headers are a well-formed IP+TCP pair, every packet it emits has
// valid checksums and their payloads, in order, are the original payload.
func FuzzLinkGSOSplit(f *testing.F) {
	v4 := lkBuild(lkSeg{src: netip.AddrPortFrom(lkLocal4, 80), dst: netip.AddrPortFrom(lkPeer4, 1), flags: lkACK | lkFIN})
	v6 := lkBuild(lkSeg{src: netip.AddrPortFrom(lkLocal6, 80), dst: netip.AddrPortFrom(lkPeer6, 1), flags: lkACK | lkPSH})
	f.Add(v4[:20], v4[20:], uint16(1300), uint16(5000), true)
	f.Add(v6[:40], v6[40:], uint16(1), uint16(30), false)
	f.Add(v4[:20], v4[20:], uint16(0), uint16(0), true)
	f.Add([]byte{0x4f}, []byte{0xff}, uint16(100), uint16(100), true)
	f.Fuzz(func(t *testing.T, nh, th []byte, mss, plen uint16, gso bool) {
		if len(nh)+len(th) > 200 || plen > 20000 {
			return
		}
		payload := make([]byte, plen)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		typ := stack.GSONone
		if gso {
			typ = stack.GSOTCPv4
			if len(nh) > 0 && nh[0]>>4 == 6 {
				typ = stack.GSOTCPv6
			}
		}
		pkt := lkGSOPacket(nh, th, payload, stack.GSO{Type: typ, NeedsCsum: gso, MSS: mss})
		defer pkt.DecRef()
		var out [][]byte
		w := newOutWriter(egTestMTU, func(pkts [][]byte) {
			for _, p := range pkts {
				if len(p) > egTestMTU {
					t.Fatalf("a %d-byte packet", len(p))
				}
				out = append(out, bytes.Clone(p))
			}
		})
		w.Write(pkt)
		w.Flush()
		if !gso || w.dropped != 0 {
			return
		}
		// Written: the headers passed the writer's checks. Check the
		// packets the way a receiver would, if they are ordinary TCP.
		ordinary := (len(nh) == 20 && nh[0] == 0x45 && nh[9] == 6) || (len(nh) == 40 && nh[0]>>4 == 6 && nh[6] == 6)
		if !ordinary {
			return
		}
		var got []byte
		for i, b := range out {
			s, err := lkParse(b)
			if err != nil {
				t.Fatalf("packet %d of %d: %v", i, len(out), err)
			}
			got = append(got, s.data...)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("payload of %d bytes came out as %d", len(payload), len(got))
		}
	})
}

// FuzzInjectBatch feeds batches of arbitrary packets, cut from the input by
// 2-byte length prefixes, to a stack with a listener, so that GRO sees
// hostile mixes of segments. Seeds are well-formed flows. Nothing panics
// and every packet is counted.
func FuzzInjectBatch(f *testing.F) {
	src, dst := netip.AddrPortFrom(lkPeer4, 40000), netip.AddrPortFrom(lkLocal4, lkPort)
	var seed []byte
	add := func(p []byte) {
		seed = binary.BigEndian.AppendUint16(seed, uint16(len(p)))
		seed = append(seed, p...)
	}
	add(lkBuild(lkSeg{src: src, dst: dst, seq: 1, flags: lkSYN, win: 65535}))
	for i := range 6 {
		add(lkBuild(lkSeg{src: src, dst: dst, seq: 2 + uint32(i*100), ack: 1, flags: lkACK, win: 65535, data: bytes.Repeat([]byte{byte(i)}, 100)}))
	}
	f.Add(seed)
	f.Add([]byte{0, 1, 0x45, 0, 0})
	p, err := NewProxy(ProxyConfig{Addr: lkLocal4, Addr6: lkLocal6, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, func([][]byte) {})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { p.Close() })
	fa, proto := proxyFullAddr(dst)
	ln, err := gonet.ListenTCP(p.stack, fa, proto)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	f.Fuzz(func(t *testing.T, in []byte) {
		var batch [][]byte
		for len(in) >= 2 && len(batch) < 256 {
			n := int(binary.BigEndian.Uint16(in))
			in = in[2:]
			n = min(n, len(in))
			batch = append(batch, in[:n])
			in = in[n:]
		}
		before := p.Stats().Injected
		p.Inject(batch...)
		if got := p.Stats().Injected - before; got != uint64(len(batch)) {
			t.Fatalf("counted %d of %d", got, len(batch))
		}
	})
}

// BenchmarkLinkGSOSplit measures cutting one 64 KiB GSO segment into
// MTU-sized packets with finished checksums. It must not allocate.
func BenchmarkLinkGSOSplit(b *testing.B) {
	payload := lkRandom(64000)
	full := lkBuild(lkSeg{src: netip.AddrPortFrom(lkLocal4, 80), dst: netip.AddrPortFrom(lkPeer4, 40000), flags: lkACK, win: 999})
	pkt := lkGSOPacket(full[:20], full[20:], payload, stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, MSS: lkMSS})
	defer pkt.DecRef()
	n := 0
	w := newOutWriter(egTestMTU, func(pkts [][]byte) { n += len(pkts) })
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		w.Write(pkt)
		w.Flush()
	}
	if w.dropped != 0 || n == 0 {
		b.Fatalf("dropped %d, wrote %d", w.dropped, n)
	}
}

// BenchmarkLinkInjectGRO measures the receive path of one bulk flow: a
// batch of 48 in-order MSS segments injected, merged, and read by the
// application, as the agent's stack does for an upload.
func BenchmarkLinkInjectGRO(b *testing.B) {
	h := lkNewHarness(b)
	c := h.connect(b, netip.AddrPortFrom(lkPeer4, 40000))
	const segs = 48
	data := lkRandom(segs * lkMSS)
	batch := make([][]byte, segs)
	readBuf := make([]byte, len(data))
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	b.StopTimer()
	for range b.N {
		for i := range batch {
			batch[i] = lkBuild(lkSeg{src: c.peer, dst: c.local, seq: c.sndNxt + uint32(i*lkMSS), ack: c.rcvNxt, flags: lkACK, win: 65535, data: data[i*lkMSS : (i+1)*lkMSS]})
		}
		c.sndNxt += uint32(len(data))
		for len(c.in) > 0 { // the stack's ACKs: not needed here
			<-c.in
		}
		b.StartTimer()
		h.p.Inject(batch...)
		if _, err := io.ReadFull(c.conn, readBuf); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
	}
}
