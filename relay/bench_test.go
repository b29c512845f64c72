package relay

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// BenchmarkHubForward is the gateway's per-frame relay cost: parse the
// header, find the route, count, queue for the other node.
func BenchmarkHubForward(b *testing.B) {
	h := quietHub()
	a, c := h.NewPeer("a", netip.AddrPort{}, noToken, discard{}), h.NewPeer("b", netip.AddrPort{}, noToken, discard{})
	defer a.Close()
	defer c.Close()
	if err := h.Bind(42, a, c); err != nil {
		b.Fatal(err)
	}
	frame := Frame(42, make([]byte, 1400))
	b.SetBytes(int64(len(frame)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		h.Forward(a, frame)
	}
}

// BenchmarkHubHandleUDP is the per-frame cost of the relay's UDP path:
// parse the header, find the route, check the source address, count,
// queue the frame for the other node's address. The clock is read once
// per 16 frames, as the gateway reads it once per batch it reads.
func BenchmarkHubHandleUDP(b *testing.B) {
	h := quietHub()
	w := &countWriter{}
	h.SetUDP(w)
	aAddr, cAddr := netip.MustParseAddrPort("198.18.2.2:40000"), netip.MustParseAddrPort("198.18.3.2:40001")
	a, c := h.NewPeer("a", aAddr, noToken, discard{}), h.NewPeer("b", cAddr, noToken, discard{})
	defer a.Close()
	defer c.Close()
	if err := h.Bind(42, a, c); err != nil {
		b.Fatal(err)
	}
	check := wire.FrameHeader(wire.FrameRelayCheck, 7)
	h.HandleUDP(cAddr, append(check[:], noToken[:]...)) // c's frames go as UDP
	frame := Frame(42, make([]byte, 1400))
	b.SetBytes(int64(len(frame)))
	b.ReportAllocs()
	var now int64
	for i := 0; i < b.N; i++ {
		if i%16 == 0 {
			now = time.Now().UnixNano()
		}
		h.HandleUDPAt(aAddr, frame, now)
	}
	if w.n.Load() < int64(b.N) {
		b.Fatalf("%d of %d frames forwarded", w.n.Load(), b.N)
	}
}

// countWriter counts what the hub writes; its queue is never congested.
type countWriter struct{ n atomic.Int64 }

func (w *countWriter) Queued() int { return 0 }
func (w *countWriter) Cap() int    { return 2048 }

func (w *countWriter) Write(netip.AddrPort, []byte) bool          { w.n.Add(1); return true }
func (w *countWriter) WriteWait(to netip.AddrPort, b []byte) bool { return w.Write(to, b) }
