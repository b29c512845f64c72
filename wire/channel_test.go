package wire

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"
)

// A request gets its own reply (by ID), an error reply comes back as
// *Error, a duplicate reply is not taken for another request, and Close
// fails the requests still waiting.
func TestChannelRequestReply(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	ch := NewChannel(a)
	// The far end answers accept for ID 1, an error for ID 2, and reads
	// (without answering) everything else.
	go func() {
		for {
			m, err := ReadMessage(b)
			if err != nil {
				return
			}
			switch m.ID {
			case 1:
				ch.Deliver(&Message{Type: TypeAccept, ID: 1, Accept: &Accept{ID: 7}})
				if ch.Deliver(&Message{Type: TypeAccept, ID: 1, Accept: &Accept{ID: 8}}) {
					t.Error("a second reply to ID 1 was delivered")
				}
			case 2:
				ch.Deliver(&Message{Type: TypeError, ID: 2, Error: &Error{Code: CodeUnknownAgent, Message: "no"}})
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := ch.Request(ctx, &Message{Type: TypeConnect, Connect: &Connect{Agent: "miranda"}})
	if err != nil || r.Accept == nil || r.Accept.ID != 7 {
		t.Fatalf("first request: %+v %v", r, err)
	}
	_, err = ch.Request(ctx, &Message{Type: TypeConnect, Connect: &Connect{Agent: "nosuch"}})
	var we *Error
	if !errors.As(err, &we) || we.Code != CodeUnknownAgent {
		t.Fatalf("error reply: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := ch.Request(ctx, &Message{Type: TypeConnect, Connect: &Connect{Agent: "slow"}})
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	ch.Close()
	if err := <-done; !errors.Is(err, ErrChannelClosed) {
		t.Fatalf("waiting request after Close: %v", err)
	}
	if _, err := ch.Request(ctx, &Message{Type: TypeConnect, Connect: &Connect{Agent: "late"}}); !errors.Is(err, ErrChannelClosed) {
		t.Fatalf("request after Close: %v", err)
	}
	if ch.Deliver(&Message{Type: TypeAccept, ID: 3, Accept: &Accept{ID: 3}}) {
		t.Fatal("a reply was delivered after Close")
	}
}

// A request whose context ends gives up and is forgotten.
func TestChannelRequestTimeout(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	go func() {
		for {
			if _, err := ReadMessage(b); err != nil {
				return
			}
		}
	}()
	ch := NewChannel(a)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := ch.Request(ctx, &Message{Type: TypeConnect, Connect: &Connect{Agent: "x"}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	if ch.Deliver(&Message{Type: TypeAccept, ID: 1, Accept: &Accept{ID: 1}}) {
		t.Fatal("a late reply found the request that gave up")
	}
}
