package session

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// bufRing hands out a fixed set of buffers in turn, so that a benchmark's
// in-memory path allocates nothing per packet and allocs/op counts only the
// session and the QUIC stacks. A buffer is reused after len(bufs) more
// packets; far more than the Conn's inbound queue holds.
type bufRing struct {
	bufs [][]byte
	next atomic.Uint64
}

func newBufRing() *bufRing {
	r := &bufRing{bufs: make([][]byte, 4*inQueueLen)}
	for i := range r.bufs {
		r.bufs[i] = make([]byte, wire.PeerPacketSize+64)
	}
	return r
}

func (r *bufRing) copyOf(pkt []byte) []byte {
	b := r.bufs[r.next.Add(1)%uint64(len(r.bufs))]
	return b[:copy(b, pkt)]
}

// benchPair is a connected client and agent session over allocation-free
// in-memory paths.
func benchPair(b *testing.B) (client, agent *Session) {
	p := newPeerPair(b)
	p.clientRelay.ring, p.agentRelay.ring = newBufRing(), newBufRing()
	cc, ac := p.connect(b, 7)
	return New(7, cc, quietLog()), New(7, ac, quietLog())
}

// BenchmarkSessionRoundTrip sends one full-size tunnel packet through a
// peer session and waits for the peer to send it back: both QUIC stacks
// (TLS 1.3 AEAD, framing, the path-selecting conn) twice per op, with an
// in-memory path and nothing else. Per-packet cost, free of network noise.
func BenchmarkSessionRoundTrip(b *testing.B) {
	client, agent := benchPair(b)
	back := make(chan struct{}, 1)
	startSession(agent, func(pkt []byte) { agent.Send(pkt); ReleasePacket(pkt) })
	startSession(client, func(pkt []byte) { ReleasePacket(pkt); back <- struct{}{} })
	pkt := make([]byte, wire.TunMTU)
	b.SetBytes(int64(2 * len(pkt)))
	b.ReportAllocs()
	b.ResetTimer()
	lost := 0
	// One timer for the whole run: time.After would put three allocations
	// of its own into every op.
	timeout := time.NewTimer(time.Second)
	defer timeout.Stop()
	for i := 0; i < b.N; i++ {
		client.Send(pkt)
		timeout.Reset(time.Second)
		select {
		case <-back:
		case <-timeout.C:
			lost++ // datagrams are unreliable; count, do not hang
		}
	}
	b.StopTimer()
	if lost > 0 {
		b.ReportMetric(float64(lost), "lost")
	}
}

// BenchmarkSessionOneWay streams full-size packets client → agent with at
// most window of them in flight (sent, not yet received), the way a TUN
// reader feeds a session under load: one op is one packet through
// Session.Send, both QUIC stacks and the receiving Session's delivery to
// its callback. lost/op is the fraction that never arrived: with a window
// beyond a queue's depth that is the queue dropping.
func BenchmarkSessionOneWay(b *testing.B) {
	for _, window := range []int{64, 1024} {
		b.Run(fmt.Sprintf("window=%d", window), func(b *testing.B) {
			client, agent := benchPair(b)
			var got atomic.Int64
			wake := make(chan struct{}, 1)
			startSession(agent, func(pkt []byte) {
				ReleasePacket(pkt)
				got.Add(1)
				select {
				case wake <- struct{}{}:
				default:
				}
			})
			startSession(client, func([]byte) {})
			pkt := make([]byte, wire.TunMTU)
			stall := time.NewTimer(time.Hour)
			b.SetBytes(int64(len(pkt)))
			b.ReportAllocs()
			b.ResetTimer()
			var lost int64 // packets given up on: the window moves past them
			for i := int64(0); i < int64(b.N); i++ {
				for i-lost-got.Load() >= int64(window) {
					stall.Reset(100 * time.Millisecond)
					select {
					case <-wake:
					case <-stall.C:
						lost = i - got.Load()
					}
				}
				client.Send(pkt)
			}
			// Wait for the tail, then count what never came.
			for deadline := time.Now().Add(time.Second); got.Load() < int64(b.N) && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			b.StopTimer()
			b.ReportMetric(float64(int64(b.N)-got.Load())/float64(b.N), "lost/op")
		})
	}
}
