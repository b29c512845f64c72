package quic

import (
	"testing"
	"time"

	"github.com/quic-go/quic-go/internal/utils"
	"github.com/quic-go/quic-go/internal/wire"
)

func datagramFrames(n int) []*wire.DatagramFrame {
	fs := make([]*wire.DatagramFrame, n)
	for i := range fs {
		fs[i] = &wire.DatagramFrame{Data: []byte{byte(i)}}
	}
	return fs
}

// AddBatch queues what there is room for, with one wake-up of the sender,
// and says how much that was.
func TestDatagramQueueAddBatchPartial(t *testing.T) {
	wakeups := 0
	q := newDatagramQueue(func() { wakeups++ }, 4, utils.DefaultLogger, nil)
	fs := datagramFrames(6)
	n, err := q.AddBatch(fs, 0)
	if n != 4 || err != ErrDatagramQueueFull {
		t.Fatalf("AddBatch of 6 into a queue of 4: %d, %v; want 4, ErrDatagramQueueFull", n, err)
	}
	if wakeups != 1 {
		t.Fatalf("%d wake-ups for one batch, want 1", wakeups)
	}
	for i := range 2 {
		if q.Peek() != fs[i] {
			t.Fatalf("frame %d out of order", i)
		}
		q.Pop()
	}
	if n, err := q.AddBatch(fs[4:], 0); n != 2 || err != nil {
		t.Fatalf("AddBatch of the rest: %d, %v", n, err)
	}
	for i := 2; i < 6; i++ {
		if q.Peek() != fs[i] {
			t.Fatalf("frame %d out of order", i)
		}
		q.Pop()
	}
	if n, err := q.AddBatch(nil, 0); n != 0 || err != nil {
		t.Fatalf("AddBatch of nothing: %d, %v", n, err)
	}
}

// A batch larger than the queue goes through whole when AddBatch may wait,
// in order, as the packer makes room.
func TestDatagramQueueAddBatchWaits(t *testing.T) {
	q := newDatagramQueue(func() {}, 2, utils.DefaultLogger, nil)
	fs := datagramFrames(50)
	done := make(chan error, 1)
	go func() {
		n, err := q.AddBatch(fs, -1)
		if err == nil && n != len(fs) {
			t.Errorf("AddBatch queued %d of %d without an error", n, len(fs))
		}
		done <- err
	}()
	deadline := time.After(20 * time.Second)
	for got := 0; got < len(fs); {
		if f := q.Peek(); f != nil {
			if f != fs[got] {
				t.Fatalf("frame %d came out as %d", got, f.Data[0])
			}
			q.Pop()
			got++
			continue
		}
		select {
		case <-deadline:
			t.Fatalf("only %d of %d frames came through", got, len(fs))
		default:
			time.Sleep(time.Microsecond)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A batch that cannot get room within its wait is cut where the room ended.
func TestDatagramQueueAddBatchWaitRunsOut(t *testing.T) {
	q := newDatagramQueue(func() {}, 3, utils.DefaultLogger, nil)
	n, err := q.AddBatch(datagramFrames(5), 10*time.Millisecond)
	if n != 3 || err != ErrDatagramQueueFull {
		t.Fatalf("AddBatch of 5 into a queue of 3 nobody empties: %d, %v; want 3, ErrDatagramQueueFull", n, err)
	}
}
