package quic

import (
	"sync"
	"time"

	"github.com/quic-go/quic-go/internal/protocol"
	"github.com/quic-go/quic-go/internal/utils/ringbuffer"
)

// A sidePacket is a packet received on a Transport other than the one of the active path.
type sidePacket struct {
	receivedPacket
	source *pathReceiver
}

// The receivedPacketQueue queues received packets until they are processed by the connection's run loop.
// Packets are identified by the pathReceiver that the Transport passed them to, i.e. by the Transport they were received on.
// Packets received on the Transport of the active path are queued in the main queue.
// Packets received on any other Transport are queued in the side queue.
// The side queue is only used by clients that probe or migrate to new paths.
type receivedPacketQueue struct {
	mx     sync.Mutex
	limit  int // per queue
	active *pathReceiver
	main   ringbuffer.RingBuffer[receivedPacket]
	side   ringbuffer.RingBuffer[sidePacket] // only allocated once a packet is received on a different Transport

	// Waiting for room (SetWait): Push on a full main queue waits up to wait
	// for Pop to free a quarter of it. stalled is set when a wait timed out
	// and cleared by the next Pop: while it is set, Push drops at once, so
	// a connection that stopped reading costs its Transport one wait, not
	// one per packet, and one that reads again is waited for again.
	wait    time.Duration
	waiting bool          // a Push waits on room
	stalled bool          // the last wait timed out; nothing popped since
	closed  bool          // Clear ran: nothing will be popped any more
	room    chan struct{} // capacity 1
	timer   *time.Timer   // the waiting Push's; only one waits (see Push)
}

// Init initializes the queue.
// The active pathReceiver is the one of the Transport that the connection was created on.
// Each of the two queues holds up to limit packets (0: MaxConnUnprocessedPackets).
func (q *receivedPacketQueue) Init(active *pathReceiver, limit int) {
	q.main.Init(8)
	q.active = active
	q.limit = limit
	if q.limit <= 0 {
		q.limit = protocol.MaxConnUnprocessedPackets
	}
}

// SetWait makes Push wait, at most d, for room in a full main queue
// instead of dropping the packet at once (Config.UnprocessedPacketsWait).
func (q *receivedPacketQueue) SetWait(d time.Duration) {
	q.mx.Lock()
	defer q.mx.Unlock()
	q.wait = d
	if d > 0 && q.room == nil {
		q.room = make(chan struct{}, 1)
	}
}

// Push queues a packet received by the pathReceiver source.
// It returns false if the packet was dropped because too many packets are queued.
func (q *receivedPacketQueue) Push(p receivedPacket, source *pathReceiver) bool {
	q.mx.Lock()
	defer q.mx.Unlock()

	if source == q.active {
		if q.main.Len() >= q.limit && !q.waitForRoom() {
			return false
		}
		if source == q.active { // still, after a wait
			q.main.PushBack(p)
			return true
		}
	}

	if q.side.Len() >= q.limit {
		return false
	}
	q.side.PushBack(sidePacket{receivedPacket: p, source: source})
	return true
}

// waitForRoom waits, with q.mx held on entry and on return, until the main
// queue has room, and reports whether it has. Only the active path's
// Transport pushes to the main queue, so one Push waits at a time; another
// that finds it waiting (during a path switch) drops its packet.
func (q *receivedPacketQueue) waitForRoom() bool {
	if q.wait <= 0 || q.stalled || q.closed || q.waiting {
		return false
	}
	q.waiting = true
	if q.timer == nil {
		q.timer = time.NewTimer(q.wait)
	} else {
		q.timer.Reset(q.wait)
	}
	q.mx.Unlock()
	timedOut := false
	select {
	case <-q.room:
	case <-q.timer.C:
		timedOut = true
	}
	q.timer.Stop()
	q.mx.Lock()
	q.waiting = false
	select { // a wake-up sent as the timer fired
	case <-q.room:
	default:
	}
	if q.closed || q.main.Len() >= q.limit {
		q.stalled = timedOut
		return false
	}
	return true
}

// madeRoom runs after a Pop from the main queue: the connection reads, so
// it is not stalled; a waiting Push is woken once a quarter of the queue is
// free (not at every Pop: the Transport's read loop would wake per packet).
// Called with q.mx held.
func (q *receivedPacketQueue) madeRoom() {
	q.stalled = false
	if q.main.Len() <= q.limit-q.limit/4 {
		q.wake()
	}
}

// wake wakes a waiting Push, if any, to look at the queue again. Called
// with q.mx held.
func (q *receivedPacketQueue) wake() {
	if q.waiting {
		select {
		case q.room <- struct{}{}:
		default:
		}
	}
}

// activePathID is returned by Pop for packets received on the active path.
// Like the qlog TupleID "", it refers to whichever path is currently active.
const activePathID pathID = -2

// Pop returns the next packet, and the ID of the path it was received on.
// The ID is activePathID for packets received on the active path.
// Packets in the side queue are returned first:
// When switching paths, the packets received on the old path are moved to the side queue.
func (q *receivedPacketQueue) Pop() (_ receivedPacket, path pathID, ok bool) {
	q.mx.Lock()
	defer q.mx.Unlock()

	if !q.side.Empty() {
		p := q.side.PopFront()
		if p.source == q.active {
			return p.receivedPacket, activePathID, true
		}
		return p.receivedPacket, p.source.id, true
	}
	if !q.main.Empty() {
		p := q.main.PopFront()
		if q.wait > 0 {
			q.madeRoom()
		}
		return p, activePathID, true
	}
	return receivedPacket{}, activePathID, false
}

func (q *receivedPacketQueue) Empty() bool {
	q.mx.Lock()
	defer q.mx.Unlock()

	return q.main.Empty() && q.side.Empty()
}

// SwapActive is called when switching paths.
// It moves packets queued for the old path to the side queue, and returns the pathReceiver of the old path.
func (q *receivedPacketQueue) SwapActive(active *pathReceiver) (prev *pathReceiver) {
	q.mx.Lock()
	defer q.mx.Unlock()

	prev = q.active
	if active == prev {
		return prev
	}
	for !q.main.Empty() {
		q.side.PushBack(sidePacket{receivedPacket: q.main.PopFront(), source: prev})
	}
	q.active = active
	q.stalled = false // the main queue is empty: the new path's first full queue is waited for
	q.wake()          // a Push of the old path waiting for room: its packet goes to the side queue now
	return prev
}

// Clear drops all queued packets.
func (q *receivedPacketQueue) Clear() {
	q.mx.Lock()
	defer q.mx.Unlock()

	for !q.main.Empty() {
		p := q.main.PopFront()
		p.buffer.Decrement()
		p.buffer.MaybeRelease()
	}
	for !q.side.Empty() {
		p := q.side.PopFront()
		p.buffer.Decrement()
		p.buffer.MaybeRelease()
	}
	q.closed = true
	q.wake()
}
