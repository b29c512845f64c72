package relay

import (
	"testing"
)

// BenchmarkHubForward is the gateway's per-frame relay cost: parse the
// header, find the route, count, queue for the other node.
func BenchmarkHubForward(b *testing.B) {
	h := quietHub()
	a, c := h.NewPeer("a", discard{}), h.NewPeer("b", discard{})
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
