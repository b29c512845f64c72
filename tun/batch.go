package tun

import (
	"context"
	"sync"
	"sync/atomic"
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
	ch    chan []byte
	big   sync.Pool
	small sync.Pool
	drops atomic.Uint64
}

// NewBatchWriter returns a writer with room for queue packets in flight.
func (d *Device) NewBatchWriter(queue int) *BatchWriter {
	w := &BatchWriter{dev: d, ch: make(chan []byte, queue)}
	w.big.New = func() any { return make([]byte, 0, coalesceCap) }
	w.small.New = func() any { return make([]byte, 0, smallCap) }
	return w
}

func (w *BatchWriter) put(b []byte) {
	if cap(b) >= coalesceCap {
		w.big.Put(b[:0])
	} else if cap(b) == smallCap {
		w.small.Put(b[:0])
	}
}

// Write queues a copy of pkt. It never blocks: a full queue drops the
// packet, counted, as a full NIC ring would.
func (w *BatchWriter) Write(pkt []byte) {
	var b []byte
	if Offset+len(pkt) <= smallCap && len(pkt) < 512 {
		b = w.small.Get().([]byte)
	} else {
		b = w.big.Get().([]byte)
	}
	if cap(b) < Offset+len(pkt) {
		b = make([]byte, 0, Offset+len(pkt))
	}
	b = b[:Offset+len(pkt)]
	copy(b[Offset:], pkt)
	select {
	case w.ch <- b:
	default:
		w.drops.Add(1)
		w.put(b)
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
			w.put(b)
		}
		if err != nil && ctx.Err() == nil {
			// A packet the kernel refused (e.g. malformed) must not stop the
			// others; errors are per batch here, so count and go on.
			w.drops.Add(1)
		}
	}
}
