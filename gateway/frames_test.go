package gateway

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/relay"
	"github.com/nlvpn/nlvpn/wire"
)

type nopDatagrams struct{}

func (nopDatagrams) SendDatagram([]byte) error { return nil }
func (nopDatagrams) RemoteAddr() net.Addr      { return nil }

// relayRig is the gateway's frame socket serving a route between two
// loopback "nodes".
type relayRig struct {
	g      *Gateway
	gw     netip.AddrPort
	a, b   *net.UDPConn
	cancel func()
}

func startRelayRig(tb testing.TB) *relayRig {
	tb.Helper()
	st, err := OpenState(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	auth, err := LoadAuthority(st.Dir)
	if err != nil {
		tb.Fatal(err)
	}
	g, err := New(Config{State: st, Authority: auth.Public(), Listen: "127.0.0.1:0", Log: quietLog()})
	if err != nil {
		tb.Fatal(err)
	}
	uc, frames, err := platform.ListenUDPPair("127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	if frames == nil {
		uc.Close()
		tb.Skip("kernel refused the steering program")
	}
	tr := &quic.Transport{Conn: uc}
	ctx, cancel := context.WithCancel(context.Background())
	done, err := g.serveFrames(ctx, tr, frames)
	if err != nil {
		tb.Fatal(err)
	}
	r := &relayRig{g: g, gw: uc.LocalAddr().(*net.UDPAddr).AddrPort()}
	for _, c := range []**net.UDPConn{&r.a, &r.b} {
		if *c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			tb.Fatal(err)
		}
		(*c).SetReadBuffer(4 << 20)
	}
	var tok [relay.CheckTokenLen]byte
	tok[0] = 7
	pa := g.hub.NewPeer("client/a", r.a.LocalAddr().(*net.UDPAddr).AddrPort(), tok, nopDatagrams{})
	pb := g.hub.NewPeer("agent/b", r.b.LocalAddr().(*net.UDPAddr).AddrPort(), tok, nopDatagrams{})
	if err := g.hub.Bind(42, pa, pb); err != nil {
		tb.Fatal(err)
	}
	// b checks, so frames to it go as UDP.
	h := wire.FrameHeader(wire.FrameRelayCheck, 1)
	check := append(h[:], tok[:]...)
	buf := make([]byte, 64)
	for i := 0; ; i++ {
		r.b.WriteToUDPAddrPort(check, r.gw)
		r.b.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := r.b.Read(buf); err == nil {
			break
		}
		if i > 30 {
			tb.Fatal("relay check not answered")
		}
	}
	r.b.SetReadDeadline(time.Time{})
	r.cancel = func() {
		cancel()
		<-done
		tr.Close()
		uc.Close()
		r.a.Close()
		r.b.Close()
		pa.Close()
		pb.Close()
	}
	tb.Cleanup(r.cancel)
	return r
}

// BenchmarkRelayUDP is the gateway's relay on its socket: a full-size
// frame from one node, read in a batch, matched to its route, written to
// the other node in a batch; one op is one frame.
func BenchmarkRelayUDP(b *testing.B) {
	r := startRelayRig(b)
	frame := relay.Frame(42, make([]byte, 1406))
	buf := make([]byte, 2048)
	b.SetBytes(int64(len(frame)))
	b.ReportAllocs()
	b.ResetTimer()
	lost := 0
	for i := 0; i < b.N; i += 16 {
		k := min(16, b.N-i)
		for j := 0; j < k; j++ {
			r.a.WriteToUDPAddrPort(frame, r.gw)
		}
		if i%4096 == 0 {
			r.b.SetReadDeadline(time.Now().Add(2 * time.Second)) // now and then: a timer allocates
		}
		for j := 0; j < k; j++ {
			if _, err := r.b.Read(buf); err != nil {
				lost += k - j
				break
			}
		}
	}
	b.StopTimer()
	if lost > 0 {
		b.ReportMetric(float64(lost), "lost")
	}
}
