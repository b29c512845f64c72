package punch

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// A burst of direct frames, full-size with shorter ones mixed in, goes out
// through the batch writer (GSO runs where the kernel can): every frame
// arrives whole, as its own datagram, in order.
func TestPathSendBurstArrivesWholeInOrder(t *testing.T) {
	r := startMux(t, true)
	r.peer.SetReadBuffer(8 << 20)
	path := &Path{Mux: r.mux, Remote: netip.MustParseAddrPort(r.peer.LocalAddr().String())}
	const n = 500
	sizeOf := func(i int) int {
		if i%37 == 36 {
			return 100 + i // a short one ends a GSO run
		}
		return 1400
	}
	for i := 0; i < n; i++ {
		pkt := make([]byte, sizeOf(i))
		binary.BigEndian.PutUint32(pkt, uint32(i))
		for j := 4; j < len(pkt); j++ {
			pkt[j] = byte(i + j)
		}
		if err := path.Send(9, pkt); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	buf := make([]byte, 65536)
	for i := 0; i < n; i++ {
		r.peer.SetReadDeadline(time.Now().Add(3 * time.Second))
		k, err := r.peer.Read(buf)
		if err != nil {
			t.Fatalf("after %d frames: %v", i, err)
		}
		_, id, p, err := wire.ParseFrame(buf[:k])
		if err != nil || id != 9 {
			t.Fatalf("frame %d: id %d err %v", i, id, err)
		}
		if len(p) != sizeOf(i) || binary.BigEndian.Uint32(p) != uint32(i) {
			t.Fatalf("frame %d: got %d bytes, seq %d; want %d bytes, seq %d", i, len(p), binary.BigEndian.Uint32(p), sizeOf(i), i)
		}
		for j := 4; j < len(p); j++ {
			if p[j] != byte(i+j) {
				t.Fatalf("frame %d corrupted at byte %d", i, j)
			}
		}
	}
	t.Logf("%d GSO writes for %d frames", r.mux.gsoWrites.Load(), n)
}
