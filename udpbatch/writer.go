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
// blocks: a full queue drops it and counts, as a full NIC queue would;
// Write2Wait waits (bounded) for room first.
//
// A datagram that comes after a pause (IdleGap without one) while Run
// sleeps (nothing queued) is written at once by its producer instead: a
// lone packet (a ping, a keystroke) then costs no wake-up of Run, which on
// an idle machine is tens of microseconds. Under load datagrams come closer
// together and are batched as before.
type Writer struct {
	c *Conn

	mu      sync.Mutex
	pending []*train // filled by Write, taken whole by Run
	spare   []*train // the other half of the double buffer
	free    []*train // trains to reuse
	bytes   int      // capacity of every train made (pending, being written, free)
	// bigTaken counts big trains (more than datagramBytes) taken since
	// bigSeen, when a batch last found some taken: free big trains that
	// nobody took for trimAfter are let go (see trim).
	bigTaken int
	bigSeen  time.Duration
	queued   int  // datagrams in pending
	asleep   bool // Run waits for wake
	busy     bool // Run is writing a batch
	held     int  // Holds not yet released: queue without waking Run
	wake     chan struct{}
	// room is closed (and replaced) each time Run has written a batch and
	// taken its trains back: every waiter wakes and looks again.
	room    chan struct{}
	waiters int // writers waiting on room
	// timer is reused by waiting writers, one at a time (another makes its
	// own), so that waiting allocates nothing.
	timer     *time.Timer
	timerBusy bool

	drops atomic.Uint64
	depth atomic.Int64 // queued, for Queued without the lock
	msgs  []Message

	// wmu is held around every write to the socket (Run's batches and a
	// producer's direct write), which must not overlap.
	wmu   sync.Mutex
	epoch time.Time // for last
	// last is when the writer was last busy, since epoch, under mu: when
	// Run last went to sleep, a Release last wrote, or a datagram last
	// found Run asleep outside a Hold. Every other datagram was written
	// by Run before it went to sleep or by a Release, so this is never
	// before the last datagram came.
	last    time.Duration
	one     []byte        // a direct write's datagram; under wmu
	oneMsg  [1]Message    // under wmu
	directs atomic.Uint64 // datagrams written directly (tests)
}

// idleNow reports whether IdleGap has passed since the writer was last
// busy, and marks it busy now. Called with mu held.
func (w *Writer) idleNow() bool {
	now := time.Since(w.epoch)
	idle := now-w.last >= IdleGap
	w.last = now
	return idle
}

// IdleGap is the pause after which a datagram is written by its producer
// at once rather than queued for Run.
const IdleGap = time.Millisecond

// train is a run of datagrams to one address, back to back in buf, all of
// size seg but the last, which may be shorter and then ends the train.
type train struct {
	buf    []byte
	seg    int
	n      int
	to     netip.AddrPort
	closed bool
}

// Sizes of the write queue. With GSO a train holds up to trainBytes (about
// twenty full-size datagrams, enough for GSO to pay off); a train of small
// datagrams (smallDatagram bytes at most: acknowledgments) gets
// datagramBytes, eight of them or more. Without GSO a train is one
// datagram and its buffer datagramBytes. The queue holds at most QueueLen
// datagrams, in trains of at most queueBytes in all (2 MiB) however the
// traffic is mixed: QueueLen small datagrams fit even two to a train.
const (
	trainBytes    = 32 << 10
	datagramBytes = 2 << 10
	smallDatagram = 256
	queueBytes    = 2 << 20
	// QueueLen is how many datagrams may wait for the socket.
	QueueLen = 2048
	// holdFlush is how many datagrams a Hold queues before they are
	// written without waiting for Release: a quarter of the queue, well
	// below the half at which the relay counts its queue congested.
	holdFlush = QueueLen / 4
	// ControlReserve is how many control datagrams (probes, relay checks)
	// may be queued beyond a full queue: a bulk transfer keeps the queue
	// full by design (its producers wait for room), and the keepalives
	// that hold its path open must not be dropped for it.
	ControlReserve = 64
)

// NewWriter returns a Writer for c; Run sends what it queues.
func NewWriter(c *Conn) *Writer {
	return &Writer{c: c, wake: make(chan struct{}, 1), room: make(chan struct{}), msgs: make([]Message, 0, QueueLen), epoch: time.Now()}
}

// Write queues one datagram b to to. It reports false if the queue was
// full and the datagram was dropped.
func (w *Writer) Write(to netip.AddrPort, b []byte) bool { return w.Write2(to, nil, b) }

// Write2 queues one datagram made of head followed by body (a frame header
// and the packet it carries), copying both.
func (w *Writer) Write2(to netip.AddrPort, head, body []byte) bool {
	return w.write(to, head, body, 0, false)
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
	return w.write(to, head, body, MaxWait, false)
}

// WriteWait is Write2Wait of one datagram.
func (w *Writer) WriteWait(to netip.AddrPort, b []byte) bool {
	return w.write(to, nil, b, MaxWait, false)
}

// Write2Control queues a small control datagram (a probe, a relay check):
// it never waits, and it may use ControlReserve places beyond a full
// queue, so that it goes out in the middle of a bulk transfer.
func (w *Writer) Write2Control(to netip.AddrPort, head, body []byte) bool {
	return w.write(to, head, body, 0, true)
}

// write queues head+body to to, waiting at most wait for room; a control
// datagram may use the reserve.
func (w *Writer) write(to netip.AddrPort, head, body []byte, wait time.Duration, control bool) bool {
	size := len(head) + len(body)
	if size == 0 || size > MaxTrain {
		w.drops.Add(1)
		return false
	}
	gso := w.c.GSO()
	w.mu.Lock()
	// Run asleep and nothing queued (a Hold queues while Run sleeps): a
	// direct write overtakes nothing; whatever is queued meanwhile is
	// written after it (wmu). The clock is read only then: under load Run
	// is mostly awake, and a clock read per datagram was 8 % of the
	// relay's CPU.
	if w.held == 0 && len(w.pending) == 0 && w.asleep && w.idleNow() && w.wmu.TryLock() {
		w.mu.Unlock()
		w.one = append(append(w.one[:0], head...), body...)
		w.oneMsg[0] = Message{Buf: w.one, Addr: to}
		w.c.WriteBatch(w.oneMsg[:])
		w.oneMsg[0] = Message{}
		w.wmu.Unlock()
		w.directs.Add(1)
		return true
	}
	var timer *time.Timer
	for {
		if t := w.place(to, size, gso, control); t != nil {
			t.buf = append(t.buf, head...)
			t.buf = append(t.buf, body...)
			t.n++
			w.queued++
			w.depth.Store(int64(w.queued))
			// Under a Hold, Release writes what was queued: Run stays
			// asleep (a wake-up per batch was a quarter of the relay's CPU).
			// A long Hold writes every holdFlush datagrams, so that the
			// queue's depth (which the relay's fairness reads) stays that
			// of a socket that keeps up.
			wake := w.asleep && w.held == 0
			if wake {
				w.asleep = false
			}
			flush := w.queued >= holdFlush && w.writesHeld()
			w.mu.Unlock()
			if timer != nil {
				w.releaseTimer(timer)
			}
			if flush {
				w.writeOnce(false)
			}
			if wake {
				select {
				case w.wake <- struct{}{}:
				default:
				}
			}
			return true
		}
		// Full. Under a Hold Run was not woken: write the queue from
		// here, as Release would, rather than wait for nobody.
		if w.writesHeld() {
			w.mu.Unlock()
			w.writeOnce(false)
			w.mu.Lock()
			continue
		}
		if wait <= 0 {
			break
		}
		if timer == nil {
			timer = w.getTimer(wait)
		}
		room := w.room
		w.waiters++
		w.mu.Unlock()
		select {
		case <-room:
			w.mu.Lock()
			w.waiters--
			continue
		case <-timer.C:
			w.mu.Lock()
			w.waiters--
		}
		break
	}
	w.mu.Unlock()
	if timer != nil {
		w.releaseTimer(timer)
	}
	w.drops.Add(1)
	return false
}

// place finds room for a datagram of size bytes to to: the last pending
// train if it continues it, else a new one. nil: the queue is full.
// Called with mu held.
func (w *Writer) place(to netip.AddrPort, size int, gso, control bool) *train {
	limit := QueueLen
	if control {
		limit += ControlReserve
	}
	if w.queued >= limit {
		return nil
	}
	if n := len(w.pending); n > 0 && gso {
		last := w.pending[n-1]
		if last.to == to && !last.closed && size <= last.seg && last.n < MaxSegments && len(last.buf)+size <= cap(last.buf) {
			last.closed = size < last.seg
			return last
		}
	}
	t := w.newTrain(size, gso, control)
	if t != nil {
		t.to, t.seg = to, size
		w.pending = append(w.pending, t)
	}
	return t
}

// newTrain takes a free train big enough or makes one within the queue's
// byte budget. Called with mu held.
func (w *Writer) newTrain(size int, gso, control bool) *train {
	want := trainCap(size, gso)
	big := want > datagramBytes
	if big {
		w.bigTaken++
	}
	for i := len(w.free) - 1; i >= 0; i-- {
		// A small datagram takes only a small train: big ones left
		// idle can then be let go (trim).
		if t := w.free[i]; cap(t.buf) >= want && (big || cap(t.buf) == datagramBytes) {
			w.free[i] = w.free[len(w.free)-1]
			w.free = w.free[:len(w.free)-1]
			return t
		}
	}
	budget := queueBytes
	if control {
		// A control datagram takes a one-datagram train, from the
		// reserve if the queue is full.
		want = max(datagramBytes, size)
		budget += ControlReserve * datagramBytes
	}
	if w.bytes+want > budget {
		// Make room from free trains too small for this one.
		for len(w.free) > 0 && w.bytes+want > budget {
			t := w.free[len(w.free)-1]
			w.free = w.free[:len(w.free)-1]
			w.bytes -= cap(t.buf)
		}
		if w.bytes+want > budget {
			return nil
		}
	}
	w.bytes += want
	return &train{buf: make([]byte, 0, want)}
}

// trainCap is the buffer a new train of size-byte datagrams gets. The
// sender of a download's acknowledgments queues many short trains of small
// datagrams (their sizes vary, and a larger one starts a train): with
// trainBytes each, 64 of them took the whole byte budget, so a burst of
// acknowledgments was dropped at its 129th, and they held 2 MiB of the
// download client's heap (its largest item after quic-go's packets).
func trainCap(size int, gso bool) int {
	switch {
	case !gso || size <= smallDatagram:
		return max(datagramBytes, size)
	default:
		return max(trainBytes, size)
	}
}

// trimAfter is how long free big trains are kept without one being taken.
const trimAfter = time.Second

// trim lets go of the free big trains when none was taken for trimAfter:
// after an upload the node sends only acknowledgments, and the upload's
// trains (up to the 2 MiB budget) stayed on its heap for good, where a
// client under its memory limit then had that much less room for a
// download's packets and collected garbage back to back. Called with mu
// held, after a batch.
func (w *Writer) trim(now time.Duration) {
	if w.bigTaken > 0 {
		w.bigTaken, w.bigSeen = 0, now
		return
	}
	if now-w.bigSeen < trimAfter {
		return
	}
	kept := w.free[:0]
	for _, t := range w.free {
		if cap(t.buf) > datagramBytes {
			w.bytes -= cap(t.buf)
			continue
		}
		kept = append(kept, t)
	}
	clear(w.free[len(kept):])
	w.free = kept
	w.bigSeen = now // look again in trimAfter, not after every batch
}

// getTimer returns a timer set to d, the writer's own unless another
// writer waits with it. Called with mu held.
func (w *Writer) getTimer(d time.Duration) *time.Timer {
	if w.timer == nil {
		w.timer = time.NewTimer(d)
		w.timerBusy = true
		return w.timer
	}
	if !w.timerBusy {
		w.timerBusy = true
		w.timer.Reset(d)
		return w.timer
	}
	return time.NewTimer(d)
}

func (w *Writer) releaseTimer(t *time.Timer) {
	t.Stop()
	if t == w.timer {
		w.mu.Lock()
		w.timerBusy = false
		w.mu.Unlock()
	}
}

// Hold lets a producer that forwards a batch of datagrams (the relay's
// reader, after each recvmmsg) queue them all without waking Run, and
// Release then writes them from the producer's goroutine: one sendmmsg per
// batch and no hand-off between goroutines. Datagrams from other producers
// queued meanwhile wait for Release too (the batch takes microseconds).
// Every Hold must be followed by one Release.
func (w *Writer) Hold() {
	w.mu.Lock()
	w.held++
	w.mu.Unlock()
}

// Release ends a Hold. The last Release writes what is queued, unless Run
// is writing already (it takes the rest when done).
func (w *Writer) Release() {
	w.mu.Lock()
	w.held--
	if w.held < 0 {
		w.mu.Unlock()
		panic("udpbatch: Release without Hold")
	}
	flush := w.held == 0 && len(w.pending) > 0 && !w.busy
	w.mu.Unlock()
	if flush {
		w.writeOnce(false)
	}
}

// writesHeld reports whether the producer must write the queue itself: a
// Hold kept Run asleep, Run is not writing, and something is queued.
// Called with mu held.
func (w *Writer) writesHeld() bool {
	return w.held > 0 && !w.busy && len(w.pending) > 0
}

// Queued is how many datagrams wait in the queue now (a relay's fair
// dropping watches it); it takes no lock.
func (w *Writer) Queued() int { return int(w.depth.Load()) }

// Cap is how many datagrams the queue holds (without ControlReserve).
func (w *Writer) Cap() int { return QueueLen }

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
			w.wmu.Lock() // a direct write in progress
			w.wmu.Unlock()
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
		if len(w.pending) == 0 {
			w.last = time.Since(w.epoch)
		}
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
					// As a producer would: Run is gone, and busy must
					// not stay set for Release to write.
					w.writeOnce(false)
				}
				return
			}
			w.mu.Lock()
		}
		w.mu.Unlock()
		w.writeOnce(true)
	}
}

// writeOnce takes everything pending and writes it: Run (run) or a
// producer's Release. It holds wmu throughout, so that two of them write
// their batches in the order they took them.
func (w *Writer) writeOnce(run bool) {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	w.mu.Lock()
	batch := w.pending
	if len(batch) == 0 {
		w.mu.Unlock()
		return
	}
	w.pending, w.spare = w.spare[:0], nil
	w.queued = 0
	w.depth.Store(0)
	if run {
		w.busy = true
	}
	w.mu.Unlock()

	msgs := w.msgs[:0]
	for _, t := range batch {
		seg := 0
		if t.n > 1 {
			seg = t.seg
		}
		msgs = append(msgs, Message{Buf: t.buf, Addr: t.to, Seg: seg})
	}
	w.c.WriteBatch(msgs)
	clear(msgs) // no reference to the trains' buffers left behind
	w.msgs = msgs[:0]

	w.mu.Lock()
	now := time.Since(w.epoch)
	if !run {
		w.last = now
	}
	for _, t := range batch {
		t.buf, t.n, t.closed = t.buf[:0], 0, false
		w.free = append(w.free, t)
	}
	w.trim(now)
	clear(batch)
	w.spare = batch[:0]
	// The trains are back: wake every writer waiting for room.
	if w.waiters > 0 {
		close(w.room)
		w.room = make(chan struct{})
	}
	w.mu.Unlock()
}
