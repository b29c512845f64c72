package quic

import (
	"net"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go/internal/protocol"
)

// inlineSender writes each packet from the caller's goroutine (the
// connection's run loop), for Config.SendWithoutQueue: a PacketConn that
// only queues its writes needs no goroutine of its own in front of it, and
// the hand-off to one costs a channel operation and, often, a wake-up per
// packet. It never reports that it would block.
type inlineSender struct {
	conn sendConn

	// stopped is set once Close is called or a write failed: Send checks
	// it with one atomic load instead of a select over the two channels,
	// which locks both of them for every packet.
	stopped atomic.Bool

	closeOnce   sync.Once
	closeCalled chan struct{}
	failOnce    sync.Once
	failed      chan struct{} // closed with err set on the first write error
	err         error
	runStopped  chan struct{}
}

var _ sender = &inlineSender{}

func newInlineSender(conn sendConn) sender {
	return &inlineSender{
		conn:        conn,
		closeCalled: make(chan struct{}),
		failed:      make(chan struct{}),
		runStopped:  make(chan struct{}),
	}
}

// Send writes p and releases it. An error other than "message too large"
// (which path MTU discovery and loss detection deal with, as with the
// queue) ends Run with that error, which closes the connection.
func (h *inlineSender) Send(p *packetBuffer, gsoSize uint16, ecn protocol.ECN) {
	if h.stopped.Load() {
		p.Release()
		return
	}
	err := h.conn.Write(p.Data, gsoSize, ecn)
	p.Release()
	if err != nil && !isSendMsgSizeErr(err) {
		h.failOnce.Do(func() {
			h.err = err
			h.stopped.Store(true)
			close(h.failed)
		})
	}
}

func (h *inlineSender) SendProbe(p *packetBuffer, addr net.Addr, info packetInfo) {
	h.conn.WriteTo(p.Data, addr, info)
}

func (h *inlineSender) WouldBlock() bool { return false }

// Available is never ready: WouldBlock is never true.
func (h *inlineSender) Available() <-chan struct{} { return nil }

// Run waits until Close, or returns the first write error.
func (h *inlineSender) Run() error {
	defer close(h.runStopped)
	select {
	case <-h.closeCalled:
		return nil
	case <-h.failed:
		return h.err
	}
}

func (h *inlineSender) Close() {
	h.closeOnce.Do(func() {
		h.stopped.Store(true)
		close(h.closeCalled)
	})
	<-h.runStopped
}
