package tun

import (
	"context"
	"sync"
	"sync/atomic"
)

// coalesceCap is the capacity of each write buffer: room for the kernel-side
// GRO to merge about a dozen TCP segments into the first one of a batch.
const coalesceCap = Offset + 16<<10

// BatchWriter collects packets from the tunnel and writes them to the
// device in batches. One write per batch instead of per packet, and TCP
// segments coalesced into large ones (GRO), is most of the cost of the
// receive path.
type BatchWriter struct {
	dev   *Device
	ch    chan []byte
	pool  sync.Pool
	drops atomic.Uint64
}

// NewBatchWriter returns a writer with room for queue packets in flight.
func (d *Device) NewBatchWriter(queue int) *BatchWriter {
	w := &BatchWriter{dev: d, ch: make(chan []byte, queue)}
	w.pool.New = func() any { return make([]byte, 0, coalesceCap) }
	return w
}

// Write queues a copy of pkt. It never blocks: a full queue drops the
// packet, counted, as a full NIC ring would.
func (w *BatchWriter) Write(pkt []byte) {
	b := w.pool.Get().([]byte)
	if cap(b) < Offset+len(pkt) {
		b = make([]byte, 0, Offset+len(pkt))
	}
	b = b[:Offset+len(pkt)]
	copy(b[Offset:], pkt)
	select {
	case w.ch <- b:
	default:
		w.drops.Add(1)
		w.pool.Put(b[:0])
	}
}

// Drops counts packets dropped on a full queue.
func (w *BatchWriter) Drops() uint64 { return w.drops.Load() }

// Run writes queued packets until ctx ends.
func (w *BatchWriter) Run(ctx context.Context) error {
	max := w.dev.BatchSize() * 2
	if max < 64 {
		max = 64
	}
	bufs := make([][]byte, 0, max)
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case b := <-w.ch:
			bufs = append(bufs[:0], b)
		}
	drain:
		for len(bufs) < max {
			select {
			case b := <-w.ch:
				bufs = append(bufs, b)
			default:
				break drain
			}
		}
		_, err := w.dev.Write(bufs)
		for _, b := range bufs {
			w.pool.Put(b[:0])
		}
		if err != nil && ctx.Err() == nil {
			// A packet the kernel refused (e.g. malformed) must not stop the
			// others; errors are per batch here, so count and go on.
			w.drops.Add(1)
		}
	}
}
