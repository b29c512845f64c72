package udpbatch

import (
	"context"
	"testing"
	"time"
)

// BenchmarkWriterWriteWait is a sending QUIC stack's per-datagram cost of
// the node's socket writer under load: queue a full-size datagram (behind
// others, in a GSO train) while Run writes the trains; the socket's
// writes are in it, spread over the datagrams of each batch. The receiver
// reads nothing, so the kernel drops what overflows its buffer.
func BenchmarkWriterWriteWait(b *testing.B) {
	a := newConn(b, listen(b, "udp4", "127.0.0.1:0"))
	to := addrOf(listen(b, "udp4", "127.0.0.1:0"))
	w := NewWriter(a)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	pkt := make([]byte, 1400)
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if !w.WriteWait(to, pkt) {
			b.Fatalf("datagram %d dropped", i)
		}
	}
	b.StopTimer()
	w.Flush(time.Second)
}
