package ackhandler

import (
	"testing"

	"github.com/quic-go/quic-go/internal/protocol"
	"github.com/quic-go/quic-go/internal/wire"
)

// A connection with one or two packets in flight at a time (and packet
// numbers skipped now and then) sends and acknowledges without the history
// allocating, and the history stays right.
func TestSentPacketHistoryReusesItsArray(t *testing.T) {
	h := newSentPacketHistory()
	pkts := [4]*packet{}
	for i := range pkts {
		pkts[i] = &packet{Frames: []Frame{{Frame: &wire.PingFrame{}}}}
	}
	pn := protocol.PacketNumber(0)
	step := func() {
		gap := protocol.PacketNumber(1)
		if pn%7 == 0 {
			gap = 3 // two skipped packet numbers
		}
		prev := pn
		pn += gap
		h.SentPacket(pn, pkts[pn%4])
		if prev > 0 {
			if err := h.Remove(prev); err != nil {
				t.Fatal(err)
			}
		}
		if got := h.FirstPacketNumber(); got != pn {
			t.Fatalf("first packet number %d, want %d", got, pn)
		}
		if h.numOutstanding != 1 {
			t.Fatalf("%d outstanding, want 1", h.numOutstanding)
		}
	}
	for range 100 {
		step()
	}
	// One run of 1000 packets, so that an array made now and then counts.
	if allocs := testing.AllocsPerRun(1, func() {
		for range 1000 {
			step()
		}
	}); allocs != 0 {
		t.Fatalf("%v allocations in 1000 packets sent and acknowledged", allocs)
	}
	if cap(h.store) > 32 {
		t.Fatalf("the history's array grew to %d entries for two in flight", cap(h.store))
	}
}
