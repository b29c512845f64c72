package quic

import (
	"bytes"
	"testing"

	"github.com/quic-go/quic-go/internal/ackhandler"
	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/wire"
)

// Frames the run loop releases are taken by the next sends, hold the new
// payload only, and the free list keeps no more than its bound.
func TestDatagramQueueRecyclesFrames(t *testing.T) {
	q := newDatagramQueue(func() {}, 1024, utils.DefaultLogger, nil)
	const n = maxFreeDatagramFrames + 2*releaseBatch
	ps := make([][]byte, n)
	for i := range ps {
		ps[i] = bytes.Repeat([]byte{byte(i)}, 1+i%100)
	}
	first := make([]*wire.DatagramFrame, n)
	q.newFrames(first, ps)
	sent := make(map[*wire.DatagramFrame]bool, n)
	for i, f := range first {
		if !bytes.Equal(f.Data, ps[i]) || !f.DataLenPresent {
			t.Fatalf("frame %d holds %v, want %v", i, f.Data, ps[i])
		}
		sent[f] = true
		q.releaseFrames([]ackhandler.Frame{{Frame: f}})
	}
	// Peek hands what is still collected to the free list, as the run
	// loop does whenever it takes queued frames.
	if err := q.Add(getDatagramFrame([]byte{1}), 0); err != nil {
		t.Fatal(err)
	}
	q.Peek()
	q.Pop()
	if len(q.free) != maxFreeDatagramFrames || len(q.released) != 0 {
		t.Fatalf("free list holds %d frames (%d released), want %d", len(q.free), len(q.released), maxFreeDatagramFrames)
	}
	again := make([]*wire.DatagramFrame, 3)
	short := [][]byte{{7}, {8, 8}, {9, 9, 9}}
	q.newFrames(again, short)
	for i, f := range again {
		if !sent[f] {
			t.Fatalf("frame %d is new, not one the run loop released", i)
		}
		if !bytes.Equal(f.Data, short[i]) {
			t.Fatalf("reused frame %d holds %v, want %v", i, f.Data, short[i])
		}
	}
	if len(q.free) != maxFreeDatagramFrames-3 {
		t.Fatalf("free list holds %d frames after taking 3, want %d", len(q.free), maxFreeDatagramFrames-3)
	}
}

// A frame that grew beyond a packet buffer (an oversized payload) is not
// kept.
func TestDatagramQueueDropsGrownFrames(t *testing.T) {
	q := newDatagramQueue(func() {}, 8, utils.DefaultLogger, nil)
	fs := make([]*wire.DatagramFrame, 1)
	q.newFrames(fs, [][]byte{make([]byte, 4000)})
	q.releaseFrame(fs[0])
	if len(q.released) != 0 {
		t.Fatal("a grown frame was kept for reuse")
	}
}
