package quic

import (
	"testing"

	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/wire"
)

// Received datagrams that find the receive queue full are counted, and
// those queued before a handler is set are handed over by SetHandler, in
// order, with nothing counted twice.
func TestDatagramQueueCountsReceiveDrops(t *testing.T) {
	q := newDatagramQueue(func() {}, 0, utils.DefaultLogger, nil)
	const extra = 5
	for i := range maxDatagramRcvQueueLen + extra {
		q.HandleDatagramFrame(&wire.DatagramFrame{Data: []byte{byte(i)}})
	}
	if got := q.rcvDropped.Load(); got != extra {
		t.Fatalf("dropped %d datagrams, want %d", got, extra)
	}
	var handled int
	queued := q.SetHandler(func([]byte) { handled++ })
	if len(queued) != maxDatagramRcvQueueLen {
		t.Fatalf("SetHandler returned %d queued datagrams, want %d", len(queued), maxDatagramRcvQueueLen)
	}
	for i, d := range queued {
		if d[0] != byte(i) {
			t.Fatalf("queued datagram %d is %d", i, d[0])
		}
	}
	// With a handler, nothing is queued or dropped, however many arrive.
	for range 2 * maxDatagramRcvQueueLen {
		q.HandleDatagramFrame(&wire.DatagramFrame{Data: []byte{0}})
	}
	if handled != 2*maxDatagramRcvQueueLen || q.rcvDropped.Load() != extra {
		t.Fatalf("with a handler: %d handled, %d dropped; want %d, %d", handled, q.rcvDropped.Load(), 2*maxDatagramRcvQueueLen, extra)
	}
}

// ConnectionStats reports the receive drops of the connection's queue.
func TestConnectionStatsDatagramsDropped(t *testing.T) {
	c := &Conn{rttStats: utils.NewRTTStats(), datagramQueue: newDatagramQueue(func() {}, 0, utils.DefaultLogger, nil)}
	for range maxDatagramRcvQueueLen + 3 {
		c.datagramQueue.HandleDatagramFrame(&wire.DatagramFrame{Data: []byte{1}})
	}
	if got := c.ConnectionStats().DatagramsDropped; got != 3 {
		t.Fatalf("DatagramsDropped = %d, want 3", got)
	}
	if got := (&Conn{rttStats: utils.NewRTTStats()}).ConnectionStats().DatagramsDropped; got != 0 {
		t.Fatalf("a connection without a datagram queue: DatagramsDropped = %d", got)
	}
}
