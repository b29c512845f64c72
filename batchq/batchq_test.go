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

// One key at full blast fills only its share of a Fair queue: another key's
// items still get in, and the flooder loses its own (counted). Shares
// start over after each Take.
func TestFairShares(t *testing.T) {
	tests := []struct {
		name string
		max  int
		puts []struct {
			key string
			n   int
		}
		accepted map[string]int
		full     int // puts refused because the whole queue was full (not counted as over share)
	}{
		{"alone: 7/8, an eighth kept for a newcomer", 100, []struct {
			key string
			n   int
		}{{"a", 200}}, map[string]int{"a": 88}, 0},
		{"flooder first, honest after", 100, []struct {
			key string
			n   int
		}{{"a", 200}, {"b", 10}}, map[string]int{"a": 88, "b": 10}, 0},
		{"two flooders: the second gets the reserve", 90, []struct {
			key string
			n   int
		}{{"a", 200}, {"b", 200}}, map[string]int{"a": 79, "b": 11}, 189},
		{"two flooders taking turns share equally", 90, []struct {
			key string
			n   int
		}{{"a", 1}, {"b", 1}, {"a", 200}, {"b", 200}}, map[string]int{"a": 39, "b": 39}, 0},
		{"many small keys are not limited", 100, []struct {
			key string
			n   int
		}{{"a", 5}, {"b", 5}, {"c", 5}, {"d", 5}}, map[string]int{"a": 5, "b": 5, "c": 5, "d": 5}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := NewFair[string, string](tt.max)
			offered, total := 0, 0
			for _, p := range tt.puts {
				for range p.n {
					f.Put(p.key, p.key)
				}
				offered += p.n
			}
			got, err := f.Take(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			count := map[string]int{}
			for _, k := range got {
				count[k]++
			}
			for k, want := range tt.accepted {
				if count[k] != want {
					t.Errorf("key %s: %d queued, want %d", k, count[k], want)
				}
				total += want
			}
			if n := f.OverShare(); n != uint64(offered-total-tt.full) {
				t.Errorf("OverShare %d, want %d", n, offered-total-tt.full)
			}
			// A new round: the flooder has its share again.
			for range tt.max {
				f.Put("a", "a")
			}
			if got, _ := f.Take(context.Background(), got); len(got) != tt.max-tt.max/8 {
				t.Errorf("after Take, key a alone queued %d, want %d", len(got), tt.max-tt.max/8)
			}
		})
	}
}

// BenchmarkPut compares the cost per item of a plain and a fair queue
// (the fair one looks its key up on every Put), taking as it goes.
func BenchmarkPut(b *testing.B) {
	keys := []uint32{1, 2, 3, 4}
	b.Run("Q", func(b *testing.B) {
		q := New[int](4096)
		var buf []int
		for i := range b.N {
			q.Put(i)
			if i%64 == 63 {
				buf, _ = q.Take(context.Background(), buf)
			}
		}
	})
	b.Run("Fair", func(b *testing.B) {
		f := NewFair[uint32, int](4096)
		var buf []int
		for i := range b.N {
			f.Put(keys[i%len(keys)], i)
			if i%64 == 63 {
				buf, _ = f.Take(context.Background(), buf)
			}
		}
	})
}
