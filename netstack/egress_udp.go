package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/nlvpn/nlvpn/wire"
)

// handleUDP is called synchronously on the Inject goroutine for a datagram
// that matches no existing flow. It checks the policy and the client's
// bounds and creates the tunneled endpoint at once (so the flow's next
// datagrams reach it instead of the forwarder); the real socket is dialed on
// the flow's own goroutine, with datagrams buffered in the endpoint
// meanwhile. A flow holds no copy buffer while it waits (see udpFlow).
func (e *Egress) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := egAddrPortFrom(id.LocalAddress, id.LocalPort)
	src := egAddrPortFrom(id.RemoteAddress, id.RemotePort)
	if !e.allow(src.Addr(), dst, "udp") {
		e.c.denied.Add(1)
		e.log.Debug("udp datagram denied by policy", "proto", "udp", "src", src, "dst", dst)
		return true // handled: dropped silently
	}
	client := wire.OverlayOwner(src.Addr()) // its IPv6 overlay address counts as its IPv4 one
	if !e.ledger.acquire(client, egUDP) {
		return true // dropped, counted in the ledger
	}
	if !e.track() {
		e.ledger.release(client, egUDP)
		return true
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		e.ledger.release(client, egUDP)
		e.wg.Done()
		e.log.Debug("udp endpoint failed", "proto", "udp", "src", src, "dst", dst, "error", terr.String())
		return true
	}
	f := &udpFlow{e: e, ep: ep, wq: &wq, tunneled: gonet.NewUDPConn(&wq, ep), client: client, src: src, dst: dst}
	e.c.udpFlows.Add(1)
	go func() {
		defer e.wg.Done()
		defer e.ledger.release(client, egUDP)
		f.run()
	}()
	return true
}

// egUDPShortIdle is the idle timeout of a UDP flow that has carried at most
// one datagram each way: a DNS or NTP exchange, done after its answer, or a
// datagram nobody answered (as conntrack times out unreplied flows early).
// A resolver that uses a fresh port per query would otherwise hold one flow
// per query for the full idle timeout and run into its client's bound.
const egUDPShortIdle = 10 * time.Second

// egUDPBufPool holds the copy buffers of UDP flows. A flow takes one only
// once a datagram is ready to be read and gives it back after forwarding
// it, so an idle flow costs no buffer at all.
var egUDPBufPool = sync.Pool{New: func() any { b := make([]byte, egMaxIPPacket); return &b }}

// udpFlow is one tunneled UDP flow and the real socket it is forwarded to.
type udpFlow struct {
	e        *Egress
	ep       tcpip.Endpoint
	wq       *waiter.Queue
	tunneled *gonet.UDPConn
	client   netip.Addr
	src, dst netip.AddrPort

	last       atomic.Int64 // unix nanos of the last datagram, either way
	up, down   atomic.Int64 // datagrams each way
	stop       chan struct{}
	stopOnce   sync.Once
	upBytes    int64
	downBytes  int64
	shortIdled atomic.Bool
}

func (f *udpFlow) run() {
	e := f.e
	log := e.log.With("proto", "udp", "src", f.src, "dst", f.dst)
	if !e.addCloser(f.tunneled) {
		return
	}
	defer e.removeCloser(f.tunneled)

	// A UDP "dial" to an address is a local operation that does not wait
	// on the network, so it takes no dial slot: a client whose TCP dials
	// hang (a blackholed host) still gets its DNS and other UDP flows.
	ctx, cancel := context.WithTimeout(context.WithValue(e.ctx, egClientKey{}, f.client), DefaultEgressDialTimeout)
	remote, err := e.dial(ctx, "udp", f.dst.String())
	cancel()
	if err != nil {
		e.c.dialFailures.Add(1)
		log.Debug("udp dial failed", "error", err)
		return
	}
	if !e.addCloser(remote) {
		return
	}
	defer e.removeCloser(remote)
	e.ledger.addConn(f.client, remote)
	defer e.ledger.removeConn(f.client, remote)
	log.Debug("udp flow open")

	f.last.Store(time.Now().UnixNano())
	f.stop = make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.upBytes = f.copyUp(remote)
		f.close(remote)
	}()
	f.copyDown(remote)
	f.close(remote)
	<-done
	if f.shortIdled.Load() {
		e.c.udpShortIdle.Add(1)
	}
	log.Debug("udp flow closed", "bytes_up", f.upBytes, "bytes_down", f.downBytes)
}

// close ends both directions (either may call it, more than once).
func (f *udpFlow) close(remote net.Conn) {
	f.stopOnce.Do(func() { close(f.stop) })
	_ = remote.Close()
	_ = f.tunneled.Close()
}

// idleLeft is how long the flow may still stay idle; <= 0: it is over.
func (f *udpFlow) idleLeft() time.Duration {
	idle, short := f.e.udpIdle, false
	if f.up.Load() <= 1 && f.down.Load() <= 1 && f.e.udpShort < idle {
		idle, short = f.e.udpShort, true
	}
	left := idle - time.Since(time.Unix(0, f.last.Load()))
	if left <= 0 && short {
		f.shortIdled.Store(true)
	}
	return left
}

// copyUp forwards the client's datagrams to the real socket until either
// fails, the flow is stopped or it has been idle too long. It waits for a
// datagram without a buffer and borrows one from the pool only to move it.
func (f *udpFlow) copyUp(remote net.Conn) int64 {
	entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	f.wq.EventRegister(&entry)
	defer f.wq.EventUnregister(&entry)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var total int64
	for {
		if f.ep.Readiness(waiter.ReadableEvents) != 0 {
			bp := egUDPBufPool.Get().(*[]byte)
			n, err := f.tunneled.Read(*bp)
			if err != nil {
				egUDPBufPool.Put(bp)
				return total
			}
			f.last.Store(time.Now().UnixNano())
			f.up.Add(1)
			total += int64(n)
			_, err = remote.Write((*bp)[:n])
			egUDPBufPool.Put(bp)
			if err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
				return total
			}
			continue
		}
		left := f.idleLeft()
		if left <= 0 {
			return total
		}
		timer.Reset(left)
		select {
		case <-ready:
		case <-timer.C:
		case <-f.stop:
			return total
		}
	}
}

// copyDown forwards the real socket's datagrams to the client until either
// fails, the flow is stopped or it has been idle too long. On a real socket
// it waits for readability without a buffer (the runtime poller) and
// borrows one only to read; other conns (the in-process DNS server) are
// read with a buffer of their own, as small as they say they need.
func (f *udpFlow) copyDown(remote net.Conn) {
	if f.copyDownRaw(remote) {
		return
	}
	size := egMaxIPPacket
	if m, ok := remote.(interface{ MaxDatagram() int }); ok {
		size = m.MaxDatagram()
	}
	buf := make([]byte, size)
	for {
		left := f.idleLeft()
		if left <= 0 {
			return
		}
		_ = remote.SetReadDeadline(time.Now().Add(left))
		n, err := remote.Read(buf)
		if err != nil {
			if egRetryable(err) {
				continue
			}
			return
		}
		if !f.forwardDown(buf[:n]) {
			return
		}
	}
}

// forwardDown hands one datagram from the real socket to the client.
func (f *udpFlow) forwardDown(b []byte) bool {
	f.last.Store(time.Now().UnixNano())
	f.down.Add(1)
	f.downBytes += int64(len(b))
	_, err := f.tunneled.Write(b)
	return err == nil
}

// egRetryable: a read deadline (re-check idleness across both directions)
// or an ICMP port unreachable from the target (keep the flow).
func egRetryable(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}
