package udpbatch

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

func listen(t testing.TB, network, addr string) *net.UDPConn {
	t.Helper()
	ua, err := net.ResolveUDPAddr(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := net.ListenUDP(network, ua)
	if err != nil {
		t.Skipf("cannot listen on %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { uc.Close() })
	uc.SetReadBuffer(4 << 20)
	uc.SetWriteBuffer(4 << 20)
	return uc
}

func newConn(t testing.TB, uc *net.UDPConn) *Conn {
	t.Helper()
	c, err := New(uc, 16)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func addrOf(uc *net.UDPConn) netip.AddrPort { return uc.LocalAddr().(*net.UDPAddr).AddrPort() }

// datagram i of a stream: its sequence number, then a pattern; size varies
// with i when short is set.
func datagram(i, size int) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint32(b, uint32(i))
	for j := 4; j < size; j++ {
		b[j] = byte(i*7 + j)
	}
	return b
}

// readAll reads until want datagrams arrived or 3 s passed, checking each.
func readAll(t *testing.T, c *Conn, from netip.AddrPort, want int, sizeOf func(int) int) {
	t.Helper()
	ms := make([]Message, 8)
	for i := range ms {
		ms[i].Buf = make([]byte, MaxTrain)
	}
	got := 0
	c.UDPConn().SetReadDeadline(time.Now().Add(3 * time.Second))
	for got < want {
		n, err := c.ReadBatch(ms)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", got, want, err)
		}
		for _, m := range ms[:n] {
			if m.Addr != from {
				t.Fatalf("datagram from %v, want %v", m.Addr, from)
			}
			m.Datagrams(func(b []byte) {
				if len(b) != sizeOf(got) || int(binary.BigEndian.Uint32(b)) != got {
					t.Fatalf("datagram %d: %d bytes seq %d, want %d bytes", got, len(b), binary.BigEndian.Uint32(b), sizeOf(got))
				}
				for j := 4; j < len(b); j++ {
					if b[j] != byte(got*7+j) {
						t.Fatalf("datagram %d corrupted at %d", got, j)
					}
				}
				got++
			})
		}
	}
}

// A batch of trains (GSO where the kernel has it) and single datagrams
// arrives whole, each datagram on its own, in order, on both socket
// families.
func TestWriteBatchTrainsArriveWhole(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}, {"udp", ":0"}} {
		t.Run(tc.network, func(t *testing.T) {
			a := newConn(t, listen(t, tc.network, tc.addr))
			b := newConn(t, listen(t, tc.network, tc.addr))
			to := addrOf(b.UDPConn())
			if !to.Addr().IsValid() || to.Addr().IsUnspecified() {
				lo := netip.MustParseAddr("127.0.0.1")
				if tc.network == "udp6" {
					lo = netip.IPv6Loopback()
				}
				to = netip.AddrPortFrom(lo, to.Port())
			}
			from := addrOf(a.UDPConn())
			if from.Addr().IsUnspecified() {
				from = netip.AddrPortFrom(to.Addr(), from.Port())
			}
			sizeOf := func(i int) int {
				switch {
				case i < 40:
					return 1400
				case i == 40:
					return 300 // ends the train
				default:
					return 200 + i
				}
			}
			var train []byte
			for i := 0; i <= 40; i++ {
				train = append(train, datagram(i, sizeOf(i))...)
			}
			ms := []Message{{Buf: train, Addr: to, Seg: 1400}}
			for i := 41; i < 60; i++ {
				ms = append(ms, Message{Buf: datagram(i, sizeOf(i)), Addr: to})
			}
			if failed, err := a.WriteBatch(ms); failed != 0 {
				t.Fatalf("%d datagrams not sent: %v", failed, err)
			}
			readAll(t, b, from, 60, sizeOf)
			st := a.Stats()
			if st.WriteDatagrams != 60 {
				t.Fatalf("write stats count %d datagrams, want 60", st.WriteDatagrams)
			}
			t.Logf("GSO %v GRO %v: %d datagrams in %d sendmmsg calls; received in %d calls", a.GSO(), b.GRO(), st.WriteDatagrams, st.WriteCalls, b.Stats().ReadCalls)
		})
	}
}

// A datagram the socket cannot address (IPv6 from an IPv4 socket) is
// counted as failed; the others of the batch still go.
func TestWriteBatchSkipsUnusableAddress(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	ms := []Message{
		{Buf: datagram(0, 100), Addr: to},
		{Buf: datagram(99, 100), Addr: netip.MustParseAddrPort("[2001:db8::1]:9")},
		{Buf: datagram(1, 101), Addr: to},
	}
	failed, _ := a.WriteBatch(ms)
	if failed != 1 {
		t.Fatalf("failed = %d, want 1", failed)
	}
	readAll(t, b, addrOf(a.UDPConn()), 2, func(i int) int { return 100 + i })
}

// Datagrams written by many goroutines through a Writer all arrive, each
// whole; a queue that nobody drains drops beyond its bound and counts.
func TestWriterBurstAndBound(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w := NewWriter(a)
	// Not running: the queue fills and then drops.
	pkt := make([]byte, 1000)
	for i := 0; i < QueueLen; i++ {
		if !w.Write(to, pkt) {
			t.Fatalf("datagram %d dropped below the bound", i)
		}
	}
	if w.Write(to, pkt) || w.Drops() != 1 {
		t.Fatalf("write beyond the bound: drops %d, want 1", w.Drops())
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	w.Flush(3 * time.Second)
	ms := []Message{{Buf: make([]byte, MaxTrain)}}
	got := 0
	b.UDPConn().SetReadDeadline(time.Now().Add(3 * time.Second))
	for got < QueueLen {
		n, err := b.ReadBatch(ms)
		if err != nil {
			t.Fatalf("after %d: %v", got, err)
		}
		for _, m := range ms[:n] {
			m.Datagrams(func(d []byte) {
				if len(d) != 1000 {
					t.Fatalf("datagram of %d bytes", len(d))
				}
				got++
			})
		}
	}

	// Four goroutines, two frame sizes, one header each: every datagram
	// arrives as written.
	const per = 500
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				body := datagram(g*per+i, 600+g*100)
				for !w.Write2(to, []byte{byte(g)}, body) {
					time.Sleep(time.Millisecond) // full: let the writer catch up
				}
			}
		}()
	}
	wg.Wait()
	w.Flush(3 * time.Second)
	receiveAll(t, b, 4*per, func(d []byte) int {
		g := int(d[0])
		seq := int(binary.BigEndian.Uint32(d[1:]))
		if len(d) != 1+600+g*100 || seq/per != g {
			t.Fatalf("bad datagram: %d bytes, goroutine %d, seq %d", len(d), g, seq)
		}
		return seq
	})
}

// receiveAll reads datagrams from b until n distinct ones have come; key
// checks each and returns its sequence number, in [0, n).
func receiveAll(t *testing.T, b *Conn, n int, key func(d []byte) int) {
	t.Helper()
	ms := []Message{{Buf: make([]byte, MaxTrain)}}
	seen := make(map[int]bool)
	b.UDPConn().SetReadDeadline(time.Now().Add(3 * time.Second))
	for len(seen) < n {
		k, err := b.ReadBatch(ms)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", len(seen), n, err)
		}
		for _, m := range ms[:k] {
			m.Datagrams(func(d []byte) {
				seq := key(d)
				if seq < 0 || seq >= n || seen[seq] {
					t.Fatalf("datagram %d: out of range or seen before", seq)
				}
				seen[seq] = true
			})
		}
	}
}

// Acknowledgments are small and vary in size, so each burst of them is
// many short trains: the queue takes as many such datagrams as its
// datagram bound, not as many as trains of full-size buffers fit its byte
// budget (64 of them: a burst of 130 acknowledgments was dropped from the
// 129th on).
func TestWriterManySmallTrains(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w := NewWriter(a)
	// 60 then 100 bytes, over and over: the 100 starts a train, the 60
	// ends it. Not running: everything stays queued, up to the bound.
	const n = QueueLen
	for i := 0; i < n; i++ {
		size := 60
		if i%2 == 0 {
			size = 100
		}
		if !w.Write(to, datagram(i, size)) {
			t.Fatalf("datagram %d (%d bytes) dropped with %d queued, below the bound of %d", i, size, w.Queued(), QueueLen)
		}
	}
	if w.Write(to, datagram(n, 100)) || w.Drops() != 1 {
		t.Fatalf("write beyond the bound: drops %d, want 1", w.Drops())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	w.Flush(3 * time.Second)
	receiveAll(t, b, n, func(d []byte) int {
		seq := int(binary.BigEndian.Uint32(d))
		if want := 60 + (1-seq%2)*40; len(d) != want {
			t.Fatalf("datagram %d: %d bytes, want %d", seq, len(d), want)
		}
		return seq
	})
}

// After an upload a node sends only acknowledgments: the upload's big
// trains are let go once none was taken for trimAfter, and small
// datagrams never take one meanwhile.
func TestWriterLetsIdleBigTrainsGo(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w := NewWriter(a)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	for i := 0; i < 200; i++ {
		w.WriteWait(to, datagram(i, 1200))
	}
	w.Flush(3 * time.Second)
	bytesOf := func() (big, all int) {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, t := range w.free {
			if cap(t.buf) > datagramBytes {
				big += cap(t.buf)
			}
		}
		return big, w.bytes
	}
	if big, _ := bytesOf(); big == 0 {
		t.Fatal("no big train free after an upload's datagrams")
	}
	// Acknowledgments only, now and after trimAfter.
	acks := func() {
		for i := 0; i < 50; i++ {
			w.WriteWait(to, datagram(i, 60+i%2*40))
		}
		w.Flush(3 * time.Second)
	}
	acks()
	if big, _ := bytesOf(); big == 0 {
		t.Fatal("big trains let go before trimAfter")
	}
	w.mu.Lock()
	w.bigSeen -= trimAfter // as if a second had passed
	w.mu.Unlock()
	acks()
	big, all := bytesOf()
	if big != 0 || all > 64*datagramBytes {
		t.Fatalf("after acknowledgments alone for %v: %d bytes of big free trains, %d bytes of trains in all", trimAfter, big, all)
	}
}

// The steady state of a Writer and a reader allocates nothing.
func TestWriterReadBatchAllocs(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w := NewWriter(a)
	ms := make([]Message, 8)
	for i := range ms {
		ms[i].Buf = make([]byte, MaxTrain)
	}
	hdr := make([]byte, 9)
	pkt := make([]byte, 1400)
	round := func() {
		for i := 0; i < 32; i++ {
			w.Write2(to, hdr, pkt)
		}
		w.writeOnce(true)
		got := 0
		for got < 32 {
			n, err := b.ReadBatch(ms)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range ms[:n] {
				m.Datagrams(func([]byte) { got++ })
			}
		}
	}
	round() // warm: trains and slices allocated once
	if n := testing.AllocsPerRun(50, round); n != 0 {
		t.Fatalf("%.1f allocations per round of 32 datagrams, want 0", n)
	}
}

// Write2Wait holds a producer back instead of dropping while the writer
// drains, whatever the mix of sizes, with GSO and without: every datagram
// of a burst many queues long arrives. With nobody draining it gives up
// after MaxWait and counts the drop.
func TestWriterWaitForRoom(t *testing.T) {
	for _, gso := range []bool{true, false} {
		t.Run(map[bool]string{true: "gso", false: "no gso"}[gso], func(t *testing.T) {
			a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
			b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
			if !gso {
				a.gso.Store(false)
			}
			to := addrOf(b.UDPConn())
			w := NewWriter(a)

			// Nobody drains: the wait runs out.
			for w.Write2(to, nil, make([]byte, 100)) {
			}
			drops := w.Drops()
			start := time.Now()
			if w.Write2Wait(to, nil, make([]byte, 100)) {
				t.Fatal("Write2Wait into a full queue nobody drains succeeded")
			}
			if d := time.Since(start); d < MaxWait || w.Drops() != drops+1 {
				t.Fatalf("gave up after %v (bound %v), drops %d -> %d", d, MaxWait, drops, w.Drops())
			}

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go w.Run(ctx)
			// Drain what was queued.
			ms := []Message{{Buf: make([]byte, MaxTrain)}}
			w.Flush(3 * time.Second)
			b.UDPConn().SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			for {
				if _, err := b.ReadBatch(ms); err != nil {
					break
				}
			}

			const n = 5 * QueueLen
			drops = w.Drops()
			got := make(chan int)
			go func() {
				seen := 0
				b.UDPConn().SetReadDeadline(time.Now().Add(10 * time.Second))
				for seen < n {
					k, err := b.ReadBatch(ms)
					if err != nil {
						break
					}
					for _, m := range ms[:k] {
						m.Datagrams(func([]byte) { seen++ })
					}
				}
				got <- seen
			}()
			for i := 0; i < n; i++ {
				size := 1400
				if i%3 == 0 {
					size = 80 // an ACK between data: a train per size change
				}
				if !w.Write2Wait(to, nil, make([]byte, size)) {
					t.Fatalf("datagram %d dropped while the writer drains (drops %d)", i, w.Drops()-drops)
				}
				if i%512 == 511 {
					time.Sleep(time.Millisecond) // the loopback receive buffer is finite
				}
			}
			if seen := <-got; seen != n {
				t.Fatalf("%d of %d datagrams arrived", seen, n)
			}
		})
	}
}

// TestWriterControlReserve: a queue that a bulk transfer filled still
// takes control datagrams (probes, relay checks), up to ControlReserve,
// and they go out with the rest.
func TestWriterControlReserve(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w := NewWriter(a)
	// Fill with full-size datagrams until the queue (by count or by
	// bytes) refuses one.
	pkt := make([]byte, 1400)
	queued := 0
	for queued <= QueueLen && w.Write(to, pkt) {
		queued++
	}
	if queued == 0 || queued > QueueLen {
		t.Fatalf("%d data datagrams queued before the first refusal", queued)
	}
	// Control datagrams still get in, up to the reserve (small ones share
	// trains, so the count bounds them: QueueLen + ControlReserve in all).
	probe := []byte("probe")
	accepted := 0
	for accepted < QueueLen+ControlReserve+1 && w.Write2Control(to, []byte{byte(accepted)}, probe) {
		accepted++
	}
	if accepted < ControlReserve {
		t.Fatalf("only %d control datagrams went into the full queue, want at least %d", accepted, ControlReserve)
	}
	if queued+accepted > QueueLen+ControlReserve {
		t.Fatalf("%d datagrams queued in all, beyond QueueLen+ControlReserve", queued+accepted)
	}
	if w.Drops() != 2 {
		t.Fatalf("drops %d, want 2 (one data, one control beyond the reserve)", w.Drops())
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	w.Flush(3 * time.Second)
	ms := []Message{{Buf: make([]byte, MaxTrain)}}
	data, control := 0, 0
	b.UDPConn().SetReadDeadline(time.Now().Add(3 * time.Second))
	for data+control < queued+accepted {
		n, err := b.ReadBatch(ms)
		if err != nil {
			t.Fatalf("after %d data and %d control datagrams: %v", data, control, err)
		}
		for _, m := range ms[:n] {
			m.Datagrams(func(d []byte) {
				if len(d) == len(probe)+1 {
					control++
				} else {
					data++
				}
			})
		}
	}
	if data != queued || control != accepted {
		t.Fatalf("received %d data and %d control datagrams, want %d and %d", data, control, queued, accepted)
	}
}

// A datagram after a pause, while Run sleeps, is written by its producer
// (no wake-up of Run); datagrams that come close together are queued for
// Run and batched as before. Both arrive.
func TestWriterDirectAfterPause(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w, _ := sleepingWriter(t, a)
	recv := func(want string) {
		t.Helper()
		if got := readN(t, b, 1)[0]; got != want {
			t.Fatalf("got %q, want %q", got, want)
		}
	}

	time.Sleep(2 * IdleGap) // a pause
	if !w.Write(to, []byte("lone")) || w.directs.Load() != 1 {
		t.Fatalf("a datagram after a pause: %d direct writes, want 1", w.directs.Load())
	}
	recv("lone")

	// No pause: queued, written by Run.
	w.mu.Lock()
	w.last = time.Since(w.epoch) + time.Hour
	w.mu.Unlock()
	if !w.Write(to, []byte("burst")) || w.directs.Load() != 1 {
		t.Fatalf("a datagram without a pause: %d direct writes, want still 1", w.directs.Load())
	}
	recv("burst")
}

// Datagrams queued under a Hold wait, with Run asleep, until Release
// writes them from the producer's goroutine, in order and in one system
// call; with Holds nested, only the last Release writes.
func TestWriterHoldRelease(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w, asleep := sleepingWriter(t, a)
	time.Sleep(2 * IdleGap) // a pause: without the Hold the first would go direct

	const n = 40
	w.Hold()
	for i := 0; i < n; i++ {
		if !w.Write(to, []byte(fmt.Sprintf("d%02d", i))) {
			t.Fatalf("datagram %d refused under a Hold", i)
		}
	}
	if !asleep() || w.Queued() != n || w.directs.Load() != 0 {
		t.Fatalf("under a Hold: Run asleep %v, %d queued (want %d), %d direct writes (want 0)", asleep(), w.Queued(), n, w.directs.Load())
	}
	_ = b.UDPConn().SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := b.UDPConn().Read(make([]byte, 10)); err == nil {
		t.Fatal("a datagram left before Release")
	}
	calls := a.Stats().WriteCalls
	w.Release()
	if got := a.Stats().WriteCalls - calls; got != 1 {
		t.Fatalf("Release wrote in %d system calls, want 1", got)
	}
	if w.Queued() != 0 || !asleep() {
		t.Fatalf("after Release: %d queued, Run asleep %v; want 0, true", w.Queued(), asleep())
	}
	for i, d := range readN(t, b, n) { // trains split: b has GRO on
		if want := fmt.Sprintf("d%02d", i); d != want {
			t.Fatalf("datagram %d: got %q, want %q", i, d, want)
		}
	}

	// Nested: only the last Release writes; Run still wakes for a
	// producer outside any Hold.
	w.Hold()
	w.Hold()
	w.Write(to, []byte("inner"))
	w.Release()
	if w.Queued() != 1 {
		t.Fatalf("after the inner Release: %d queued, want 1", w.Queued())
	}
	w.Release()
	if got := readN(t, b, 1)[0]; got != "inner" {
		t.Fatalf("got %q, want inner", got)
	}
	w.mu.Lock()
	w.last = time.Since(w.epoch) + time.Hour // no pause: queued for Run
	w.mu.Unlock()
	w.Write(to, []byte("run"))
	if got := readN(t, b, 1)[0]; got != "run" {
		t.Fatalf("got %q, want run (written by Run)", got)
	}
}

// A long Hold keeps the queue shallow (it writes every holdFlush
// datagrams, since the relay's fairness reads the depth), and never turns a
// full queue into drops: with Run asleep, the producer that fills the queue
// (here its bytes, with large datagrams) writes it itself and goes on.
func TestWriterHoldFullQueue(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w, _ := sleepingWriter(t, a)
	for _, c := range []struct{ n, size int }{{QueueLen + 100, 1200}, {100, 60000}} {
		before := a.Stats().WriteDatagrams
		pkt := make([]byte, c.size)
		w.Hold()
		for i := 0; i < c.n; i++ {
			if !w.Write(to, pkt) {
				t.Fatalf("%d-byte datagram %d of %d dropped under a Hold", c.size, i, c.n)
			}
			if q := w.Queued(); q > holdFlush {
				t.Fatalf("%d datagrams queued under a Hold, want at most %d", q, holdFlush)
			}
		}
		w.Release()
		w.Flush(5 * time.Second)
		if got := a.Stats().WriteDatagrams - before; got != uint64(c.n) || w.Drops() != 0 {
			t.Fatalf("%d-byte datagrams: %d written, %d dropped; want %d, 0", c.size, got, w.Drops(), c.n)
		}
	}
}

// A datagram that another producer writes between the end of a Hold and
// its Release's write is queued behind what the Hold queued, never written
// directly ahead of it, though Run sleeps and the writer looks idle.
func TestWriterNoOvertakingAfterHold(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	to := addrOf(b.UDPConn())
	w, _ := sleepingWriter(t, a)
	w.Hold()
	w.Write(to, []byte("d1"))
	// Release's first half (the Hold ends), then another producer's
	// datagram after what looks like a pause, then Release's write.
	w.mu.Lock()
	w.held--
	w.last = time.Since(w.epoch) - time.Hour
	w.mu.Unlock()
	w.Write(to, []byte("d2"))
	w.writeOnce(false)
	if d := w.directs.Load(); d != 0 {
		t.Fatalf("%d direct writes with a datagram queued, want 0", d)
	}
	if got := readN(t, b, 2); got[0] != "d1" || got[1] != "d2" {
		t.Fatalf("received %q, want [d1 d2]", got)
	}
}

// Two producers, one forwarding in Holds as the relay's reader does and one
// writing alone: each one's datagrams arrive in the order it wrote them.
func TestWriterHoldKeepsEachProducersOrder(t *testing.T) {
	a := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	b := newConn(t, listen(t, "udp4", "127.0.0.1:0"))
	_ = b.UDPConn().SetReadBuffer(8 << 20)
	to := addrOf(b.UDPConn())
	w, _ := sleepingWriter(t, a)
	const n = 3000
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < n; {
			w.Hold()
			for k := 0; k < 16 && i < n; k, i = k+1, i+1 {
				w.WriteWait(to, []byte(fmt.Sprintf("h%05d", i)))
			}
			w.Release()
		}
	}()
	for i := 0; i < n; i++ {
		w.WriteWait(to, []byte(fmt.Sprintf("o%05d", i)))
		if i%64 == 0 {
			time.Sleep(2 * IdleGap) // now and then a pause: direct writes
		}
	}
	<-done
	w.Flush(5 * time.Second)
	// Loopback may drop what the reader is too slow for; what arrives
	// must be in order.
	last := map[byte]string{}
	ms := []Message{{Buf: make([]byte, MaxTrain)}}
	got := 0
	for {
		_ = b.UDPConn().SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		if _, err := b.ReadBatch(ms); err != nil {
			break
		}
		ms[0].Datagrams(func(d []byte) {
			got++
			if p := last[d[0]]; string(d) <= p {
				t.Errorf("%q arrived after %q", d, p)
			}
			last[d[0]] = string(d)
		})
	}
	if got < n {
		t.Fatalf("only %d of the %d datagrams arrived, want at least %d", got, 2*n, n)
	}
}

// readN reads n datagrams from c (GRO trains split), failing after 5 s.
func readN(t *testing.T, c *Conn, n int) []string {
	t.Helper()
	var got []string
	ms := []Message{{Buf: make([]byte, MaxTrain)}}
	for len(got) < n {
		_ = c.UDPConn().SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.ReadBatch(ms); err != nil {
			t.Fatalf("after %d datagrams: %v", len(got), err)
		}
		ms[0].Datagrams(func(d []byte) { got = append(got, string(d)) })
	}
	return got
}

// sleepingWriter starts a Writer on c whose Run has gone to sleep (nothing
// queued), stopped when the test ends; asleep reports whether Run sleeps.
func sleepingWriter(t *testing.T, c *Conn) (w *Writer, asleep func() bool) {
	t.Helper()
	w = NewWriter(c)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go w.Run(ctx)
	asleep = func() bool { w.mu.Lock(); defer w.mu.Unlock(); return w.asleep }
	for !asleep() {
		time.Sleep(time.Millisecond)
	}
	return w, asleep
}
