package netstack

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/nlvpn/nlvpn/wire"
)

var egSpliceBufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// handleTCP runs on a goroutine gVisor starts for each new SYN (at most
// egTCPMaxInFlight at once). It dials the remote target first and completes the
// tunneled handshake only if that succeeded; otherwise the client gets a RST.
func (e *Egress) handleTCP(r *tcp.ForwarderRequest) {
	if !e.track() {
		r.Complete(false)
		return
	}
	defer e.wg.Done()

	id := r.ID()
	dst := egAddrPortFrom(id.LocalAddress, id.LocalPort)
	src := egAddrPortFrom(id.RemoteAddress, id.RemotePort)
	log := e.log.With("proto", "tcp", "src", src, "dst", dst)
	if !e.allow(src.Addr(), dst, "tcp") {
		e.c.denied.Add(1)
		log.Debug("tcp flow denied by policy")
		r.Complete(true)
		return
	}
	// A client at its flow bound gets a RST, like a refused port: its
	// program sees an error at once. A client at its dial bound gets
	// nothing: the SYN is dropped and its retransmission may find a free
	// slot, as with a full listen backlog. Either way gVisor's shared
	// in-flight SYN slot is given back at once, so one client dialing a
	// blackholed address cannot hold the slots the others need.
	client := wire.OverlayOwner(src.Addr()) // its IPv6 overlay address counts as its IPv4 one
	if !e.ledger.acquire(client, egTCP) {
		r.Complete(true)
		return
	}
	defer e.ledger.release(client, egTCP)
	if !e.ledger.acquire(client, egDial) {
		r.Complete(false)
		return
	}
	ctx, cancel := context.WithTimeout(context.WithValue(e.ctx, egClientKey{}, client), DefaultEgressDialTimeout)
	remote, err := e.dial(ctx, "tcp", dst.String())
	cancel()
	e.ledger.release(client, egDial)
	if err != nil {
		e.c.dialFailures.Add(1)
		log.Debug("tcp dial failed", "error", err)
		r.Complete(true)
		return
	}
	if !e.addCloser(remote) {
		r.Complete(false)
		return
	}
	defer e.removeCloser(remote)
	e.ledger.addConn(client, remote)
	defer e.ledger.removeConn(client, remote)

	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		log.Debug("tcp handshake with client failed", "error", terr.String())
		r.Complete(true)
		return
	}
	r.Complete(false)
	ep.SocketOptions().SetKeepAlive(true)
	tunneled := gonet.NewTCPConn(&wq, ep)
	if !e.addCloser(tunneled) {
		return
	}
	defer e.removeCloser(tunneled)

	e.c.tcpFlows.Add(1)
	log.Debug("tcp flow open")
	up, down := egSpliceLazy(tunneled, ep, &wq, remote)
	log.Debug("tcp flow closed", "bytes_up", up, "bytes_down", down)
}

type egCloseWriter interface{ CloseWrite() error }

// egSplice copies both ways between the tunneled conn and the remote one until
// both directions are done. When one side finishes writing (EOF), the other
// side's write half is closed, so half-closed connections work; an error in
// either direction tears both down.
func egSplice(client, remote net.Conn) (up, down int64) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		up = egCopyHalf(remote, client)
	}()
	down = egCopyHalf(client, remote)
	wg.Wait()
	return up, down
}

func egCopyHalf(dst, src net.Conn) int64 {
	bp := egSpliceBufPool.Get().(*[]byte)
	defer egSpliceBufPool.Put(bp)
	n, err := io.CopyBuffer(egOnlyWriter{dst}, egOnlyReader{src}, *bp)
	if err == nil {
		err = io.EOF // CopyBuffer reports the source's EOF as nil
	}
	egEndHalf(dst, src, err)
	return n
}

// egOnlyWriter and egOnlyReader hide ReadFrom/WriteTo so io.CopyBuffer uses our
// pooled buffer instead of its generic fallbacks' own allocations.
type egOnlyWriter struct{ io.Writer }
type egOnlyReader struct{ io.Reader }

// egSpliceLazy is egSplice holding no copy buffer while a direction waits:
// an idle connection (an ssh session, a keep-alive HTTP connection) costs
// no 64 KiB buffers, only its endpoints and goroutines. Each direction
// waits for data without a buffer (the tunneled side on its waiter queue,
// the real socket in the runtime poller) and borrows a pooled one only
// while data moves. Where the real socket cannot be read that way it is
// egSplice.
func egSpliceLazy(tunneled *gonet.TCPConn, ep tcpip.Endpoint, wq *waiter.Queue, remote net.Conn) (up, down int64) {
	if !egCanReadRaw(remote) {
		return egSplice(tunneled, remote)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		up = egCopyUpLazy(remote, tunneled, ep, wq)
	}()
	down = egCopyDownLazy(tunneled, remote)
	wg.Wait()
	return up, down
}

// egCopyUpLazy copies the client's bytes to the real connection until EOF
// (then half-closes it) or an error (then closes both).
func egCopyUpLazy(remote net.Conn, tunneled *gonet.TCPConn, ep tcpip.Endpoint, wq *waiter.Queue) int64 {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	var total int64
	for {
		if ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) == 0 {
			<-ready
			continue
		}
		bp := egSpliceBufPool.Get().(*[]byte)
		var err error
		for err == nil && ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) != 0 {
			var n int
			n, err = tunneled.Read(*bp)
			if n > 0 {
				total += int64(n)
				if _, werr := remote.Write((*bp)[:n]); werr != nil {
					err = werr
				}
			}
		}
		egSpliceBufPool.Put(bp)
		if err != nil {
			egEndHalf(remote, tunneled, err)
			return total
		}
	}
}

// egEndHalf ends one direction: at EOF it half-closes dst, so half-closed
// connections work; on an error (or if dst cannot half-close) it closes
// both, so the other direction ends too.
func egEndHalf(dst, src net.Conn, err error) {
	if errors.Is(err, io.EOF) {
		if cw, ok := dst.(egCloseWriter); ok && cw.CloseWrite() == nil {
			return
		}
	}
	_ = dst.Close()
	_ = src.Close()
}
