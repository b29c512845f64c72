package gateway

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/udpbatch"
)

// frameBatch is how many messages one read of the frame socket takes.
const frameBatch = 16

// serveFrames reads relay frames and relay checks from the gateway's port
// and gives the hub a writer to send frames from it, until ctx ends. With
// the frame socket (frames) that is a batched reader and writer; without
// (the kernel refused the steering program), frames come through quic-go's
// non-QUIC queue and go out through its transport, one at a time. The
// returned channel closes when everything has stopped.
func (g *Gateway) serveFrames(ctx context.Context, tr *quic.Transport, frames *net.UDPConn) (<-chan struct{}, error) {
	done := make(chan struct{})
	// Frames that reach quic-go's socket: all of them without the frame
	// socket; with it, now and then (the kernel may pick a socket of the
	// pair before the steering program runs), and quic-go's short queue
	// must not keep them.
	viaQUIC := make(chan struct{})
	go func() {
		defer close(viaQUIC)
		buf := make([]byte, 2048)
		for {
			n, addr, err := tr.ReadNonQUICPacket(ctx, buf)
			if err != nil {
				return
			}
			if ua, ok := addr.(*net.UDPAddr); ok {
				ap := ua.AddrPort()
				g.hub.HandleUDP(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), buf[:n])
			}
		}
	}()
	if frames == nil {
		g.log.Warn("the kernel refused the UDP steering program: relay frames go through the QUIC socket's short queue (slower)")
		g.hub.SetUDP(&transportWriter{tr: tr})
		go func() { <-viaQUIC; close(done) }()
		return done, nil
	}
	bio, err := udpbatch.New(frames, frameBatch)
	if err != nil {
		frames.Close()
		return nil, err
	}
	w := udpbatch.NewWriter(bio)
	g.hub.SetUDP(w)
	g.frameIO.Store(bio)
	wdone := make(chan struct{})
	go func() { w.Run(ctx); close(wdone) }()
	go func() {
		<-ctx.Done()
		<-wdone
		frames.Close() // ends the reader
	}()
	go func() {
		defer close(done)
		defer func() { <-wdone; <-viaQUIC }()
		size := 2048
		if bio.GRO() {
			size = udpbatch.MaxTrain
		}
		ms := make([]udpbatch.Message, frameBatch)
		bufs := make([][]byte, frameBatch)
		for i := range bufs {
			bufs[i] = make([]byte, size)
		}
		for {
			for i := range ms {
				ms[i] = udpbatch.Message{Buf: bufs[i]}
			}
			n, err := bio.ReadBatch(ms)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
					return
				}
				continue
			}
			now := time.Now().UnixNano() // once per batch: see HandleUDPAt
			// What the batch forwards goes out in one sendmmsg from this
			// goroutine (Release), not by waking the writer's.
			w.Hold()
			for i := range ms[:n] {
				from := ms[i].Addr
				// The hub's writer copies what it forwards: the buffers
				// are free again after this loop.
				ms[i].Datagrams(func(b []byte) { g.hub.HandleUDPAt(from, b, now) })
			}
			w.Release()
		}
	}()
	return done, nil
}

// transportWriter sends frames through quic-go's transport, one write
// each: the fallback without a frame socket.
type transportWriter struct {
	tr *quic.Transport
	mu sync.Mutex
}

// WriteWait is Write: each write is a system call already.
func (t *transportWriter) WriteWait(to netip.AddrPort, b []byte) bool { return t.Write(to, b) }

func (t *transportWriter) Write(to netip.AddrPort, b []byte) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, err := t.tr.WriteTo(b, net.UDPAddrFromAddrPort(to))
	return err == nil
}
