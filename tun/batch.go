package tun

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/nlvpn/nlvpn/batchq"
)

// Write buffers come in two sizes. A packet that carries data may become
// the first of a run of TCP segments that the device coalesces (GRO), so
// its buffer has room for about a dozen more; a small one (a pure ACK, a
// DNS answer) is never merged into, and a big buffer for it would only
// hold memory while it waits.
const (
	coalesceCap = Offset + 16<<10
	smallCap    = Offset + 576
)

// BatchWriter collects packets from the tunnel and writes them to the
// device in batches. One write per batch instead of per packet, and TCP
// segments coalesced into large ones (GRO), is most of the cost of the
// receive path.
type BatchWriter struct {
	dev   *Device
	q     *batchq.Q[[]byte]
	big   freeList
	small freeList
	drops atomic.Uint64
}

// freeList keeps write buffers of one size class for reuse, at most
// freeListMax of them: a burst that needed more leaves the rest to the
// garbage collector instead of holding them for good. (A sync.Pool of
// slices would allocate on every Put.)
type freeList struct {
	mu   sync.Mutex
	bufs [][]byte
	size int
}

const freeListMax = 128

func (f *freeList) get() []byte {
	f.mu.Lock()
	if n := len(f.bufs); n > 0 {
		b := f.bufs[n-1]
		f.bufs = f.bufs[:n-1]
		f.mu.Unlock()
		return b
	}
	f.mu.Unlock()
	return make([]byte, 0, f.size)
}

func (f *freeList) put(b []byte) {
	f.mu.Lock()
	if len(f.bufs) < freeListMax {
		f.bufs = append(f.bufs, b[:0])
	}
	f.mu.Unlock()
}

// NewBatchWriter returns a writer with room for queue packets in flight.
func (d *Device) NewBatchWriter(queue int) *BatchWriter {
	return &BatchWriter{dev: d, q: batchq.New[[]byte](queue), big: freeList{size: coalesceCap}, small: freeList{size: smallCap}}
}

func (w *BatchWriter) put(b []byte) {
	switch cap(b) {
	case coalesceCap:
		w.big.put(b)
	case smallCap:
		w.small.put(b)
	}
}

// Write queues a copy of pkt. It never blocks: a full queue drops the
// packet, counted, as a full NIC ring would.
func (w *BatchWriter) Write(pkt []byte) {
	var b []byte
	switch {
	case Offset+len(pkt) <= smallCap && len(pkt) < 512:
		b = w.small.get()
	case Offset+len(pkt) <= coalesceCap:
		b = w.big.get()
	default:
		b = make([]byte, 0, Offset+len(pkt))
	}
	b = b[:Offset+len(pkt)]
	copy(b[Offset:], pkt)
	if !w.q.Put(b) {
		w.drops.Add(1)
		w.put(b)
	}
}

// Drops counts packets dropped on a full queue.
func (w *BatchWriter) Drops() uint64 { return w.drops.Load() }

// Run writes queued packets until ctx ends.
func (w *BatchWriter) Run(ctx context.Context) error {
	max := max(w.dev.BatchSize()*2, 64)
	var batch [][]byte
	for {
		var err error
		if batch, err = w.q.Take(ctx, batch); err != nil {
			return err
		}
		for bufs := batch; len(bufs) > 0; {
			n := min(len(bufs), max)
			_, err := w.dev.Write(bufs[:n])
			for _, b := range bufs[:n] {
				w.put(b)
			}
			if err != nil && ctx.Err() == nil {
				// A packet the kernel refused (e.g. malformed) must not stop
				// the others; errors are per batch here, so count and go on.
				w.drops.Add(1)
			}
			bufs = bufs[n:]
		}
	}
}
