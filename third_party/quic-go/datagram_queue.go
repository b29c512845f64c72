package quic

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go/internal/ackhandler"
	"github.com/quic-go/quic-go/internal/monotime"
	"github.com/quic-go/quic-go/internal/protocol"
	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/utils/ringbuffer"
	"github.com/quic-go/quic-go/internal/wire"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
)

const (
	defaultDatagramSendQueueLen = 32
	maxDatagramRcvQueueLen      = 128
)

// ErrDatagramQueueFull is returned by TrySendDatagram when the send queue is full.
var ErrDatagramQueueFull = errors.New("DATAGRAM send queue full")

// datagramFramePool holds DATAGRAM frames for sending beyond what a
// connection keeps in its own free list (datagramQueue.free). A frame goes
// back once the packet carrying it has been packed and registered; nothing
// reads a DATAGRAM frame's data after that, as it is never retransmitted.
var datagramFramePool = sync.Pool{New: func() any {
	return &wire.DatagramFrame{Data: make([]byte, 0, protocol.MaxPacketBufferSize)}
}}

// maxFreeDatagramFrames bounds a connection's free list of DATAGRAM frames
// (about 1.5 kB each); more go back to datagramFramePool.
const maxFreeDatagramFrames = 256

// freeIdle is how long a connection keeps its free frames without sending
// a DATAGRAM.
const freeIdle = time.Second

// releaseBatch is how many frames the run loop collects before it hands
// them to the free list under the lock.
const releaseBatch = 32

func getDatagramFrame(p []byte) *wire.DatagramFrame {
	return fillDatagramFrame(datagramFramePool.Get().(*wire.DatagramFrame), p)
}

func fillDatagramFrame(f *wire.DatagramFrame, p []byte) *wire.DatagramFrame {
	f.DataLenPresent = true
	f.Data = append(f.Data[:0], p...)
	return f
}

func putDatagramFrame(f *wire.DatagramFrame) {
	if cap(f.Data) > protocol.MaxPacketBufferSize {
		return // grown for an unusually large payload: let it go
	}
	f.Data = f.Data[:0]
	datagramFramePool.Put(f)
}

type datagramQueue struct {
	sendMx       sync.Mutex
	sendQueue    ringbuffer.RingBuffer[*wire.DatagramFrame]
	sendQueueLen int
	// queued counts the frames in sendQueue and in taken: Add keeps it
	// below sendQueueLen. waiters counts the Adds waiting for room, so that
	// Pop signals sent only when someone listens.
	queued, waiters atomic.Int32
	sent            chan struct{} // used to notify Add that a datagram was dequeued
	// taken holds the frames Peek moved out of sendQueue under one lock,
	// taken[takenHead:] not yet popped. Only the packer (the run loop)
	// touches it, so packing a burst of datagrams takes the lock once, not
	// twice per packet.
	taken     []*wire.DatagramFrame
	takenHead int
	// free holds sent frames for the next sends, under sendMx. A frame is
	// taken by the sending goroutine and released by the run loop: through
	// sync.Pool that crossing made most Gets steal from another P's pool
	// (sync.(*Pool).getSlow), so the connection recycles its own.
	free []*wire.DatagramFrame
	// released collects the run loop's sent frames (only the run loop
	// touches it) until releaseBatch of them go to free under one lock.
	released []*wire.DatagramFrame
	// freeHeld and lastFreed (run loop only) say whether free or released
	// may hold frames and when released last went to free: a connection
	// that has sent nothing for freeIdle gives its frames back to the pool
	// (idleTrim), so an idle one holds none.
	freeHeld  bool
	lastFreed monotime.Time
	// waitTimer is reused by Adds that wait a bounded time (one at a time;
	// a second waiter makes its own), so waiting allocates nothing.
	waitTimer     *time.Timer
	waitTimerBusy bool

	rcvMx    sync.Mutex
	rcvQueue [][]byte
	rcvd     chan struct{} // used to notify Receive that a new datagram was received
	// rcvDropped counts received datagrams discarded because rcvQueue was
	// full (no handler set, nobody calling Receive fast enough).
	rcvDropped atomic.Uint64

	// handler, once set, receives every datagram instead of rcvQueue.
	handler atomic.Pointer[func([]byte)]

	closeErr error
	closed   chan struct{}

	hasData func()

	logger  utils.Logger
	qlogger qlogwriter.Recorder
}

func newDatagramQueue(hasData func(), sendQueueLen int, logger utils.Logger, qlogger qlogwriter.Recorder) *datagramQueue {
	if sendQueueLen <= 0 {
		sendQueueLen = defaultDatagramSendQueueLen
	}
	return &datagramQueue{
		hasData:      hasData,
		sendQueueLen: sendQueueLen,
		rcvd:         make(chan struct{}, 1),
		sent:         make(chan struct{}, 1),
		closed:       make(chan struct{}),
		logger:       logger,
		qlogger:      qlogger,
	}
}

// Add queues a new DATAGRAM frame for sending.
// Up to sendQueueLen DATAGRAM frames will be queued.
// Once that limit is reached, Add waits until the queue size has reduced:
// for as long as it takes if wait is negative, not at all if it is 0, at
// most wait otherwise; it then returns ErrDatagramQueueFull.
func (h *datagramQueue) Add(f *wire.DatagramFrame, wait time.Duration) error {
	fs := [1]*wire.DatagramFrame{f}
	_, err := h.AddBatch(fs[:], wait)
	return err
}

// AddBatch queues the frames fs in order, as Add does each one, but taking
// the lock and scheduling sending once for as many as there is room for.
// It returns how many it queued: fewer than len(fs) only with an error,
// and then fs[n:] are not queued.
func (h *datagramQueue) AddBatch(fs []*wire.DatagramFrame, wait time.Duration) (n int, _ error) {
	var deadline <-chan time.Time
	var timer *time.Timer
	waiting := false
	defer func() {
		if waiting {
			h.waiters.Add(-1)
		}
		if timer != nil {
			h.releaseTimer(timer)
		}
	}()
	for {
		h.sendMx.Lock()
		// don't queue frames after the connection is closed
		select {
		case <-h.closed:
			h.sendMx.Unlock()
			return n, h.closeErr
		default:
		}

		// queued only falls outside the lock, so the room can only grow.
		room := min(h.sendQueueLen-int(h.queued.Load()), len(fs)-n)
		for _, f := range fs[n : n+max(room, 0)] {
			h.sendQueue.PushBack(f)
		}
		if room > 0 {
			h.queued.Add(int32(room))
			n += room
		}
		if n == len(fs) || wait == 0 || !waiting {
			h.sendMx.Unlock()
			if room > 0 {
				h.hasData()
			}
			if n == len(fs) {
				return n, nil
			}
			if wait == 0 {
				return n, ErrDatagramQueueFull
			}
			// Count this call as a waiter, then look at the queue again: a
			// Pop that ran before the count was seen is then seen here
			// (Pop decrements queued before it reads the waiters).
			waiting = true
			h.waiters.Add(1)
			continue
		}
		if wait > 0 && timer == nil {
			timer = h.getTimer(wait)
			deadline = timer.C
		}
		h.sendMx.Unlock()
		if room > 0 {
			h.hasData()
		}
		// The queue is full. Wait until a frame is dequeued. A stale
		// notification only makes the loop look again.
		select {
		case <-h.closed:
			return n, h.closeErr
		case <-h.sent:
		case <-deadline:
			return n, ErrDatagramQueueFull
		}
	}
}

// getTimer returns a timer set to d: the queue's own, reused, unless
// another Add is waiting with it. Called with sendMx held.
func (h *datagramQueue) getTimer(d time.Duration) *time.Timer {
	if h.waitTimer != nil && !h.waitTimerBusy {
		h.waitTimerBusy = true
		h.waitTimer.Reset(d)
		return h.waitTimer
	}
	if h.waitTimer == nil {
		h.waitTimer = time.NewTimer(d)
		h.waitTimerBusy = true
		return h.waitTimer
	}
	return time.NewTimer(d)
}

func (h *datagramQueue) releaseTimer(t *time.Timer) {
	t.Stop()
	if t == h.waitTimer {
		h.sendMx.Lock()
		h.waitTimerBusy = false
		h.sendMx.Unlock()
	}
}

// newFrames fills fs with DATAGRAM frames holding ps, one each: from the
// connection's free list, taken under one lock, then from the pool.
func (h *datagramQueue) newFrames(fs []*wire.DatagramFrame, ps [][]byte) {
	n := 0
	h.sendMx.Lock()
	for n < len(fs) && len(h.free) > 0 {
		last := len(h.free) - 1
		fs[n] = h.free[last]
		h.free[last] = nil
		h.free = h.free[:last]
		n++
	}
	h.sendMx.Unlock()
	for i := range fs {
		if i < n {
			fillDatagramFrame(fs[i], ps[i])
		} else {
			fs[i] = getDatagramFrame(ps[i])
		}
	}
}

// releaseFrames takes back the DATAGRAM frames of a packet that has been
// sent and registered. Only the run loop calls it.
func (h *datagramQueue) releaseFrames(frames []ackhandler.Frame) {
	for _, f := range frames {
		if df, ok := f.Frame.(*wire.DatagramFrame); ok {
			h.releaseFrame(df)
		}
	}
}

// releaseFrame takes back one frame; only the run loop calls it.
func (h *datagramQueue) releaseFrame(f *wire.DatagramFrame) {
	if cap(f.Data) > protocol.MaxPacketBufferSize {
		return // grown for an unusually large payload: let it go
	}
	f.Data = f.Data[:0]
	h.released = append(h.released, f)
	h.freeHeld = true
	if len(h.released) >= releaseBatch {
		h.sendMx.Lock()
		h.freeReleasedLocked()
		h.sendMx.Unlock()
	}
}

// freeReleasedLocked moves the run loop's released frames to the free list,
// those beyond its bound to the pool. The run loop calls it with sendMx
// held.
func (h *datagramQueue) freeReleasedLocked() {
	if len(h.released) > 0 {
		h.lastFreed = monotime.Now()
	}
	for i, f := range h.released {
		if len(h.free) < maxFreeDatagramFrames {
			h.free = append(h.free, f)
		} else {
			datagramFramePool.Put(f)
		}
		h.released[i] = nil
	}
	h.released = h.released[:0]
}

// idleTrim gives the free and released frames back to the pool once the
// connection has sent no DATAGRAM for freeIdle. The run loop calls it when
// it finds nothing queued, which an idle connection still does for the
// packets it sends (ACKs, keep-alives).
func (h *datagramQueue) idleTrim() {
	if len(h.released) > 0 {
		h.sendMx.Lock()
		h.freeReleasedLocked()
		h.sendMx.Unlock()
		return
	}
	if monotime.Since(h.lastFreed) < freeIdle {
		return
	}
	h.sendMx.Lock()
	for _, f := range h.free {
		datagramFramePool.Put(f)
	}
	h.free = nil
	h.sendMx.Unlock()
	h.freeHeld = false
}

// Peek gets the next DATAGRAM frame for sending.
// If actually sent out, Pop needs to be called before the next call to Peek.
// Only the run loop calls Peek and Pop.
func (h *datagramQueue) Peek() *wire.DatagramFrame {
	if h.takenHead == len(h.taken) {
		if h.queued.Load() == 0 {
			// Nothing queued, or an Add in flight that schedules sending
			// again once it has counted its frame.
			if h.freeHeld {
				h.idleTrim()
			}
			return nil
		}
		clear(h.taken)
		h.taken, h.takenHead = h.taken[:0], 0
		h.sendMx.Lock()
		for !h.sendQueue.Empty() {
			h.taken = append(h.taken, h.sendQueue.PopFront())
		}
		h.freeReleasedLocked()
		h.sendMx.Unlock()
		if len(h.taken) == 0 {
			return nil
		}
	}
	return h.taken[h.takenHead]
}

func (h *datagramQueue) Pop() {
	h.taken[h.takenHead] = nil
	h.takenHead++
	h.queued.Add(-1)
	if h.waiters.Load() > 0 {
		select {
		case h.sent <- struct{}{}:
		default:
		}
	}
}

// HandleDatagramFrame handles a received DATAGRAM frame.
func (h *datagramQueue) HandleDatagramFrame(f *wire.DatagramFrame) {
	if hf := h.handler.Load(); hf != nil {
		(*hf)(f.Data)
		return
	}
	var queued bool
	h.rcvMx.Lock()
	// SetHandler may have run since the check above; it takes the queue
	// under rcvMx, so a datagram queued now would never be read.
	if hf := h.handler.Load(); hf != nil {
		h.rcvMx.Unlock()
		(*hf)(f.Data)
		return
	}
	if len(h.rcvQueue) < maxDatagramRcvQueueLen {
		data := make([]byte, len(f.Data))
		copy(data, f.Data)
		h.rcvQueue = append(h.rcvQueue, data)
		queued = true
		select {
		case h.rcvd <- struct{}{}:
		default:
		}
	}
	h.rcvMx.Unlock()

	if !queued {
		h.rcvDropped.Add(1)
		if h.logger.Debug() {
			h.logger.Debugf("Discarding received DATAGRAM frame (%d bytes payload)", len(f.Data))
		}
		if h.qlogger != nil {
			h.qlogger.RecordEvent(qlog.DatagramDropped{
				Direction: qlog.DirectionReceiving,
				Raw:       qlog.RawInfo{Length: len(f.Data), PayloadLength: qlog.OmitLength},
				Trigger:   "buffer_full",
			})
		}
	}
}

// SetHandler makes fn receive every datagram from now on, instead of the
// queue, and returns what was queued before. A nil fn goes back to queueing.
func (h *datagramQueue) SetHandler(fn func([]byte)) (queued [][]byte) {
	h.rcvMx.Lock()
	defer h.rcvMx.Unlock()
	if fn == nil {
		h.handler.Store(nil)
		return nil
	}
	h.handler.Store(&fn)
	queued, h.rcvQueue = h.rcvQueue, nil
	return queued
}

// Receive gets a received DATAGRAM frame.
func (h *datagramQueue) Receive(ctx context.Context) ([]byte, error) {
	if err := context.Cause(ctx); err != nil {
		return nil, err
	}
	for {
		h.rcvMx.Lock()
		if len(h.rcvQueue) > 0 {
			data := h.rcvQueue[0]
			h.rcvQueue = h.rcvQueue[1:]
			h.rcvMx.Unlock()
			return data, nil
		}
		h.rcvMx.Unlock()
		select {
		case <-h.rcvd:
			continue
		case <-h.closed:
			return nil, h.closeErr
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		}
	}
}

func (h *datagramQueue) CloseWithError(e error) {
	h.closeErr = e
	close(h.closed)
}
