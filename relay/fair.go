package relay

import "sync/atomic"

// Fair dropping (issue 9). Frames to a node wait in one queue that every
// sender toward it shares: the node's DATAGRAM queue (Peer.out), or, for
// UDP, the gateway port's one write queue (shared by all destinations,
// but judged per destination: Peer.udpFair). Without a rule, a client at
// full blast fills that queue and everybody else's frames wait or are
// dropped with its own. So while a queue is congested (more than half
// full), a frame is dropped, and counted as drop_unfair, if its sender
// (one direction of one route: the two directions of a session are two
// senders, each toward its own destination) has had more than
// fairSlackNum/fairSlackDen of an equal share of what that queue took
// recently: the bytes admitted in this window and the last one, divided
// by the senders seen in them. A window is fairWindowBytes admitted to the
// queue, not a span of time: it passes as fast as the queue drains, and
// the hot path reads no clock (time.Now costs more than the rest of the
// rule together: 60-170 ns on the test VM). A sender below that share is never
// dropped by the rule, so a modest client keeps its frames while a
// flooder loses its excess; a queue that is not congested drops nothing
// by it, and a sender alone is always within its share (a lone fast
// client costs nothing).
//
// The hot path is a few atomic loads and adds on the route and on the
// queue's link: no lock, no map, no clock, no allocation. Shares
// are judged on the bytes admitted, not offered, so dropping a flooder's
// frames does not raise its share. The counts are approximate under races
// (a frame may be counted in a neighbouring window); the rule only needs
// proportions.
const (
	// fairWindowBytes is about the frames a congested queue holds (half
	// of QueueLen full-size frames), so "recently" is the last one to two
	// queues' worth.
	fairWindowBytes = 1 << 20
	fairSlackNum    = 5 // a sender may take 5/4 of an equal share
	fairSlackDen    = 4
)

// fairLink counts what one queue admitted. Window w holds its bytes
// [w, w+1) × fairWindowBytes.
type fairLink struct {
	sum       atomic.Int64 // bytes admitted, ever
	win       atomic.Int64 // window index that act is for
	act, pact atomic.Int64 // senders that sent in this window and the last
}

// fairSender counts what one sender (one direction of a route) had
// admitted, per window of the link it sends to.
type fairSender struct {
	win       atomic.Int64 // window index that cur is for
	cur, prev atomic.Int64 // bytes admitted in this window and the last
	// link is the queue it was last counted in as a sender this window
	// (a node's frames move between DATAGRAMs and UDP).
	link atomic.Pointer[fairLink]
}

// roll starts window w if it is new: the current senders become the last
// window's (or none, if a window went by in one frame: never, frames are
// smaller than a window).
func (l *fairLink) roll(w int64) {
	lw := l.win.Load()
	if lw == w || !l.win.CompareAndSwap(lw, w) {
		return
	}
	if lw == w-1 {
		l.pact.Store(l.act.Swap(0))
	} else {
		l.act.Store(0)
		l.pact.Store(0)
	}
}

// allow reports whether s may put a frame in l's queue; congested says
// the queue is more than half full. It does not count the frame: add
// does, once the frame is queued.
func (l *fairLink) allow(s *fairSender, congested bool) bool {
	sum := l.sum.Load()
	w := sum / fairWindowBytes
	l.roll(w)
	if s.win.Load() != w || s.link.Load() != l {
		s.roll(l, w)
	}
	if !congested {
		return true
	}
	mine := s.cur.Load() + s.prev.Load()
	total := sum - max(w-1, 0)*fairWindowBytes // this window and the last
	active := max(l.act.Load(), l.pact.Load(), 1)
	// mine > slack × total/active, without a division.
	return mine*active*fairSlackDen <= total*fairSlackNum
}

// add counts n bytes that s put in l's queue.
func (l *fairLink) add(s *fairSender, n int) {
	s.cur.Add(int64(n))
	l.sum.Add(int64(n))
}

// roll starts window w for s and counts it as one of l's senders in it.
// Of goroutines racing here, only the one that moves the window or the
// link counts it.
func (s *fairSender) roll(l *fairLink, w int64) {
	counted := false
	if sw := s.win.Load(); sw != w && s.win.CompareAndSwap(sw, w) {
		if sw == w-1 {
			s.prev.Store(s.cur.Swap(0))
		} else {
			s.cur.Store(0)
			s.prev.Store(0)
		}
		counted = true
	}
	if s.link.Swap(l) != l {
		// Another queue's windows: what s had there does not count here.
		s.cur.Store(0)
		s.prev.Store(0)
		counted = true
	}
	if counted {
		l.act.Add(1)
	}
}

// queueDepth is what a UDPSender may also tell: how many datagrams wait in
// its write queue, of how many it holds (udpbatch.Writer).
type queueDepth interface {
	Queued() int
	Cap() int
}
