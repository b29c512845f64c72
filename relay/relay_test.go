package relay

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// fakeConn records every datagram sent to it.
type fakeConn struct {
	mu   sync.Mutex
	got  [][]byte
	cond chan struct{} // signalled on every send
	err  error
}

func newFakeConn() *fakeConn { return &fakeConn{cond: make(chan struct{}, 1)} }

func (f *fakeConn) SendDatagram(b []byte) error {
	f.mu.Lock()
	f.got = append(f.got, append([]byte(nil), b...))
	err := f.err
	f.mu.Unlock()
	select {
	case f.cond <- struct{}{}:
	default:
	}
	return err
}

func (f *fakeConn) frames() [][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([][]byte(nil), f.got...)
}

// wait waits until n datagrams have arrived.
func (f *fakeConn) wait(t *testing.T, n int) [][]byte {
	t.Helper()
	deadline := time.After(3 * time.Second)
	for {
		if got := f.frames(); len(got) >= n {
			return got
		}
		select {
		case <-f.cond:
		case <-deadline:
			t.Fatalf("got %d datagrams, want %d", len(f.frames()), n)
		}
	}
}

// blockingConn never returns from SendDatagram until released.
type blockingConn struct {
	release chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (b *blockingConn) SendDatagram([]byte) error {
	b.once.Do(func() { close(b.entered) })
	<-b.release
	return errors.New("closed")
}

// discard drops everything, for the fuzz target.
type discard struct{}

func (discard) SendDatagram([]byte) error { return nil }
func (discard) RemoteAddr() net.Addr      { return nil }

func (*fakeConn) RemoteAddr() net.Addr     { return nil }
func (*blockingConn) RemoteAddr() net.Addr { return nil }

var noToken [CheckTokenLen]byte

func quietHub() *Hub { return NewHub(slog.New(slog.NewTextHandler(io.Discard, nil))) }

func TestForwardBothWays(t *testing.T) {
	h := quietHub()
	ca, cb := newFakeConn(), newFakeConn()
	a, b := h.NewPeer("client/alice", netip.AddrPort{}, noToken, ca), h.NewPeer("agent/miranda", netip.AddrPort{}, noToken, cb)
	defer a.Close()
	defer b.Close()
	const id = 0x1122334455667788
	if err := h.Bind(id, a, b); err != nil {
		t.Fatal(err)
	}
	if !h.Has(id) {
		t.Fatal("Has after Bind = false")
	}

	ab := [][]byte{Frame(id, []byte("hello agent")), Frame(id, bytes.Repeat([]byte{0xaa}, 1400)), Frame(id, nil)}
	ba := [][]byte{Frame(id, []byte("hello client")), Frame(id, []byte{0, 1, 2, 3})}
	for _, f := range ab {
		h.Forward(a, append([]byte(nil), f...))
	}
	for _, f := range ba {
		h.Forward(b, append([]byte(nil), f...))
	}
	gotB := cb.wait(t, len(ab))
	gotA := ca.wait(t, len(ba))
	for i := range ab {
		if !bytes.Equal(gotB[i], ab[i]) {
			t.Errorf("A→B frame %d changed: got %x, want %x", i, gotB[i], ab[i])
		}
	}
	for i := range ba {
		if !bytes.Equal(gotA[i], ba[i]) {
			t.Errorf("B→A frame %d changed: got %x, want %x", i, gotA[i], ba[i])
		}
	}
	// Payload survives the header round trip.
	kind, gid, p, err := wire.ParseFrame(gotB[0])
	if err != nil || kind != wire.FrameRelay || gid != id || string(p) != "hello agent" {
		t.Fatalf("ParseFrame(forwarded) = %d %x %q %v", kind, gid, p, err)
	}

	var nab, nba uint64
	for _, f := range ab {
		nab += uint64(len(f))
	}
	for _, f := range ba {
		nba += uint64(len(f))
	}
	st := h.Stats()
	if st.Frames != uint64(len(ab)+len(ba)) || st.Bytes != nab+nba {
		t.Errorf("Frames, Bytes = %d, %d; want %d, %d", st.Frames, st.Bytes, len(ab)+len(ba), nab+nba)
	}
	if st.Routes != 1 || len(st.Sessions) != 1 {
		t.Fatalf("Routes = %d, Sessions = %+v; want one", st.Routes, st.Sessions)
	}
	rs := st.Sessions[0]
	want := RouteStats{ID: id, A: "client/alice", B: "agent/miranda",
		BytesAToB: nab, BytesBToA: nba, PacketsAToB: uint64(len(ab)), PacketsBToA: uint64(len(ba)), RelayedTotal: nab + nba}
	if rs != want {
		t.Errorf("route stats = %+v\nwant %+v", rs, want)
	}
	if st.DropUnknown+st.DropNotEndpoint+st.DropMalformed+st.DropQueueFull+st.DropSendFailed != 0 {
		t.Errorf("drops counted on a clean run: %+v", st)
	}
}

func TestForwardDrops(t *testing.T) {
	h := quietHub()
	ca, cb, cc := newFakeConn(), newFakeConn(), newFakeConn()
	a, b, c := h.NewPeer("a", netip.AddrPort{}, noToken, ca), h.NewPeer("b", netip.AddrPort{}, noToken, cb), h.NewPeer("c", netip.AddrPort{}, noToken, cc)
	defer a.Close()
	defer b.Close()
	defer c.Close()
	const id = 42
	if err := h.Bind(id, a, b); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name  string
		from  *Peer
		frame []byte
		count func(Stats) uint64
	}{
		{"not an endpoint", c, Frame(id, []byte("intruder")), func(s Stats) uint64 { return s.DropNotEndpoint }},
		{"unknown session", a, Frame(43, []byte("x")), func(s Stats) uint64 { return s.DropUnknown }},
		{"empty", a, nil, func(s Stats) uint64 { return s.DropMalformed }},
		{"short header", a, []byte{wire.FrameRelay, 0, 0, 0}, func(s Stats) uint64 { return s.DropMalformed }},
		{"session zero", a, Frame(0, []byte("x")), func(s Stats) uint64 { return s.DropMalformed }},
		{"direct kind", a, append(wire.AppendFrameHeader(nil, wire.FrameDirect, id), 'x'), func(s Stats) uint64 { return s.DropMalformed }},
		{"probe kind", a, wire.AppendFrameHeader(nil, wire.FrameProbe, id), func(s Stats) uint64 { return s.DropMalformed }},
		{"unknown kind", a, append(wire.AppendFrameHeader(nil, 0x7f, id), 'x'), func(s Stats) uint64 { return s.DropMalformed }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := h.Stats()
			h.Forward(tt.from, tt.frame)
			after := h.Stats()
			if got := tt.count(after) - tt.count(before); got != 1 {
				t.Errorf("drop counter moved by %d, want 1 (stats %+v)", got, after)
			}
			if after.Frames != before.Frames {
				t.Errorf("dropped frame was counted as forwarded")
			}
		})
	}
	// Give any wrongly forwarded frame time to show up.
	time.Sleep(50 * time.Millisecond)
	for name, fc := range map[string]*fakeConn{"a": ca, "b": cb, "c": cc} {
		if n := len(fc.frames()); n != 0 {
			t.Errorf("peer %s received %d dropped frames", name, n)
		}
	}
	if rs := h.Stats().Sessions[0]; rs.PacketsAToB != 0 || rs.PacketsBToA != 0 {
		t.Errorf("dropped frames counted on the route: %+v", rs)
	}
}

func TestBind(t *testing.T) {
	h := quietHub()
	a, b, c := h.NewPeer("a", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("b", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("c", netip.AddrPort{}, noToken, newFakeConn())
	defer a.Close()
	defer b.Close()
	defer c.Close()
	if err := h.Bind(7, a, b); err != nil {
		t.Fatal(err)
	}
	if err := h.Bind(7, a, b); err != nil {
		t.Errorf("re-Bind of the same pair: %v, want ok (resumed session)", err)
	}
	for _, tt := range []struct {
		name string
		x, y *Peer
	}{{"other client", c, b}, {"other agent", a, c}, {"swapped pair", b, a}} {
		if err := h.Bind(7, tt.x, tt.y); !errors.Is(err, ErrInUse) {
			t.Errorf("Bind(%s) = %v, want ErrInUse", tt.name, err)
		}
	}
	for _, tt := range []struct {
		name string
		id   uint64
		x, y *Peer
	}{{"id 0", 0, a, b}, {"nil a", 8, nil, b}, {"nil b", 8, a, nil}, {"self", 8, a, a}} {
		if err := h.Bind(tt.id, tt.x, tt.y); err == nil {
			t.Errorf("Bind(%s) accepted", tt.name)
		}
	}
	// The route still belongs to a and b.
	h.Forward(c, Frame(7, []byte("x")))
	if h.Stats().DropNotEndpoint != 1 {
		t.Error("a failed Bind changed the route")
	}
	h.Unbind(7)
	if h.Has(7) {
		t.Fatal("Has after Unbind = true")
	}
	if err := h.Bind(7, c, b); err != nil {
		t.Errorf("Bind of a freed ID: %v", err)
	}
}

func TestPeerCloseRemovesRoutes(t *testing.T) {
	h := quietHub()
	cb := newFakeConn()
	a, b, c := h.NewPeer("a", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("b", netip.AddrPort{}, noToken, cb), h.NewPeer("c", netip.AddrPort{}, noToken, newFakeConn())
	defer b.Close()
	defer c.Close()
	for _, r := range []struct {
		id   uint64
		x, y *Peer
	}{{1, a, b}, {2, c, a}, {3, b, c}} {
		if err := h.Bind(r.id, r.x, r.y); err != nil {
			t.Fatal(err)
		}
	}
	a.Close()
	a.Close() // idempotent
	if h.Has(1) || h.Has(2) {
		t.Fatal("routes of a closed peer survive")
	}
	if !h.Has(3) {
		t.Fatal("Close removed a route the peer was not on")
	}
	if n := h.Stats().Routes; n != 1 {
		t.Fatalf("Routes = %d, want 1", n)
	}
	// A frame for a removed route is unknown now, and never reaches b.
	h.Forward(b, Frame(1, []byte("late")))
	if h.Stats().DropUnknown != 1 {
		t.Fatalf("frame for a closed route: stats %+v", h.Stats())
	}
	time.Sleep(20 * time.Millisecond)
	if len(cb.frames()) != 0 {
		t.Fatal("frame forwarded over a closed route")
	}
}

func TestSlowReceiverDoesNotBlockForward(t *testing.T) {
	h := quietHub()
	slow := &blockingConn{release: make(chan struct{}), entered: make(chan struct{})}
	a, b := h.NewPeer("a", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("b", netip.AddrPort{}, noToken, slow)
	defer a.Close()
	defer b.Close()
	defer close(slow.release) // runs before b.Close: unblock the sender
	if err := h.Bind(9, a, b); err != nil {
		t.Fatal(err)
	}

	// One frame gets the sender stuck inside SendDatagram.
	h.Forward(a, Frame(9, []byte("first")))
	select {
	case <-slow.entered:
	case <-time.After(2 * time.Second):
		t.Fatal("sender never called SendDatagram")
	}

	const extra = 100
	total := QueueLen + extra
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < total; i++ {
			h.Forward(a, Frame(9, []byte("more")))
		}
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Forward blocked on a receiver whose SendDatagram never returns")
	}
	st := h.Stats()
	if st.DropQueueFull != extra {
		t.Errorf("DropQueueFull = %d, want %d", st.DropQueueFull, extra)
	}
	if st.Frames != uint64(1+QueueLen) {
		t.Errorf("Frames = %d, want %d (first + a full queue)", st.Frames, 1+QueueLen)
	}
	// The other direction is a different queue: it is not affected.
	fa := a.conn.(*fakeConn)
	h.Forward(b, Frame(9, []byte("reply")))
	if got := fa.wait(t, 1); string(got[0][wire.FrameHeaderLen:]) != "reply" {
		t.Fatalf("reverse direction got %q", got[0])
	}
}

func TestSendFailureCounted(t *testing.T) {
	h := quietHub()
	cb := newFakeConn()
	cb.err = errors.New("connection closed")
	a, b := h.NewPeer("a", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("b", netip.AddrPort{}, noToken, cb)
	defer a.Close()
	defer b.Close()
	if err := h.Bind(5, a, b); err != nil {
		t.Fatal(err)
	}
	h.Forward(a, Frame(5, []byte("x")))
	cb.wait(t, 1)
	deadline := time.Now().Add(2 * time.Second)
	for h.Stats().DropSendFailed != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("DropSendFailed = %d, want 1", h.Stats().DropSendFailed)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestForwardConcurrentWithClose(t *testing.T) {
	// Forward, Bind and Close race in a real gateway: run them together
	// under the race detector.
	h := quietHub()
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			a, b := h.NewPeer("a", netip.AddrPort{}, noToken, newFakeConn()), h.NewPeer("b", netip.AddrPort{}, noToken, newFakeConn())
			id := uint64(100 + i)
			if err := h.Bind(id, a, b); err != nil {
				t.Error(err)
				return
			}
			for j := 0; j < 200; j++ {
				h.Forward(a, Frame(id, []byte("x")))
				h.Forward(b, Frame(id, []byte("y")))
				if j%50 == 0 {
					_ = h.Stats()
				}
			}
			a.Close()
			h.Forward(b, Frame(id, []byte("z")))
			b.Close()
		}(i)
	}
	wg.Wait()
	if st := h.Stats(); st.Routes != 0 {
		t.Fatalf("routes left after every peer closed: %d", st.Routes)
	}
}

func FuzzForward(f *testing.F) {
	f.Add(Frame(1, []byte("payload")))
	f.Add(Frame(2, nil))
	f.Add([]byte{})
	f.Add([]byte{wire.FrameRelay})
	f.Add(wire.AppendFrameHeader(nil, wire.FrameDirect, 1))
	h := quietHub()
	a, b := h.NewPeer("a", netip.AddrPort{}, noToken, discard{}), h.NewPeer("b", netip.AddrPort{}, noToken, discard{})
	if err := h.Bind(1, a, b); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, buf []byte) {
		before := h.Stats()
		h.Forward(a, append([]byte(nil), buf...))
		after := h.Stats()
		moved := (after.Frames - before.Frames) + (after.DropMalformed - before.DropMalformed) +
			(after.DropUnknown - before.DropUnknown) + (after.DropQueueFull - before.DropQueueFull)
		if moved != 1 {
			t.Fatalf("frame %x moved counters by %d, want exactly 1", buf, moved)
		}
		kind, id, _, err := wire.ParseFrame(buf)
		valid := err == nil && kind == wire.FrameRelay && id == 1
		if forwarded := after.Frames+after.DropQueueFull > before.Frames+before.DropQueueFull; forwarded != valid {
			t.Fatalf("frame %x: forwarded=%v, but valid relay frame for the route=%v", buf, forwarded, valid)
		}
	})
}

// movingConn is a node connection whose address can change (a NAT
// rebinding), recording what it was sent in DATAGRAMs.
type movingConn struct {
	*fakeConn
	addr atomic.Pointer[net.UDPAddr]
}

func newMovingConn(ap netip.AddrPort) *movingConn {
	c := &movingConn{fakeConn: newFakeConn()}
	c.addr.Store(net.UDPAddrFromAddrPort(ap))
	return c
}

func (c *movingConn) RemoteAddr() net.Addr { return c.addr.Load() }

// udpRecorder is the gateway port's writer, recording where frames went.
type udpRecorder struct {
	mu   sync.Mutex
	sent map[netip.AddrPort]int
}

func (u *udpRecorder) Write(to netip.AddrPort, b []byte) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.sent == nil {
		u.sent = map[netip.AddrPort]int{}
	}
	u.sent[to]++
	return true
}

func (u *udpRecorder) WriteWait(to netip.AddrPort, b []byte) bool { return u.Write(to, b) }

func (u *udpRecorder) count(to netip.AddrPort) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.sent[to]
}

// A node's NAT rebinds: after Refresh its relay frames count from the new
// address only, frames to it go to the new address only once it has
// checked from there with its token, and a check with a wrong token is
// refused. A node that gets an address another node had takes it over:
// the other's frames from there no longer count as its own.
func TestNodeAddressMoves(t *testing.T) {
	h := quietHub()
	udp := &udpRecorder{}
	h.SetUDP(udp)
	a0, a1 := netip.MustParseAddrPort("198.18.2.2:40000"), netip.MustParseAddrPort("198.18.2.2:40999")
	bAddr := netip.MustParseAddrPort("198.18.3.2:41000")
	ca, cb := newMovingConn(a0), newMovingConn(bAddr)
	var ta, tb [CheckTokenLen]byte
	ta[0], tb[0] = 1, 2
	a, b := h.NewPeer("client/a", a0, ta, ca), h.NewPeer("agent/b", bAddr, tb, cb)
	defer a.Close()
	defer b.Close()
	const id = 77
	if err := h.Bind(id, a, b); err != nil {
		t.Fatal(err)
	}
	check := func(from netip.AddrPort, tok [CheckTokenLen]byte) {
		hd := wire.FrameHeader(wire.FrameRelayCheck, 5)
		h.HandleUDP(from, append(hd[:], tok[:]...))
	}
	check(a0, ta)
	check(bAddr, tb)
	frame := Frame(id, []byte("ciphertext"))

	h.HandleUDP(a0, frame)
	if udp.count(bAddr) != 2 { // the check's answer and the frame
		t.Fatalf("frame from a's address not relayed as UDP: %v", udp.sent)
	}
	// a's NAT rebinds to a1.
	ca.addr.Store(net.UDPAddrFromAddrPort(a1))
	if moves := h.Refresh(); len(moves) != 1 || moves[0].From != a0 || moves[0].To != a1 {
		t.Fatalf("Refresh moves = %+v", moves)
	}
	st0 := h.Stats()
	h.HandleUDP(a0, frame)
	if st := h.Stats(); st.DropNotEndpoint != st0.DropNotEndpoint+1 {
		t.Fatal("a frame from the old address still counts as the node's")
	}
	h.HandleUDP(a1, frame)
	if udp.count(bAddr) != 3 {
		t.Fatalf("frame from the new address not relayed: %v", udp.sent)
	}
	// Frames to a: by DATAGRAM until it checks from the new address.
	h.HandleUDP(bAddr, frame)
	ca.wait(t, 1)
	if udp.count(a0) != 1 || udp.count(a1) != 0 {
		t.Fatalf("frames to a moved node went as UDP before it checked: %v", udp.sent)
	}
	check(a1, tb) // the wrong token (b's)
	h.HandleUDP(bAddr, frame)
	ca.wait(t, 2)
	if udp.count(a1) != 0 {
		t.Fatal("a check with another node's token was taken")
	}
	check(a1, ta)
	h.HandleUDP(bAddr, frame)
	if udp.count(a1) != 2 { // the answer and the frame
		t.Fatalf("after its check, frames to a did not go to the new address: %v", udp.sent)
	}

	// Another node registers at a1 (the NAT gave the address on).
	cc := newMovingConn(a1)
	c := h.NewPeer("client/c", a1, ta, cc)
	defer c.Close()
	st0 = h.Stats()
	h.HandleUDP(a1, frame)
	if st := h.Stats(); st.DropNotEndpoint != st0.DropNotEndpoint+1 {
		t.Fatal("a frame from an address another node took over still counted as a's")
	}
	if moves := h.Refresh(); len(moves) != 0 {
		t.Fatalf("Refresh gave a back an address c holds: %+v", moves)
	}
}

// A node's move is told to the other end of each of its routes, and to
// nobody else.
func TestRefreshTellsOtherEnd(t *testing.T) {
	h := quietHub()
	a0, a1 := netip.MustParseAddrPort("198.18.2.2:40000"), netip.MustParseAddrPort("198.18.2.2:61000")
	ca := newMovingConn(a0)
	var tok [CheckTokenLen]byte
	a := h.NewPeer("client/a", a0, tok, ca)
	b := h.NewPeer("agent/b", netip.MustParseAddrPort("198.18.3.2:41000"), tok, newMovingConn(netip.MustParseAddrPort("198.18.3.2:41000")))
	c := h.NewPeer("agent/c", netip.MustParseAddrPort("198.18.3.3:41000"), tok, newMovingConn(netip.MustParseAddrPort("198.18.3.3:41000")))
	d := h.NewPeer("client/d", netip.MustParseAddrPort("198.18.2.4:41000"), tok, newMovingConn(netip.MustParseAddrPort("198.18.2.4:41000")))
	for _, p := range []*Peer{a, b, c, d} {
		defer p.Close()
	}
	type moved struct {
		who *Peer
		id  uint64
		to  netip.AddrPort
	}
	var got []moved
	for _, p := range []*Peer{a, b, c, d} {
		p.OnMoved = func(id uint64, to netip.AddrPort) { got = append(got, moved{p, id, to}) }
	}
	for _, r := range []struct {
		id   uint64
		x, y *Peer
	}{{1, a, b}, {2, c, a}, {3, d, c}} {
		if err := h.Bind(r.id, r.x, r.y); err != nil {
			t.Fatal(err)
		}
	}
	if moves := h.Refresh(); len(moves) != 0 || len(got) != 0 {
		t.Fatalf("nothing moved, yet %+v, told %+v", moves, got)
	}
	ca.addr.Store(net.UDPAddrFromAddrPort(a1))
	if moves := h.Refresh(); len(moves) != 1 {
		t.Fatalf("Refresh moves = %+v", moves)
	}
	want := map[moved]bool{{b, 1, a1}: true, {c, 2, a1}: true}
	if len(got) != len(want) || !want[got[0]] || !want[got[1]] {
		t.Fatalf("told %+v, want b of session 1 and c of session 2, to %v", got, a1)
	}
}
