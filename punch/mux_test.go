package punch

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

type muxRig struct {
	mux   *Mux
	sconn *session.Conn
	addr  netip.AddrPort // the mux's port
	peer  *net.UDPConn   // another node's socket
}

// startMux runs a Mux on a fresh 127.0.0.1 port, with the steered frame
// socket (steered) or through quic-go's non-QUIC queue.
func startMux(t *testing.T, steered bool) *muxRig {
	t.Helper()
	var qc, frames *net.UDPConn
	if steered {
		var err error
		qc, frames, err = platform.ListenUDPPair("127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		if frames == nil {
			qc.Close()
			t.Skip("kernel refused the steering program")
		}
	} else {
		var err error
		qc, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
	}
	tr := &quic.Transport{Conn: qc}
	sconn := session.NewConn(Blackhole{})
	m := NewMux(tr, frames, sconn)
	peer, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		tr.Close()
		qc.Close()
		if frames != nil {
			frames.Close()
		}
		peer.Close()
		sconn.Close()
	})
	return &muxRig{mux: m, sconn: sconn, addr: qc.LocalAddr().(*net.UDPAddr).AddrPort(), peer: peer}
}

// sendUntil sends b to the mux every 20 ms until ok() holds (quic-go's
// non-QUIC queue drops what arrives before the first read) or 3 s pass.
func (r *muxRig) sendUntil(t *testing.T, b []byte, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if _, err := r.peer.WriteToUDPAddrPort(b, r.addr); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
		if ok() {
			return
		}
	}
	t.Fatal("condition not reached within 3 s")
}

func forBothMuxModes(t *testing.T, f func(t *testing.T, r *muxRig)) {
	for _, steered := range []bool{true, false} {
		name := "non-QUIC queue"
		if steered {
			name = "steered frame socket"
		}
		t.Run(name, func(t *testing.T) { f(t, startMux(t, steered)) })
	}
}

func TestMuxAnswersProbe(t *testing.T) {
	forBothMuxModes(t, func(t *testing.T, r *muxRig) {
		const id = 0x1234
		p := New(Config{ID: id, Key: testKey(3), Send: r.mux.Send, Log: quiet})
		r.mux.Add(id, p)
		peerP := New(Config{ID: id, Key: testKey(3), Log: quiet})
		peerAddr := r.peer.LocalAddr().(*net.UDPAddr).AddrPort()

		got := make(chan []byte, 1)
		go func() {
			buf := make([]byte, 2048)
			r.peer.SetReadDeadline(time.Now().Add(4 * time.Second))
			n, err := r.peer.Read(buf)
			if err == nil {
				got <- buf[:n]
			}
			close(got)
		}()
		r.sendUntil(t, peerP.probe(probePing, 99), func() bool { h, _ := p.Stats(); return h > 0 })
		pong, ok := <-got
		if !ok {
			t.Fatal("no pong came back to the prober's socket")
		}
		kind, gotID, payload, err := wire.ParseFrame(pong)
		if err != nil || kind != wire.FrameProbe || gotID != id {
			t.Fatalf("reply: kind %d id %x err %v", kind, gotID, err)
		}
		if err := peerP.Handle(pong[:wire.FrameHeaderLen], payload, r.addr); err != nil {
			t.Fatalf("pong does not verify: %v", err)
		}
		if c := p.Candidates(); len(c) != 1 || c[0] != peerAddr {
			t.Fatalf("prober's address not learned: %v, want %v", c, peerAddr)
		}
	})
}

func TestMuxDeliversDirectFrames(t *testing.T) {
	forBothMuxModes(t, func(t *testing.T, r *muxRig) {
		const id = 0xabcdef
		r.mux.Add(id, New(Config{ID: id, Key: testKey(3), Log: quiet}))
		pkt := []byte("a QUIC packet of the peer session")
		frame := wire.AppendFrameHeader(nil, wire.FrameDirect, id)
		frame = append(frame, pkt...)

		read := make(chan struct {
			b    []byte
			addr net.Addr
		}, 1)
		go func() {
			buf := make([]byte, 2048)
			r.sconn.SetReadDeadline(time.Now().Add(4 * time.Second))
			n, addr, err := r.sconn.ReadFrom(buf)
			if err == nil {
				read <- struct {
					b    []byte
					addr net.Addr
				}{buf[:n], addr}
			}
			close(read)
		}()
		var res struct {
			b    []byte
			addr net.Addr
		}
		var okRead bool
		r.sendUntil(t, frame, func() bool {
			select {
			case res, okRead = <-read:
				return true
			default:
				return false
			}
		})
		if !okRead {
			t.Fatal("session.Conn read failed")
		}
		if string(res.b) != string(pkt) {
			t.Fatalf("session got %q, want %q", res.b, pkt)
		}
		if res.addr != session.Addr(id) {
			t.Fatalf("session got it from %v, want %v", res.addr, session.Addr(id))
		}
	})
}

func TestMuxCountsDrops(t *testing.T) {
	forBothMuxModes(t, func(t *testing.T, r *muxRig) {
		const id = 77
		p := New(Config{ID: id, Key: testKey(3), Send: r.mux.Send, Log: quiet})
		r.mux.Add(id, p)

		unknown := wire.AppendFrameHeader(nil, wire.FrameDirect, 78)
		unknown = append(unknown, "x"...)
		r.sendUntil(t, unknown, func() bool { u, _ := r.mux.Drops(); return u > 0 })

		short := []byte{wire.FrameDirect, 0, 0}
		r.sendUntil(t, short, func() bool { _, m := r.mux.Drops(); return m > 0 })

		// A relay frame never comes straight over UDP.
		relay := wire.AppendFrameHeader(nil, wire.FrameRelay, id)
		_, m0 := r.mux.Drops()
		r.sendUntil(t, relay, func() bool { _, m := r.mux.Drops(); return m > m0 })

		// After Remove the session's frames are unknown.
		r.mux.Remove(id, New(Config{ID: id})) // not the registered one: no effect
		probe := p.probe(probePing, 5)
		r.sendUntil(t, probe, func() bool { h, _ := p.Stats(); return h > 0 })
		r.mux.Remove(id, p)
		u0, _ := r.mux.Drops()
		r.sendUntil(t, probe, func() bool { u, _ := r.mux.Drops(); return u > u0 })
		if inFull, _ := r.sconn.Drops(); inFull != 0 {
			t.Fatalf("session queue drops %d", inFull)
		}
	})
}

func TestPathSendFramesDirect(t *testing.T) {
	r := startMux(t, true)
	path := &Path{Mux: r.mux, Remote: r.peer.LocalAddr().(*net.UDPAddr).AddrPort()}
	if err := path.Send(5, []byte("payload")); err != nil {
		t.Fatal(err)
	}
	r.peer.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 2048)
	n, from, err := r.peer.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatal(err)
	}
	if from.Port() != r.addr.Port() {
		t.Fatalf("direct frame left from port %d, not the node's shared port %d", from.Port(), r.addr.Port())
	}
	kind, id, payload, err := wire.ParseFrame(buf[:n])
	if err != nil || kind != wire.FrameDirect || id != 5 || string(payload) != "payload" {
		t.Fatalf("got kind %d id %d payload %q err %v", kind, id, payload, err)
	}
}
