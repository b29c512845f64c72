package quic

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go/internal/ackhandler"
	"github.com/quic-go/quic-go/internal/monotime"
	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/wire"
)

// Frames the run loop releases are taken by the next sends, hold the new
// payload only, and the free list keeps no more than its bound.
func TestDatagramQueueRecyclesFrames(t *testing.T) {
	q := newDatagramQueue(func() {}, 1024, utils.DefaultLogger, nil)
	// Not a multiple of releaseBatch: Peek must hand over the rest.
	const n = maxFreeDatagramFrames + 2*releaseBatch + 5
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
		f.DataLenPresent = false // as the packer leaves the last frame of a packet
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
		if !bytes.Equal(f.Data, short[i]) || !f.DataLenPresent {
			t.Fatalf("reused frame %d holds %v (length field %v), want %v with one", i, f.Data, f.DataLenPresent, short[i])
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

// A connection that has sent nothing for freeIdle gives its frames back,
// when its run loop next finds nothing queued; before that it keeps them.
func TestDatagramQueueIdleGivesFramesBack(t *testing.T) {
	q := newDatagramQueue(func() {}, 64, utils.DefaultLogger, nil)
	fs := make([]*wire.DatagramFrame, 10)
	ps := make([][]byte, len(fs))
	for i := range ps {
		ps[i] = []byte{byte(i)}
	}
	q.newFrames(fs, ps)
	for _, f := range fs {
		q.releaseFrame(f)
	}
	if q.Peek() != nil {
		t.Fatal("Peek on an empty queue returned a frame")
	}
	if len(q.free) != len(fs) || len(q.released) != 0 {
		t.Fatalf("after the first idle Peek: %d free, %d released; want %d, 0", len(q.free), len(q.released), len(fs))
	}
	q.Peek()
	if len(q.free) != len(fs) {
		t.Fatalf("a Peek right after sending gave frames back (%d free)", len(q.free))
	}
	q.lastFreed = monotime.Now().Add(-2 * freeIdle)
	q.Peek()
	if len(q.free) != 0 || q.freeHeld {
		t.Fatalf("idle for %v: %d frames still free", 2*freeIdle, len(q.free))
	}
}

// One goroutine sends while the run loop packs and releases, as in a
// connection: every payload comes out once, in order, intact (run with
// -race).
func TestDatagramQueueRecyclesWhileSending(t *testing.T) {
	q := newDatagramQueue(func() {}, 128, utils.DefaultLogger, nil)
	const n = 20000
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var fs [16]*wire.DatagramFrame
		ps := make([][]byte, len(fs))
		for i := 0; i < n; i += len(fs) {
			for j := range ps {
				ps[j] = []byte{byte(i + j), byte((i + j) >> 8), byte((i + j) >> 16)}
			}
			q.newFrames(fs[:], ps)
			if _, err := q.AddBatch(fs[:], -1); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	deadline := time.Now().Add(20 * time.Second)
	for got := 0; got < n; {
		f := q.Peek()
		if f == nil {
			if time.Now().After(deadline) {
				t.Fatalf("only %d of %d datagrams came through", got, n)
			}
			time.Sleep(time.Microsecond)
			continue
		}
		if v := int(f.Data[0]) | int(f.Data[1])<<8 | int(f.Data[2])<<16; len(f.Data) != 3 || v != got {
			t.Fatalf("datagram %d came out as %v", got, f.Data)
		}
		q.Pop()
		q.releaseFrame(f)
		got++
	}
	wg.Wait()
}
