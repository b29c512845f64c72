package quic

import (
	"testing"
	"time"

	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/wire"
)

// Frames Peek moved out of the shared queue still count against its length,
// and they come out in the order they were added.
func TestDatagramQueueTakenFramesCount(t *testing.T) {
	q := newDatagramQueue(func() {}, 3, utils.DefaultLogger, nil)
	frames := make([]*wire.DatagramFrame, 5)
	for i := range frames {
		frames[i] = &wire.DatagramFrame{Data: []byte{byte(i)}}
	}
	for _, f := range frames[:3] {
		if err := q.Add(f, 0); err != nil {
			t.Fatal(err)
		}
	}
	if q.Peek() != frames[0] {
		t.Fatal("Peek did not return the first frame")
	}
	if err := q.Add(frames[3], 0); err != ErrDatagramQueueFull {
		t.Fatalf("Add to a full queue whose frames were taken: %v, want ErrDatagramQueueFull", err)
	}
	q.Pop()
	if err := q.Add(frames[3], 0); err != nil {
		t.Fatalf("Add after a Pop: %v", err)
	}
	for _, want := range frames[1:4] {
		if got := q.Peek(); got != want {
			t.Fatalf("Peek: frame %v, want %v", got.Data, want.Data)
		}
		q.Pop()
	}
	if q.Peek() != nil {
		t.Fatal("Peek on an empty queue returned a frame")
	}
}

// An Add waiting for room is woken by the Pop that makes it, however the
// two interleave: a lost wake-up would leave it waiting for good.
func TestDatagramQueueWaitingAddWokenByPop(t *testing.T) {
	q := newDatagramQueue(func() {}, 1, utils.DefaultLogger, nil)
	const n = 2000
	done := make(chan error, 1)
	go func() {
		for i := range n {
			if err := q.Add(&wire.DatagramFrame{Data: []byte{byte(i)}}, -1); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	deadline := time.After(20 * time.Second)
	for got := 0; got < n; {
		if f := q.Peek(); f != nil {
			if f.Data[0] != byte(got) {
				t.Fatalf("frame %d came out as %d", got, f.Data[0])
			}
			q.Pop()
			got++
			continue
		}
		select {
		case <-deadline:
			t.Fatalf("only %d of %d frames came through: an Add was never woken", got, n)
		default:
			time.Sleep(time.Microsecond)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
