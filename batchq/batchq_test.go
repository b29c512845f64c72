package batchq

import (
	"context"
	"sync"
	"testing"
	"time"
)

// Items from several producers all arrive, each producer's in order, and
// a full queue refuses instead of blocking.
func TestPutTake(t *testing.T) {
	q := New[int](100)
	for i := 0; i < 100; i++ {
		if !q.Put(i) {
			t.Fatalf("Put %d refused below the bound", i)
		}
	}
	if q.Put(100) {
		t.Fatal("Put beyond the bound accepted")
	}
	if n := q.PutBatch([]int{1, 2}); n != 0 {
		t.Fatalf("PutBatch into a full queue took %d", n)
	}
	got, err := q.Take(context.Background(), nil)
	if err != nil || len(got) != 100 || got[0] != 0 || got[99] != 99 {
		t.Fatalf("Take = %d items (%v)", len(got), err)
	}

	const producers, per = 4, 5000
	var wg sync.WaitGroup
	for p := 0; p < producers; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				for !q.Put(p*per + i) {
					time.Sleep(10 * time.Microsecond)
				}
			}
		}()
	}
	last := make([]int, producers)
	for i := range last {
		last[i] = -1
	}
	seen := 0
	buf := got
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for seen < producers*per {
		buf, err = q.Take(ctx, buf)
		if err != nil {
			t.Fatalf("after %d items: %v", seen, err)
		}
		for _, v := range buf {
			p, i := v/per, v%per
			if i != last[p]+1 {
				t.Fatalf("producer %d: item %d after %d", p, i, last[p])
			}
			last[p] = i
			seen++
		}
	}
	wg.Wait()
}

// Take returns when its context ends, and steady-state taking allocates
// nothing.
func TestTakeCancelAndAllocs(t *testing.T) {
	q := New[[]byte](64)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := q.Take(ctx, nil); err == nil {
		t.Fatal("Take on an empty queue returned without an error after its context ended")
	}
	pkt := make([]byte, 10)
	var buf [][]byte
	round := func() {
		for i := 0; i < 32; i++ {
			q.Put(pkt)
		}
		buf, _ = q.Take(context.Background(), buf)
	}
	round()
	round()
	if n := testing.AllocsPerRun(100, round); n != 0 {
		t.Fatalf("%.1f allocations per round", n)
	}
}

// PutWait on a full queue waits for the consumer and then queues; with
// no consumer it gives up after its wait.
func TestPutWait(t *testing.T) {
	q := New[int](2)
	q.Put(1)
	q.Put(2)
	start := time.Now()
	if q.PutWait(3, 30*time.Millisecond) {
		t.Fatal("PutWait into a full queue nobody takes succeeded")
	}
	if d := time.Since(start); d < 30*time.Millisecond {
		t.Fatalf("PutWait gave up after %v, before its wait", d)
	}
	done := make(chan bool)
	go func() { done <- q.PutWait(3, 5*time.Second) }()
	time.Sleep(10 * time.Millisecond)
	got, _ := q.Take(context.Background(), nil)
	if len(got) != 2 {
		t.Fatalf("took %d", len(got))
	}
	if !<-done {
		t.Fatal("PutWait did not queue once the consumer took the queue")
	}
	if got, _ := q.Take(context.Background(), nil); len(got) != 1 || got[0] != 3 {
		t.Fatalf("after the wait the queue holds %v", got)
	}
}
