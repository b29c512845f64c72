package session

import (
	"testing"
	"time"
)

// BenchmarkSessionRoundTrip sends one full-size tunnel packet through a
// peer session and waits for the peer to send it back: both QUIC stacks
// (TLS 1.3 AEAD, framing, the path-selecting conn) twice per op, with an
// in-memory path and nothing else. Per-packet cost, free of network noise.
func BenchmarkSessionRoundTrip(b *testing.B) {
	p := newPeerPair(b)
	cc, ac := p.connect(b, 7)
	client, agent := New(7, cc, quietLog()), New(7, ac, quietLog())
	back := make(chan struct{}, 1)
	go agent.Run(func(pkt []byte) { agent.Send(pkt) })
	go client.Run(func([]byte) { back <- struct{}{} })
	pkt := make([]byte, TunMTU)
	b.SetBytes(int64(2 * len(pkt)))
	b.ReportAllocs()
	b.ResetTimer()
	lost := 0
	for i := 0; i < b.N; i++ {
		client.Send(pkt)
		select {
		case <-back:
		case <-time.After(time.Second):
			lost++ // datagrams are unreliable; count, do not hang
		}
	}
	b.StopTimer()
	if lost > 0 {
		b.ReportMetric(float64(lost), "lost")
	}
}
