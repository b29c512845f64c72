package session

import (
	"bytes"
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// recordPath remembers what was sent on it.
type recordPath struct {
	mu   sync.Mutex
	sent []sentPkt
	err  error
}

type sentPkt struct {
	id  uint64
	pkt []byte
}

func (r *recordPath) Send(id uint64, pkt []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent = append(r.sent, sentPkt{id, append([]byte(nil), pkt...)})
	return r.err
}

func (r *recordPath) all() []sentPkt {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]sentPkt(nil), r.sent...)
}

func TestConnWriteToFollowsPath(t *testing.T) {
	relay, direct := &recordPath{}, &recordPath{}
	c := NewConn(relay)
	defer c.Close()

	write := func(id uint64, s string) {
		t.Helper()
		n, err := c.WriteTo([]byte(s), Addr(id))
		if err != nil || n != len(s) {
			t.Fatalf("WriteTo(%q, %d) = %d, %v", s, id, n, err)
		}
	}
	write(5, "r1")
	c.SetPath(5, direct)
	write(5, "d1")
	write(6, "r2") // another session stays on the relay
	c.SetPath(5, nil)
	write(5, "r3")

	want := map[*recordPath][]sentPkt{
		relay:  {{5, []byte("r1")}, {6, []byte("r2")}, {5, []byte("r3")}},
		direct: {{5, []byte("d1")}},
	}
	for p, w := range want {
		got := p.all()
		if len(got) != len(w) {
			t.Fatalf("path got %d packets, want %d: %v", len(got), len(w), got)
		}
		for i := range w {
			if got[i].id != w[i].id || !bytes.Equal(got[i].pkt, w[i].pkt) {
				t.Errorf("packet %d = %d/%q, want %d/%q", i, got[i].id, got[i].pkt, w[i].id, w[i].pkt)
			}
		}
	}
}

func TestConnWriteToErrors(t *testing.T) {
	relay := &recordPath{err: errors.New("gateway down")}
	c := NewConn(relay)

	// A path error is a lost packet, as on UDP: counted, not returned.
	if n, err := c.WriteTo([]byte("abc"), Addr(1)); err != nil || n != 3 {
		t.Fatalf("WriteTo over a failing path = %d, %v; want 3, nil", n, err)
	}
	if _, sendFailed := c.Drops(); sendFailed != 1 {
		t.Fatalf("sendFailed = %d, want 1", sendFailed)
	}
	udp := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}
	if _, err := c.WriteTo([]byte("abc"), udp); err == nil {
		t.Fatal("WriteTo a UDP address accepted")
	}
	c.Close()
	if _, err := c.WriteTo([]byte("abc"), Addr(1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("WriteTo after Close = %v, want net.ErrClosed", err)
	}
	if n := len(relay.all()); n != 1 {
		t.Fatalf("path saw %d packets, want only the first", n)
	}
}

func TestConnDeliverReadFrom(t *testing.T) {
	c := NewConn(&recordPath{})
	defer c.Close()
	c.Deliver(0xabc, []byte("first"))
	c.Deliver(7, []byte("second"))
	for _, want := range []struct {
		id  uint64
		pkt string
	}{{0xabc, "first"}, {7, "second"}} {
		buf := make([]byte, 1500)
		n, addr, err := c.ReadFrom(buf)
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := IDOf(addr); string(buf[:n]) != want.pkt || got != want.id || addr.String() != Addr(want.id).String() {
			t.Fatalf("ReadFrom = %q from %v, want %q from %v", buf[:n], addr, want.pkt, Addr(want.id))
		}
		if addr.Network() != "nlvpn-session" {
			t.Fatalf("addr network = %q", addr.Network())
		}
	}
}

func TestConnFullInboundQueueDrops(t *testing.T) {
	c := NewConn(&recordPath{})
	defer c.Close()
	const extra = 10
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < inQueueLen+extra; i++ {
			c.Deliver(uint64(i+1), []byte{byte(i)})
		}
	}()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Deliver blocked on a full inbound queue")
	}
	if inFull, _ := c.Drops(); inFull != extra {
		t.Fatalf("inFull = %d, want %d", inFull, extra)
	}
	// The queued ones are intact and in order; the newest were dropped.
	buf := make([]byte, 10)
	for i := 0; i < inQueueLen; i++ {
		n, addr, err := c.ReadFrom(buf)
		if got, _ := IDOf(addr); err != nil || n != 1 || buf[0] != byte(i) || got != uint64(i+1) {
			t.Fatalf("packet %d: %d %x %v %v", i, n, buf[:n], addr, err)
		}
	}
}

// readResult runs ReadFrom in the background.
func readAsync(c *Conn) <-chan error {
	ch := make(chan error, 1)
	go func() {
		_, _, err := c.ReadFrom(make([]byte, 100))
		ch <- err
	}()
	return ch
}

func TestConnReadDeadline(t *testing.T) {
	c := NewConn(&recordPath{})
	defer c.Close()

	// A deadline in the future unblocks a waiting read when it passes.
	if err := c.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	select {
	case err := <-readAsync(c):
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadFrom = %v, want os.ErrDeadlineExceeded", err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("deadline error %v is not a net.Error timeout", err)
		}
		if d := time.Since(start); d < 40*time.Millisecond {
			t.Fatalf("ReadFrom returned after %v, before the deadline", d)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadFrom ignored the read deadline")
	}
	// While passed, every read fails at once.
	if _, _, err := c.ReadFrom(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("second ReadFrom = %v, want os.ErrDeadlineExceeded", err)
	}

	// A zero deadline lets reads block again.
	if err := c.SetReadDeadline(time.Time{}); err != nil {
		t.Fatal(err)
	}
	ch := readAsync(c)
	select {
	case err := <-ch:
		t.Fatalf("ReadFrom with no deadline returned at once: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	c.Deliver(3, []byte("x"))
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("ReadFrom after Deliver = %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadFrom did not return the delivered packet")
	}

	// A deadline set in the past unblocks a read that is already waiting
	// (quic-go does this to stop its reader).
	ch = readAsync(c)
	time.Sleep(20 * time.Millisecond)
	c.SetReadDeadline(time.Now().Add(-time.Second))
	select {
	case err := <-ch:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ReadFrom = %v, want os.ErrDeadlineExceeded", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a past deadline did not unblock a waiting ReadFrom")
	}

	// Moving a deadline further out before it passes keeps the read waiting.
	c.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	c.SetReadDeadline(time.Now().Add(time.Hour))
	ch = readAsync(c)
	select {
	case err := <-ch:
		t.Fatalf("ReadFrom returned %v although the deadline was extended", err)
	case <-time.After(100 * time.Millisecond):
	}
	c.Close()
	select {
	case err := <-ch:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("ReadFrom after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not unblock ReadFrom")
	}
}

func TestConnCloseUnblocksReadFrom(t *testing.T) {
	c := NewConn(&recordPath{})
	ch := readAsync(c)
	time.Sleep(20 * time.Millisecond)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("ReadFrom = %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not unblock ReadFrom")
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, _, err := c.ReadFrom(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("ReadFrom on a closed conn = %v", err)
	}
}

// TestConnClearedDeadlineStaysCleared: clearing a deadline at the moment
// its timer fires must not leave the conn timed out. net.Conn semantics:
// after SetReadDeadline(time.Time{}) returns, reads do not time out.
func TestConnClearedDeadlineStaysCleared(t *testing.T) {
	c := NewConn(&recordPath{})
	defer c.Close()
	buf := make([]byte, 4)
	for i := 0; i < 1000; i++ {
		c.SetReadDeadline(time.Now().Add(time.Duration(i%50) * time.Microsecond))
		c.SetReadDeadline(time.Time{})
		time.Sleep(100 * time.Microsecond) // let a timer that already fired run
		c.Deliver(1, []byte("ok"))
		if _, _, err := c.ReadFrom(buf); err != nil {
			// Drain the packet so the next round starts clean.
			c.SetReadDeadline(time.Time{})
			t.Fatalf("iteration %d: ReadFrom after clearing the deadline = %v", i, err)
		}
	}
}
