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
	q.items = append(q.items, v)
	wake := q.waiting
	q.waiting = false
	q.mu.Unlock()
	if wake {
		q.signal()
	}
	return true
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
