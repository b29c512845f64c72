package punch

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/session"
)

func TestMuxRunReturnsWhenFrameSocketCloses(t *testing.T) {
	qc, frames, err := platform.ListenUDPPair("127.0.0.1:0")
	if err != nil || frames == nil {
		t.Skip(err)
	}
	defer qc.Close()
	m := NewMux(&quic.Transport{Conn: qc}, frames, session.NewConn(Blackhole{}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { m.Run(ctx); close(done) }()
	time.Sleep(50 * time.Millisecond)
	var r0, r1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &r0)
	frames.Close()
	select {
	case <-done:
	case <-time.After(500 * time.Millisecond):
		syscall.Getrusage(syscall.RUSAGE_SELF, &r1)
		cpu := time.Duration(r1.Utime.Nano() + r1.Stime.Nano() - r0.Utime.Nano() - r0.Stime.Nano())
		t.Fatalf("Run still running 500ms after its frame socket closed; burned %v CPU meanwhile", cpu)
	}
}
