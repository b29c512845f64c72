package quic

import (
	"errors"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go/internal/protocol"
)

// recordingSendConn records what is written to it; only Write is used.
type recordingSendConn struct {
	sendConn
	mu     sync.Mutex
	writes []string
	err    error
}

func (c *recordingSendConn) Write(b []byte, _ uint16, _ protocol.ECN) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes = append(c.writes, string(b))
	return c.err
}

func (c *recordingSendConn) written() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.writes...)
}

func inlinePacket(s string) *packetBuffer {
	b := getPacketBuffer()
	b.Data = append(b.Data, s...)
	return b
}

func runSender(s sender) <-chan error {
	done := make(chan error, 1)
	go func() { done <- s.Run() }()
	return done
}

func waitRun(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

// The packet is written before Send returns, in order, and the sender
// never reports that it would block.
func TestInlineSenderWritesAtOnce(t *testing.T) {
	c := &recordingSendConn{}
	s := newInlineSender(c)
	done := runSender(s)
	for _, p := range []string{"one", "two", "three"} {
		if s.WouldBlock() {
			t.Fatal("an inline sender reported that it would block")
		}
		s.Send(inlinePacket(p), 0, protocol.ECNNon)
	}
	if got := c.written(); len(got) != 3 || got[0] != "one" || got[2] != "three" {
		t.Fatalf("written %q", got)
	}
	s.Close()
	if err := waitRun(t, done); err != nil {
		t.Fatalf("Run after Close: %v", err)
	}
	s.Send(inlinePacket("late"), 0, protocol.ECNNon)
	if got := c.written(); len(got) != 3 {
		t.Fatalf("a packet sent after Close was written: %q", got)
	}
}

// A write error ends Run with it (which closes the connection) and no
// further packet is written; "message too long" does not.
func TestInlineSenderWriteError(t *testing.T) {
	if isSendMsgSizeErr(syscall.EMSGSIZE) {
		c := &recordingSendConn{err: syscall.EMSGSIZE}
		s := newInlineSender(c)
		done := runSender(s)
		s.Send(inlinePacket("too big"), 0, protocol.ECNNon)
		select {
		case err := <-done:
			t.Fatalf("Run ended on a message-size error: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		s.Close()
		waitRun(t, done)
	}

	boom := errors.New("boom")
	c := &recordingSendConn{err: boom}
	s := newInlineSender(c)
	done := runSender(s)
	s.Send(inlinePacket("first"), 0, protocol.ECNNon)
	if err := waitRun(t, done); !errors.Is(err, boom) {
		t.Fatalf("Run returned %v, want the write error", err)
	}
	s.Send(inlinePacket("second"), 0, protocol.ECNNon)
	if got := c.written(); len(got) != 1 {
		t.Fatalf("written after the error: %q", got)
	}
	s.Close() // returns, Run has ended
}
