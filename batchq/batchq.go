// Package batchq is a bounded queue between goroutines that hands over
// whole batches: any number of producers put one item (or a few) at a
// time and never block; one consumer takes everything queued at once and
// works through it without further locking. A hot path that passed single
// packets through a channel paid a channel operation, and often a goroutine
// wake-up, per packet; here it pays a short mutex section per item and a
// wake-up only when the consumer sleeps.
package batchq

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Q is a batch queue of at most max items. The zero value is not usable;
// make one with New.
type Q[T any] struct {
	mu      sync.Mutex
	items   []T
	max     int
	waiting bool
	ready   chan struct{}
	room    chan struct{} // capacity 1: "Take emptied the queue"
	taken   func()        // called under mu when Take takes the items (Fair)
}

// New returns a queue that holds at most max items.
func New[T any](max int) *Q[T] {
	return &Q[T]{items: make([]T, 0, min(max, 256)), max: max, ready: make(chan struct{}, 1), room: make(chan struct{}, 1)}
}

// PutWait queues v like Put, but when the queue is full it waits, at most
// d, for the consumer to take it: for a producer that should be held back
// by a slow consumer, as by a blocking write, rather than lose v at once.
func (q *Q[T]) PutWait(v T, d time.Duration) bool {
	if q.Put(v) {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-q.room:
			if q.Put(v) {
				return true
			}
		case <-t.C:
			return q.Put(v)
		}
	}
}

// Put queues v. It never blocks: when the queue is full it returns false
// and v was not queued.
func (q *Q[T]) Put(v T) bool {
	q.mu.Lock()
	if len(q.items) >= q.max {
		q.mu.Unlock()
		return false
	}
	q.putLocked(v)
	return true
}

// putLocked appends v and unlocks q.mu, waking the consumer if it sleeps.
func (q *Q[T]) putLocked(v T) {
	q.items = append(q.items, v)
	wake := q.waiting
	q.waiting = false
	q.mu.Unlock()
	if wake {
		q.signal()
	}
}

// PutBatch queues as many of vs as fit, in order, and returns how many.
func (q *Q[T]) PutBatch(vs []T) int {
	q.mu.Lock()
	n := min(len(vs), q.max-len(q.items))
	q.items = append(q.items, vs[:n]...)
	wake := q.waiting && n > 0
	if wake {
		q.waiting = false
	}
	q.mu.Unlock()
	if wake {
		q.signal()
	}
	return n
}

func (q *Q[T]) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// Take waits until something is queued (or ctx ends) and returns all of
// it. buf is the slice the last Take returned, handed back for reuse (nil
// the first time): its items are cleared and it becomes the queue's
// storage, so taking allocates nothing in the steady state. Only one
// goroutine may Take.
func (q *Q[T]) Take(ctx context.Context, buf []T) ([]T, error) {
	clear(buf)
	buf = buf[:0]
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			out := q.items
			if buf == nil {
				buf = make([]T, 0, cap(out))
			}
			q.items = buf
			if q.taken != nil {
				q.taken()
			}
			q.mu.Unlock()
			select {
			case q.room <- struct{}{}:
			default:
			}
			return out, nil
		}
		q.waiting = true
		q.mu.Unlock()
		select {
		case <-q.ready:
		case <-ctx.Done():
			q.mu.Lock()
			q.waiting = false
			q.mu.Unlock()
			return buf, ctx.Err()
		}
	}
}

// Len returns how many items are queued now.
func (q *Q[T]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items)
}

// Fair is a Q shared by several producers that are told apart by a key
// (a client's address): while the consumer is behind, no key may hold more
// than an equal share of the room, which is max less a reserve of max/8
// for keys that have nothing queued yet, divided by the keys holding items,
// so one producer at full blast fills its own share and loses its own
// items, not the others'. Shares are counted from one Take to the next:
// the consumer takes everything, so that is how long items wait.
//
// The reserve is an eighth, not a share of its own: a lone producer (one
// client's bulk transfer, the common case) may use 7/8 of the queue. With
// half of it (a share for a newcomer as large as its own) a single-stream
// upload through the agent lost 64 packets per 4 s run to the bound, each
// a retransmit of the tunnelled TCP (make bench, direct up).
type Fair[K comparable, T any] struct {
	q      *Q[T]
	counts map[K]int // items queued per key since the last Take; guarded by q.mu
	over   atomic.Uint64
}

// NewFair returns a fair queue that holds at most max items.
func NewFair[K comparable, T any](max int) *Fair[K, T] {
	f := &Fair[K, T]{q: New[T](max), counts: make(map[K]int)}
	f.q.taken = func() { clear(f.counts) }
	return f
}

// Put queues v for key. It never blocks: it returns false, and v was not
// queued, when the queue is full or key holds its share already.
func (f *Fair[K, T]) Put(key K, v T) bool {
	q := f.q
	q.mu.Lock()
	if len(q.items) >= q.max {
		q.mu.Unlock()
		return false
	}
	n, held := len(f.counts), f.counts[key]
	if held == 0 {
		n++
	}
	if held >= max((q.max-q.max/8)/n, 1) {
		q.mu.Unlock()
		f.over.Add(1)
		return false
	}
	f.counts[key] = held + 1
	q.putLocked(v)
	return true
}

// Take is Q.Take.
func (f *Fair[K, T]) Take(ctx context.Context, buf []T) ([]T, error) { return f.q.Take(ctx, buf) }

// Len returns how many items are queued now.
func (f *Fair[K, T]) Len() int { return f.q.Len() }

// OverShare counts the items Put refused because their key held its share
// while there was room for others.
func (f *Fair[K, T]) OverShare() uint64 { return f.over.Load() }
