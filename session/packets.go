package session

import (
	"sync"

	"github.com/nlvpn/nlvpn/wire"
)

// A received packet lives in a pooled buffer of TunMTU bytes, so that
// delivering one allocates nothing once the pool is warm.
var packetPool = sync.Pool{New: func() any { return new([wire.TunMTU]byte) }}

// getPacket returns a pooled buffer of n ≤ TunMTU bytes.
func getPacket(n int) []byte {
	return packetPool.Get().(*[wire.TunMTU]byte)[:n]
}

// ReleasePacket gives a packet that Start's recv was handed back for reuse.
// Call it once, when nothing refers to pkt any more; a slice that did not
// come from a session is ignored.
func ReleasePacket(pkt []byte) {
	if cap(pkt) != wire.TunMTU {
		return
	}
	packetPool.Put((*[wire.TunMTU]byte)(pkt[:wire.TunMTU]))
}
