package udpbatch

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Writer queues datagrams from any number of goroutines and writes them
// from one, in batches: consecutive datagrams to one address and of one
// size join a train that goes out as one GSO write, and the trains of a
// batch go out in one sendmmsg. Write copies the datagram and never
// blocks: a full queue drops it and counts, as a full NIC queue would.
type Writer struct {
	c *Conn

	mu      sync.Mutex
	pending []*train // filled by Write, taken whole by Run
	spare   []*train // the other half of the double buffer
	free    []*train // trains to reuse
	trains  int      // trains allocated
	queued  int      // datagrams in pending
	asleep  bool     // Run waits for wake
	busy    bool     // Run is writing a batch
	wake    chan struct{}
	room    chan struct{} // capacity 1: "Run took the queue"

	maxQueued, maxTrains int

	drops atomic.Uint64
	msgs  []Message
}

// train is a run of datagrams to one address, back to back in buf, all of
// size seg but the last, which may be shorter and then ends the train.
type train struct {
	buf    []byte
	seg    int
	n      int
	to     netip.AddrPort
	closed bool
}

// Sizes of the write queue. A train holds up to trainBytes (about twenty
// full-size datagrams, enough for GSO to pay off); the queue holds at most
// QueueLen datagrams in at most maxTrains trains, which bounds its memory
// to maxTrains × trainBytes (4 MiB) however the traffic is mixed.
const (
	trainBytes = 32 << 10
	maxTrains  = 128
	// QueueLen is how many datagrams may wait for the socket.
	QueueLen = 2048
)

// NewWriter returns a Writer for c; Run sends what it queues.
func NewWriter(c *Conn) *Writer {
	return &Writer{c: c, wake: make(chan struct{}, 1), room: make(chan struct{}, 1), maxQueued: QueueLen, maxTrains: maxTrains,
		msgs: make([]Message, 0, maxTrains)}
}

// Write queues one datagram b to to. It reports false if the queue was
// full and the datagram was dropped.
func (w *Writer) Write(to netip.AddrPort, b []byte) bool { return w.Write2(to, nil, b) }

// Write2 queues one datagram made of head followed by body (a frame header
// and the packet it carries), copying both.
func (w *Writer) Write2(to netip.AddrPort, head, body []byte) bool {
	return w.write(to, head, body, 0)
}

// MaxWait bounds how long Write2Wait waits for room.
const MaxWait = 50 * time.Millisecond

// Write2Wait is Write2 for a producer that may be held back: when the queue
// is full it waits, at most MaxWait, for the writer to take it, as a
// blocking socket write would, instead of dropping at once. A peer
// session's QUIC stack writes its packets this way, so that a burst it
// makes faster than the socket takes them slows it down rather than
// turning into loss.
func (w *Writer) Write2Wait(to netip.AddrPort, head, body []byte) bool {
	return w.write(to, head, body, MaxWait)
}

func (w *Writer) write(to netip.AddrPort, head, body []byte, wait time.Duration) bool {
	size := len(head) + len(body)
	if size == 0 || size > MaxTrain {
		w.drops.Add(1)
		return false
	}
	w.mu.Lock()
	if w.full() && wait > 0 {
		deadline := time.NewTimer(wait)
		for w.full() {
			w.mu.Unlock()
			select {
			case <-w.room:
			case <-deadline.C:
				w.drops.Add(1)
				return false
			}
			w.mu.Lock()
		}
		deadline.Stop()
	}
	if w.queued >= w.maxQueued {
		w.mu.Unlock()
		w.drops.Add(1)
		return false
	}
	var t *train
	if n := len(w.pending); n > 0 && w.c.GSO() {
		last := w.pending[n-1]
		if last.to == to && !last.closed && size <= last.seg && last.n < MaxSegments && len(last.buf)+size <= cap(last.buf) {
			t = last
			t.closed = size < last.seg
		}
	}
	if t == nil {
		if t = w.newTrain(size); t == nil {
			w.mu.Unlock()
			w.drops.Add(1)
			return false
		}
		t.to, t.seg = to, size
		w.pending = append(w.pending, t)
	}
	t.buf = append(t.buf, head...)
	t.buf = append(t.buf, body...)
	t.n++
	w.queued++
	wake := w.asleep
	w.asleep = false
	w.mu.Unlock()
	if wake {
		select {
		case w.wake <- struct{}{}:
		default:
		}
	}
	return true
}

// full reports whether a datagram could find no room: the queue holds its
// most datagrams, or every train is taken (each may hold fewer when sizes
// and addresses alternate). Called with mu held.
func (w *Writer) full() bool {
	return w.queued >= w.maxQueued || (w.trains >= w.maxTrains && len(w.free) == 0)
}

// newTrain takes a free train or makes one, within maxTrains. Called with mu held.
func (w *Writer) newTrain(size int) *train {
	if n := len(w.free); n > 0 {
		t := w.free[n-1]
		w.free = w.free[:n-1]
		if cap(t.buf) >= size {
			return t
		}
		// Too small for this (only a datagram over trainBytes): replace it.
		w.trains--
	}
	if w.trains >= w.maxTrains {
		return nil
	}
	w.trains++
	return &train{buf: make([]byte, 0, max(trainBytes, size))}
}

// Drops counts datagrams dropped because the queue was full.
func (w *Writer) Drops() uint64 { return w.drops.Load() }

// Flush waits, at most d, until what was queued so far has been written:
// a session's goodbye must not die in the queue at exit.
func (w *Writer) Flush(d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		w.mu.Lock()
		idle := len(w.pending) == 0 && !w.busy
		w.mu.Unlock()
		if idle {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// Run writes queued datagrams until ctx ends; what is queued then still
// goes out (a session's goodbye).
func (w *Writer) Run(ctx context.Context) {
	for {
		w.mu.Lock()
		for len(w.pending) == 0 {
			w.asleep, w.busy = true, false
			w.mu.Unlock()
			select {
			case <-w.wake:
			case <-ctx.Done():
				w.mu.Lock()
				w.asleep = false
				last := len(w.pending) > 0
				w.mu.Unlock()
				if last {
					w.writeOnce()
				}
				return
			}
			w.mu.Lock()
		}
		w.mu.Unlock()
		w.writeOnce()
	}
}

// writeOnce takes everything pending and writes it.
func (w *Writer) writeOnce() {
	w.mu.Lock()
	batch := w.pending
	w.pending, w.spare = w.spare[:0], nil
	w.queued = 0
	w.busy = true
	w.mu.Unlock()
	select {
	case w.room <- struct{}{}:
	default:
	}

	msgs := w.msgs[:0]
	for _, t := range batch {
		seg := 0
		if t.n > 1 {
			seg = t.seg
		}
		msgs = append(msgs, Message{Buf: t.buf, Addr: t.to, Seg: seg})
	}
	w.c.WriteBatch(msgs)
	for i := range msgs {
		msgs[i] = Message{} // no reference to the trains' buffers left behind
	}
	w.msgs = msgs[:0]

	w.mu.Lock()
	for _, t := range batch {
		t.buf, t.n, t.closed = t.buf[:0], 0, false
		w.free = append(w.free, t)
	}
	clear(batch)
	w.spare = batch[:0]
	w.mu.Unlock()
}
