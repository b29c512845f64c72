package wire

import (
	"context"
	"errors"
	"io"
	"sync"
	"time"
)

// Stream is what a Channel writes to: a QUIC stream, in practice.
type Stream interface {
	io.Writer
	SetWriteDeadline(time.Time) error
}

// writeTimeout bounds one control message write: a peer that stops
// reading must not hold a writer forever.
const writeTimeout = 10 * time.Second

// ErrChannelClosed is returned by Request once the channel is closed.
var ErrChannelClosed = errors.New("control channel closed")

// Channel is one end of a control stream, as the gateway and the nodes
// both use it: writes are serialized and bounded in time, and a request
// is matched to its reply by ID. The owner reads the stream and hands
// every message to Deliver first.
type Channel struct {
	s   Stream
	wmu sync.Mutex

	mu      sync.Mutex
	pending map[uint64]chan *Message
	nextID  uint64
	closed  bool
}

// NewChannel wraps s.
func NewChannel(s Stream) *Channel {
	return &Channel{s: s, pending: make(map[uint64]chan *Message)}
}

// Write sends one message.
func (c *Channel) Write(m *Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.s.SetWriteDeadline(time.Now().Add(writeTimeout))
	return WriteMessage(c.s, m)
}

// Request sends m with a fresh ID and waits for the reply. A reply of type
// error comes back as a *Error.
func (c *Channel) Request(ctx context.Context, m *Message) (*Message, error) {
	ch := make(chan *Message, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrChannelClosed
	}
	c.nextID++
	m.ID = c.nextID
	c.pending[m.ID] = ch
	c.mu.Unlock()
	defer c.forget(m.ID)
	if err := c.Write(m); err != nil {
		return nil, err
	}
	select {
	case r, ok := <-ch:
		if !ok {
			return nil, ErrChannelClosed
		}
		if r.Type == TypeError {
			return nil, r.Error
		}
		return r, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (c *Channel) forget(id uint64) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// Deliver hands m to the request it answers and reports whether there was
// one. A second reply to the same ID is dropped.
func (c *Channel) Deliver(m *Message) bool {
	c.mu.Lock()
	ch, ok := c.pending[m.ID]
	delete(c.pending, m.ID)
	c.mu.Unlock()
	if ok {
		ch <- m // buffered, and removed above: never blocks
	}
	return ok
}

// Close fails every waiting request with ErrChannelClosed, and every later
// one. It does not close the stream.
func (c *Channel) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
}
