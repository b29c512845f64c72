package tun

import (
	"bytes"
	"context"
	"encoding/binary"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/batchq"
)

// Write buffers. Every packet is queued in a buffer of Offset plus the
// device's MTU (the largest packet the tunnel delivers; a larger one gets a
// buffer of its own size). The device coalesces consecutive TCP segments of
// a flow into the first one of a batch (GRO), which needs room to grow:
// when a batch is written, the first packet of each run of one flow's
// segments is moved into a head buffer (headCap) first. So only heads, at
// most maxHeads per write, are big; a queue full of packets holds ~1.4 KiB
// each at the client's MTU (1368: Go's 1408-byte size class; 2 KiB
// buffers took its 2304-byte class, 1.6 times the memory).
//
// A head is 64 KiB, not Offset+65535, so that it takes eight whole pages
// rather than nine: wireguard-go's GRO leaves room for two Offsets, so a
// head still takes 65504 bytes of packet, 49 segments at the client's MSS.
const (
	headCap  = 64 << 10
	maxHeads = 32
	// defaultPacketRoom is a packet buffer's room on a device whose MTU
	// is not known (a Device made in a test).
	defaultPacketRoom = 2048
)

// BatchWriter collects packets from the tunnel and writes them to the
// device in batches. One write per batch instead of per packet, and TCP
// segments coalesced into large ones (GRO), is most of the cost of the
// receive path.
//
// A packet that comes after a pause (IdleGap without one), with nothing
// queued or being written, is written at once by its producer instead: a
// lone packet (a ping reply, a keystroke's echo) then costs no wake-up of
// Run, which on an idle machine is tens of microseconds. Under load packets
// come closer together and are batched as before.
type BatchWriter struct {
	dev   *Device
	q     *batchq.Q[[]byte]
	small freeList
	heads [][]byte // head buffers, used by Run only
	drops atomic.Uint64
	done  atomic.Bool // Run returned: nothing waits for room any more

	// wmu is held around every write to the device (Run's batches and a
	// producer's direct write), which must not overlap.
	wmu     sync.Mutex
	running atomic.Bool  // Run is running: without it nothing is written directly either
	unsent  atomic.Int64 // packets queued (or being queued) and not yet written
	epoch   time.Time
	// last is when the writer was last busy, ns since epoch: when Run
	// last wrote a batch or a packet last found nothing queued. A packet
	// queued behind others is written by a batch that ends after it came,
	// so this is never before the last packet came.
	last    atomic.Int64
	one     [1][]byte // a direct write's batch; under wmu
	directs atomic.Uint64
}

// IdleGap is the pause after which a packet is written by its producer at
// once rather than queued for Run.
const IdleGap = time.Millisecond

// freeList keeps packet buffers for reuse, at most max of them: a burst
// that needed more leaves the rest to the garbage collector instead of
// holding them for good. (A sync.Pool of slices would allocate on every
// Put.)
type freeList struct {
	mu   sync.Mutex
	bufs [][]byte
	size int
	max  int
}

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
	if len(f.bufs) < f.max {
		f.bufs = append(f.bufs, b[:0])
	}
	f.mu.Unlock()
}

// putAll returns the packet buffers among bufs under one lock (Run gives a
// whole written batch back at once).
func (f *freeList) putAll(bufs [][]byte) {
	f.mu.Lock()
	for _, b := range bufs {
		if cap(b) == f.size && len(f.bufs) < f.max {
			f.bufs = append(f.bufs, b[:0])
		}
	}
	f.mu.Unlock()
}

// NewBatchWriter returns a writer with room for queue packets in flight.
func (d *Device) NewBatchWriter(queue int) *BatchWriter {
	room := d.mtu
	if room <= 0 {
		room = defaultPacketRoom
	}
	// Under load a full queue waits while Run writes the batch it took,
	// as many again: the free list keeps enough buffers for both. With
	// room for only one queue's worth (1024), a download threw away and
	// made anew 10,000 buffers in 4 s (14 MB, 22 % of the client's
	// allocations), which the garbage collector paid for.
	return &BatchWriter{dev: d, q: batchq.New[[]byte](queue), small: freeList{size: Offset + room, max: 2 * queue}, epoch: time.Now()}
}

// WriteWait is how the tunnel's packets arrive: when the queue is full it
// waits, at most MaxWait, for the device to take it, holding back the
// session that delivers them (and through its queues the sender at the
// other end, whose TCP window then closes) instead of dropping at once.
func (w *BatchWriter) WriteWait(pkt []byte) { w.write(pkt, MaxWait) }

// MaxWait bounds WriteWait's wait for room.
const MaxWait = 50 * time.Millisecond

// Write queues a copy of pkt. It never blocks: a full queue drops the
// packet, counted, as a full NIC ring would.
func (w *BatchWriter) Write(pkt []byte) { w.write(pkt, 0) }

func (w *BatchWriter) write(pkt []byte, wait time.Duration) {
	var b []byte
	if Offset+len(pkt) <= w.small.size {
		b = w.small.get()
	} else {
		b = make([]byte, 0, Offset+len(pkt)) // beyond any MTU we set; rare
	}
	b = b[:Offset+len(pkt)]
	copy(b[Offset:], pkt)
	// The clock is read only when nothing waits to be written: under load
	// packets are queued behind others, and a clock read per packet was
	// 3 % of the client's CPU in a download.
	if w.running.Load() && w.unsent.Load() == 0 && w.idleNow() && w.wmu.TryLock() {
		// Checked again under wmu: Run counts a batch written only
		// after writing it, so 0 means nothing is waiting that this
		// packet would overtake.
		if w.unsent.Load() == 0 {
			w.one[0] = b
			if _, err := w.dev.Write(w.one[:]); err != nil {
				w.drops.Add(1)
			}
			w.one[0] = nil
			w.wmu.Unlock()
			w.directs.Add(1)
			w.recycle(b)
			return
		}
		w.wmu.Unlock()
	}
	w.unsent.Add(1)
	ok := false
	if wait > 0 && !w.done.Load() {
		ok = w.q.PutWait(b, wait)
	} else {
		ok = w.q.Put(b)
	}
	if !ok {
		w.unsent.Add(-1)
		w.drops.Add(1)
		w.recycle(b)
	}
}

// recycle takes a buffer back after its packet was written (or dropped).
func (w *BatchWriter) recycle(b []byte) {
	switch cap(b) {
	case w.small.size:
		w.small.put(b)
	case headCap:
		w.heads = append(w.heads, b[:0])
	}
}

// Drops counts packets dropped on a full queue.
func (w *BatchWriter) Drops() uint64 { return w.drops.Load() }

// Run writes queued packets until ctx ends.
func (w *BatchWriter) Run(ctx context.Context) error {
	defer w.done.Store(true)
	w.running.Store(true)
	defer w.running.Store(false)
	// Never more than BatchSize packets per Write on a device with
	// offloads: its GRO tables hold items for that many flows per call,
	// and wireguard-go's tun panics on a batch with more distinct TCP
	// flows than that. Without offloads (BatchSize 1) there are no tables
	// and the device writes packet by packet whatever the batch.
	max := w.dev.BatchSize()
	if max <= 1 {
		max = 64
	}
	var batch [][]byte
	for {
		var err error
		if batch, err = w.q.Take(ctx, batch); err != nil {
			return err
		}
		w.wmu.Lock()
		for bufs := batch; len(bufs) > 0; {
			n := min(len(bufs), max)
			w.promoteHeads(bufs[:n])
			_, err := w.dev.Write(bufs[:n])
			w.unsent.Add(-int64(n))
			w.small.putAll(bufs[:n])
			for _, b := range bufs[:n] {
				if cap(b) == headCap {
					w.heads = append(w.heads, b[:0])
				}
			}
			if err != nil && ctx.Err() == nil {
				// A packet the kernel refused (e.g. malformed) must not stop
				// the others; errors are per batch here, so count and go on.
				w.drops.Add(1)
			}
			bufs = bufs[n:]
		}
		w.last.Store(int64(time.Since(w.epoch)))
		w.wmu.Unlock()
	}
}

// idleNow reports whether IdleGap has passed since the writer was last
// busy, and marks it busy now.
func (w *BatchWriter) idleNow() bool {
	now := int64(time.Since(w.epoch))
	return now-w.last.Swap(now) >= int64(IdleGap)
}

// promoteHeads moves the first segment of each run of TCP segments that
// the device can coalesce (one flow, consecutive sequence numbers, no PSH
// before the last) into a head buffer with room for the whole run. A run
// of one needs none; at most maxHeads are made per batch. The packet
// buffer a head leaves goes back to the free list.
func (w *BatchWriter) promoteHeads(bufs [][]byte) {
	used := 0
	head := -1 // index of the current run's first segment, -1: none
	promoted := false
	var key [36]byte
	var keyLen int
	var next uint32
	var psh bool
	for i, b := range bufs {
		seg, ok := parseTCP(b[Offset:])
		if !ok {
			head = -1
			continue
		}
		if head >= 0 && !psh && seg.seq == next && keyLen == len(seg.key) && bytes.Equal(key[:keyLen], seg.key) {
			// Continues the run: its head must be able to grow.
			if !promoted && used < maxHeads && cap(bufs[head]) == w.small.size {
				bufs[head] = w.toHead(bufs[head])
				used++
				promoted = true
			}
			next += seg.payload
			psh = seg.psh
			continue
		}
		head, promoted = i, false
		keyLen = copy(key[:], seg.key)
		next = seg.seq + seg.payload
		psh = seg.psh
	}
}

// toHead copies a queued packet into a head buffer and frees its own.
func (w *BatchWriter) toHead(b []byte) []byte {
	var h []byte
	if n := len(w.heads); n > 0 {
		h, w.heads = w.heads[n-1], w.heads[:n-1]
	} else {
		h = make([]byte, 0, headCap)
	}
	h = append(h[:0], b...)
	w.small.put(b)
	return h
}

// tcpSeg is what promoteHeads reads of a TCP segment.
type tcpSeg struct {
	key     []byte // addresses and ports, in place in the packet
	seq     uint32
	payload uint32
	psh     bool
}

// parseTCP reads a TCP segment that the device could coalesce: IPv4
// without options or IPv6, flags ACK or ACK+PSH, some payload.
func parseTCP(pkt []byte) (tcpSeg, bool) {
	var iph int
	switch {
	case len(pkt) >= 40 && pkt[0] == 0x45 && pkt[9] == 6:
		iph = 20
		if int(binary.BigEndian.Uint16(pkt[2:4])) != len(pkt) {
			return tcpSeg{}, false
		}
	case len(pkt) >= 60 && pkt[0]>>4 == 6 && pkt[6] == 6:
		iph = 40
	default:
		return tcpSeg{}, false
	}
	tcph := int(pkt[iph+12]>>4) * 4
	flags := pkt[iph+13]
	if tcph < 20 || len(pkt) <= iph+tcph || (flags != 0x10 && flags != 0x18) {
		return tcpSeg{}, false
	}
	var key []byte
	if iph == 20 {
		key = pkt[12:24] // addresses, then ports
	} else {
		key = pkt[8:44]
	}
	return tcpSeg{key: key, seq: binary.BigEndian.Uint32(pkt[iph+4:]), payload: uint32(len(pkt) - iph - tcph), psh: flags&0x08 != 0}, true
}
