package underlay

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// testPort is an Underlay on a loopback port with its frame reader and
// writer running (no gateway connection).
type testPort struct {
	*Underlay
	addr netip.AddrPort
	gw   atomic.Pointer[netip.AddrPort] // what the port takes for the gateway's address
}

// openTest opens a port on 127.0.0.1: with the steered frame socket
// (steered), or taking frames through quic-go's non-QUIC queue.
func openTest(t testing.TB, steered bool) *testPort {
	return openTestAt(t, steered, "127.0.0.1:0")
}

// openTestAt is openTest on the steered sockets of addr: "127.0.0.1:0"
// (AF_INET), "[::1]:0" (AF_INET6), or ":0", the wildcard a node's port
// uses (Open), which Go opens as one dual-stack AF_INET6 socket (IPv4
// peers as v4-mapped addresses) wherever the machine has IPv6.
func openTestAt(t testing.TB, steered bool, addr string) *testPort {
	t.Helper()
	var udp, frames *net.UDPConn
	var err error
	if steered {
		udp, frames, err = platform.ListenUDPPair(addr)
		if err != nil {
			t.Fatal(err)
		}
		if frames == nil {
			udp.Close()
			t.Skip("kernel refused the steering program")
		}
	} else if udp, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
		t.Fatal(err)
	}
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	u, err := open(control.Config{Gateway: "127.0.0.1:1", Key: key, Log: quiet}, udp, frames)
	if err != nil {
		t.Fatal(err)
	}
	tp := &testPort{Underlay: u, addr: udp.LocalAddr().(*net.UDPAddr).AddrPort()}
	if tp.addr.Addr().IsUnspecified() {
		tp.addr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), tp.addr.Port())
	}
	tp.setGateway(netip.MustParseAddrPort("127.0.0.1:1"))
	u.gwAddr = func() netip.AddrPort { return *tp.gw.Load() }
	ctx, cancel := context.WithCancel(context.Background())
	u.startFrames(ctx)
	t.Cleanup(func() { cancel(); u.Close() })
	return tp
}

func (p *testPort) setGateway(a netip.AddrPort) { p.gw.Store(&a) }

func forBothModes(t *testing.T, f func(t *testing.T, steered bool)) {
	for _, steered := range []bool{true, false} {
		name := "non-QUIC queue"
		if steered {
			name = "steered frame socket"
		}
		t.Run(name, func(t *testing.T) { f(t, steered) })
	}
}

func probeKey() []byte { return bytes.Repeat([]byte{7}, 32) }

// punchBoth punches session id between two ports and waits until both
// have moved it onto the direct path.
func punchBoth(t testing.TB, a, b *testPort, id uint64) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	up := make(chan netip.AddrPort, 2)
	on := func(r netip.AddrPort, _ time.Duration) { up <- r }
	da := a.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Peer: []netip.AddrPort{b.addr}, Log: quiet, OnDirect: on})
	db := b.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Peer: []netip.AddrPort{a.addr}, Log: quiet, OnDirect: on})
	t.Cleanup(func() { da.Stop(); db.Stop() })
	for i := 0; i < 2; i++ {
		select {
		case <-up:
		case <-time.After(5 * time.Second):
			t.Fatal("no direct path between two loopback ports")
		}
	}
}

// A session's packets cross a confirmed direct path whole, in order, and
// from the session's address: a burst of mixed sizes (GSO trains, GRO on
// receive where the kernel has them). Through quic-go's 32-deep non-QUIC
// queue (the fallback where the kernel refuses the steering program) a
// burst can lose packets when the reader is late, as the README says of
// that mode; what arrives must still be whole and in order.
func TestDirectPathCarriesSessionPackets(t *testing.T) {
	forBothModes(t, func(t *testing.T, steered bool) {
		a, b := openTest(t, steered), openTest(t, steered)
		const id = 0x5e55
		punchBoth(t, a, b, id)
		const n = 400
		sizeOf := func(i int) int {
			if i%37 == 36 {
				return 60 + i
			}
			return wire.PeerPacketSize
		}
		type result struct {
			got int
			err error
		}
		done := make(chan result, 1)
		go func() {
			buf := make([]byte, 2048)
			got, next := 0, 0
			for next < n {
				b.Conn.SetReadDeadline(time.Now().Add(time.Second))
				k, from, err := b.Conn.ReadFrom(buf)
				if err != nil {
					if !steered && got > 0 {
						break // the tail was lost in the fallback's queue
					}
					done <- result{got, err}
					return
				}
				seq := int(binary.BigEndian.Uint32(buf))
				if sid, _ := session.IDOf(from); sid != id || seq < next || seq >= n || k != sizeOf(seq) || buf[k-1] != byte(seq) {
					done <- result{got, errorf("after %d: %d bytes from %v, seq %d", next, k, from, seq)}
					return
				}
				if steered && seq != next {
					done <- result{got, errorf("packet %d missing (got %d)", next, seq)}
					return
				}
				got, next = got+1, seq+1
			}
			done <- result{got, nil}
		}()
		for i := 0; i < n; i++ {
			p := make([]byte, sizeOf(i))
			binary.BigEndian.PutUint32(p, uint32(i))
			p[len(p)-1] = byte(i)
			a.Conn.WriteTo(p, session.Addr(id))
			// Pace: the loopback socket buffer is small, and quic-go's
			// non-QUIC queue (the fallback) holds only 32.
			if (steered && i%64 == 63) || (!steered && i%8 == 7) {
				time.Sleep(time.Millisecond)
			}
		}
		r := <-done
		if r.err != nil {
			t.Fatal(r.err)
		}
		if !steered && r.got < n/2 {
			t.Fatalf("only %d of %d packets through the fallback", r.got, n)
		}
		if d := a.Drops(); d["frame_queue_full"] != 0 || d["path_send_failed"] != 0 {
			t.Fatalf("sender drops: %v", d)
		}
		if steered {
			st := a.IOStats()
			t.Logf("%d datagrams in %d sendmmsg calls; receiver: %d in %d recvmmsg calls", st.WriteDatagrams, st.WriteCalls, b.IOStats().ReadDatagrams, b.IOStats().ReadCalls)
		} else {
			t.Logf("%d of %d packets through the fallback", r.got, n)
		}
	})
}

type errString string

func (e errString) Error() string { return string(e) }

func errorf(format string, a ...any) error {
	return errString(fmt.Sprintf(format, a...))
}

// Frames with nowhere to go are dropped and counted, and reach no
// session: for a session nobody punches for, malformed, a relay frame not
// from the gateway, a direct frame after the punch was stopped.
func TestFrameDrops(t *testing.T) {
	forBothModes(t, func(t *testing.T, steered bool) {
		u := openTest(t, steered)
		peer, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		const id = 77
		d := u.StartDirect(context.Background(), DirectConfig{ID: id, Key: probeKey(), Log: quiet})
		frame := func(kind byte, id uint64, payload string) []byte {
			h := wire.FrameHeader(kind, id)
			return append(h[:], payload...)
		}
		// sendUntil repeats (quic-go's non-QUIC queue drops what arrives
		// before the first read) until the counter moves.
		sendUntil := func(b []byte, counter string) {
			t.Helper()
			before := u.Drops()[counter]
			deadline := time.Now().Add(3 * time.Second)
			for u.Drops()[counter] == before {
				if time.Now().After(deadline) {
					t.Fatalf("%q not counted for %x", counter, b)
				}
				peer.WriteToUDPAddrPort(b, u.addr)
				time.Sleep(10 * time.Millisecond)
			}
		}
		sendUntil(frame(wire.FrameDirect, id+1, "x"), "frame_unknown_session")
		sendUntil([]byte{wire.FrameDirect, 0, 0}, "frame_malformed")
		sendUntil(frame(wire.FrameRelay, id, "not from the gateway"), "frame_not_from_gateway")
		sendUntil(frame(wire.FrameRelayCheck, 5, ""), "frame_not_from_gateway")
		d.Stop()
		sendUntil(frame(wire.FrameDirect, id, "after stop"), "frame_unknown_session")
		u.Conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if k, from, err := u.Conn.ReadFrom(make([]byte, 100)); err == nil {
			t.Fatalf("a dropped frame reached the session: %d bytes from %v", k, from)
		}
	})
}

// The relay path: a relay check answered by the gateway's address turns
// UDP frames on; then a session's packets go to the gateway's port as
// relay frames, and relay frames from it reach the session.
func TestRelayFramesOverUDP(t *testing.T) {
	u := openTest(t, true)
	gw, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	gwAddr := gw.LocalAddr().(*net.UDPAddr).AddrPort()
	u.setGateway(gwAddr)
	u.relay.kick()

	// The fake gateway echoes checks until the node says frames pass.
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for !u.RelayOverUDP() {
		if time.Now().After(deadline) {
			t.Fatal("relay check never confirmed")
		}
		gw.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		k, from, err := gw.ReadFromUDPAddrPort(buf)
		if err != nil {
			continue
		}
		if buf[0] != wire.FrameRelayCheck || k != wire.FrameHeaderLen || from.Port() != u.addr.Port() {
			t.Fatalf("unexpected %x from %v before the check passed", buf[:k], from)
		}
		gw.WriteToUDPAddrPort(buf[:k], from)
	}

	const id = 0xfeed
	pkt := bytes.Repeat([]byte{0xab}, wire.PeerPacketSize)
	u.Conn.WriteTo(pkt, session.Addr(id))
	gw.SetReadDeadline(time.Now().Add(3 * time.Second))
	for {
		k, from, err := gw.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("no relay frame at the gateway: %v", err)
		}
		if buf[0] == wire.FrameRelayCheck {
			continue
		}
		kind, gotID, payload, err := wire.ParseFrame(buf[:k])
		if err != nil || kind != wire.FrameRelay || gotID != id || !bytes.Equal(payload, pkt) || from.Port() != u.addr.Port() {
			t.Fatalf("relay frame: kind %d id %x %d bytes from %v (%v)", kind, gotID, len(payload), from, err)
		}
		break
	}
	back := wire.FrameHeader(wire.FrameRelay, id)
	gw.WriteToUDPAddrPort(append(back[:], "from the other end"...), u.addr)
	u.Conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	k, from, err := u.Conn.ReadFrom(buf)
	if got, _ := session.IDOf(from); err != nil || string(buf[:k]) != "from the other end" || got != id {
		t.Fatalf("relay frame from the gateway: %q from %v (%v)", buf[:k], from, err)
	}
}

// The direct path's steady state allocates nothing: a session packet
// written, framed, sent, received in a pooled buffer, handed to the
// session and read.
func TestDirectPathAllocs(t *testing.T) {
	a, b := openTest(t, true), openTest(t, true)
	const id = 0xa110c
	punchBoth(t, a, b, id)
	pkt := make([]byte, wire.PeerPacketSize)
	buf := make([]byte, 2048)
	round := func() {
		for i := 0; i < 16; i++ {
			a.Conn.WriteTo(pkt, session.Addr(id))
		}
		for i := 0; i < 16; i++ {
			b.Conn.SetReadDeadline(time.Time{})
			if _, _, err := b.Conn.ReadFrom(buf); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := 0; i < 20; i++ {
		round() // warm up: trains, slices, buffers
	}
	if n := testing.AllocsPerRun(100, round); n > 0.5 {
		t.Fatalf("%.2f allocations per round of 16 packets, want 0", n)
	}
}

// BenchmarkDirectPath is the node port's per-packet cost on the direct
// path, both ends: a full-size session packet written, framed, queued,
// sent in batches (GSO), received in batches (GRO), handed to the session
// and read; one op is one packet.
//
// Sub-benchmarks by socket: ipv4 (AF_INET sockets on 127.0.0.1), dual
// (the node's own kind: ":0", one AF_INET6 socket for both families,
// here carrying IPv4 as v4-mapped addresses) and ipv6 (::1).
func BenchmarkDirectPath(b *testing.B) {
	for _, bc := range []struct{ name, x, y string }{
		{"ipv4", "127.0.0.1:0", "127.0.0.1:0"},
		{"dual", ":0", ":0"},
		{"ipv6", "[::1]:0", "[::1]:0"},
	} {
		b.Run(bc.name, func(b *testing.B) { benchDirectPath(b, bc.x, bc.y) })
	}
}

func benchDirectPath(b *testing.B, xAddr, yAddr string) {
	x, y := openTestAt(b, true, xAddr), openTestAt(b, true, yAddr)
	const id = 0xbe9c
	punchBoth(b, x, y, id)
	pkt := make([]byte, wire.PeerPacketSize)
	buf := make([]byte, 2048)
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	b.ResetTimer()
	lost := 0
	for i := 0; i < b.N; i += 16 {
		k := min(16, b.N-i)
		for j := 0; j < k; j++ {
			x.Conn.WriteTo(pkt, session.Addr(id))
		}
		if i%4096 == 0 {
			// The benchmark's own timeout (a timer: two allocations), now
			// and then rather than per packet.
			y.Conn.SetReadDeadline(time.Now().Add(2 * time.Second))
		}
		for j := 0; j < k; j++ {
			if _, _, err := y.Conn.ReadFrom(buf); err != nil {
				lost += k - j // datagrams are unreliable: count, do not hang
				break
			}
		}
	}
	b.StopTimer()
	if lost > 0 {
		b.ReportMetric(float64(lost), "lost")
	}
}

// FuzzHandleFrame: whatever arrives at the port, from wherever, is
// handled or dropped, never a panic; a session sees only payloads of
// frames for sessions it punches for or that came from the gateway.
func FuzzHandleFrame(f *testing.F) {
	h := wire.FrameHeader(wire.FrameDirect, 9)
	f.Add(append(h[:], "pkt"...), true)
	h = wire.FrameHeader(wire.FrameRelay, 9)
	f.Add(append(h[:], "pkt"...), false)
	h = wire.FrameHeader(wire.FrameProbe, 9)
	f.Add(append(h[:], make([]byte, 25)...), true)
	h = wire.FrameHeader(wire.FrameRelayCheck, 3)
	f.Add(h[:], false)
	f.Add([]byte{}, true)
	f.Add([]byte{0xff, 1}, false)
	u := openTest(f, true)
	u.StartDirect(context.Background(), DirectConfig{ID: 9, Key: probeKey(), Log: quiet})
	gw := netip.MustParseAddrPort("127.0.0.1:1")
	other := netip.MustParseAddrPort("192.0.2.1:5")
	f.Fuzz(func(t *testing.T, b []byte, fromGateway bool) {
		from := other
		if fromGateway {
			from = gw
		}
		var out []session.Inbound
		if u.handleFrame(b, from, &out) {
			if len(out) != 1 || out[0].ID != 9 && !fromGateway {
				t.Fatalf("delivered %+v from %v", out, from)
			}
			if len(b) < wire.FrameHeaderLen || !bytes.Equal(out[0].Data, b[wire.FrameHeaderLen:]) {
				t.Fatalf("delivered payload is not the frame's")
			}
		} else if len(out) != 0 {
			t.Fatalf("dropped but delivered %+v", out)
		}
	})
}

// A node's port is one dual-stack socket pair (Open's ":0"): the same
// port punches and carries a session's packets to an IPv4 peer and to an
// IPv6 peer, each way, through the steered frame socket (batched reads
// and writes) on both families.
func TestDualStackPort(t *testing.T) {
	u := openTestAt(t, true, ":0")
	if u.frames == nil {
		t.Skip("no steered frame socket")
	}
	for _, tc := range []struct {
		name, peer string
		id         uint64
	}{{"ipv4 peer", "127.0.0.1:0", 0x44}, {"ipv6 peer", "[::1]:0", 0x66}} {
		t.Run(tc.name, func(t *testing.T) {
			p := openTestAt(t, true, tc.peer)
			node := netip.AddrPortFrom(p.addr.Addr(), u.addr.Port()) // the node's port, in the peer's family
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			up := make(chan netip.AddrPort, 2)
			on := func(r netip.AddrPort, _ time.Duration) { up <- r }
			du := u.StartDirect(ctx, DirectConfig{ID: tc.id, Key: probeKey(), Peer: []netip.AddrPort{p.addr}, Log: quiet, OnDirect: on})
			dp := p.StartDirect(ctx, DirectConfig{ID: tc.id, Key: probeKey(), Peer: []netip.AddrPort{node}, Log: quiet, OnDirect: on})
			defer du.Stop()
			defer dp.Stop()
			for i := 0; i < 2; i++ {
				select {
				case r := <-up:
					if r != p.addr && r != node {
						t.Fatalf("direct path to %v, want %v or %v", r, p.addr, node)
					}
				case <-time.After(5 * time.Second):
					t.Fatal("no direct path")
				}
			}
			buf := make([]byte, 2048)
			for _, dir := range []struct {
				from, to *testPort
			}{{u, p}, {p, u}} {
				for i := 0; i < 32; i++ {
					pkt := bytes.Repeat([]byte{byte(i)}, wire.PeerPacketSize)
					dir.from.Conn.WriteTo(pkt, session.Addr(tc.id))
					dir.to.Conn.SetReadDeadline(time.Now().Add(3 * time.Second))
					k, from, err := dir.to.Conn.ReadFrom(buf)
					if err != nil {
						t.Fatalf("packet %d: %v", i, err)
					}
					if id, _ := session.IDOf(from); id != tc.id || !bytes.Equal(buf[:k], pkt) {
						t.Fatalf("packet %d: %d bytes for session %x", i, k, id)
					}
				}
			}
			if d := u.Drops(); d["path_send_failed"] != 0 || d["frame_queue_full"] != 0 {
				t.Fatalf("node port drops: %v", d)
			}
		})
	}
}

// Relay frames that stop passing after the last answered check (a firewall
// that lets the gateway connection through) are noticed by a prompt check
// (CheckRelaySoon, when a session is about to start) within
// relayPromptLapse, not relayCheckLapse: a peer handshake gives up after
// 10 s without a packet. A prompt check that is answered changes nothing.
func TestCheckRelaySoonNoticesBlockedFrames(t *testing.T) {
	u := openTest(t, true)
	gw, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	u.setGateway(gw.LocalAddr().(*net.UDPAddr).AddrPort())
	u.relay.kick()
	// echo answers the checks that reach the fake gateway for d, and says
	// how many came.
	echo := func(d time.Duration, answer bool) int {
		buf := make([]byte, 2048)
		n := 0
		for end := time.Now().Add(d); time.Now().Before(end); {
			gw.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			k, from, err := gw.ReadFromUDPAddrPort(buf)
			if err != nil || buf[0] != wire.FrameRelayCheck {
				continue
			}
			n++
			if answer {
				gw.WriteToUDPAddrPort(buf[:k], from)
			}
		}
		return n
	}
	for deadline := time.Now().Add(5 * time.Second); !u.RelayOverUDP(); {
		if time.Now().After(deadline) {
			t.Fatal("relay check never confirmed")
		}
		echo(200*time.Millisecond, true)
	}
	echo(500*time.Millisecond, true)

	// Answered: frames stay on UDP.
	u.CheckRelaySoon()
	if n := echo(relayPromptLapse+1500*time.Millisecond, true); n == 0 {
		t.Fatal("CheckRelaySoon sent no check")
	}
	if !u.RelayOverUDP() {
		t.Fatal("an answered prompt check turned UDP frames off")
	}

	// Frames stop passing: the prompt check goes unanswered.
	u.CheckRelaySoon()
	start := time.Now()
	if n := echo(100*time.Millisecond, false); n == 0 {
		t.Fatal("CheckRelaySoon sent no check")
	}
	for u.RelayOverUDP() {
		if time.Since(start) > relayCheckLapse/2 {
			t.Fatalf("relay frames still sent as UDP %v after an unanswered prompt check", time.Since(start).Round(time.Millisecond))
		}
		echo(100*time.Millisecond, false)
	}
}
