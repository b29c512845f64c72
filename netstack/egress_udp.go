package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// handleUDP is called synchronously on the Inject goroutine for a datagram
// that matches no existing flow. It checks the policy and creates the
// tunneled endpoint at once (so the flow's next datagrams reach it instead of
// the forwarder); the real socket is dialed on the flow's own goroutine, with
// datagrams buffered in the endpoint meanwhile.
func (e *Egress) handleUDP(r *udp.ForwarderRequest) bool {
	id := r.ID()
	dst := egAddrPortFrom(id.LocalAddress, id.LocalPort)
	src := egAddrPortFrom(id.RemoteAddress, id.RemotePort)
	if !e.allow(src.Addr(), dst, "udp") {
		e.c.denied.Add(1)
		e.log.Debug("udp datagram denied by policy", "proto", "udp", "src", src, "dst", dst)
		return true // handled: dropped silently
	}
	if !e.track() {
		return true
	}
	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		e.wg.Done()
		e.log.Debug("udp endpoint failed", "proto", "udp", "src", src, "dst", dst, "error", terr.String())
		return true
	}
	client := gonet.NewUDPConn(&wq, ep)
	e.c.udpFlows.Add(1)
	go func() {
		defer e.wg.Done()
		e.runUDP(client, src, dst)
	}()
	return true
}

func (e *Egress) runUDP(client *gonet.UDPConn, src, dst netip.AddrPort) {
	log := e.log.With("proto", "udp", "src", src, "dst", dst)
	if !e.addCloser(client) {
		return
	}
	defer e.removeCloser(client)

	ctx, cancel := context.WithTimeout(e.ctx, DefaultEgressDialTimeout)
	remote, err := e.dial(ctx, "udp", dst.String())
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
	e.addFlow(src.Addr(), remote)
	defer e.removeFlow(src.Addr(), remote)
	log.Debug("udp flow open")

	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{})
	var up, down int64
	go func() {
		defer close(done)
		up = e.copyUDP(remote, client, &last)
		_ = remote.Close()
		_ = client.Close()
	}()
	down = e.copyUDP(client, remote, &last)
	_ = remote.Close()
	_ = client.Close()
	<-done
	log.Debug("udp flow closed", "bytes_up", up, "bytes_down", down)
}

// copyUDP copies datagrams from src to dst until src fails or the flow has
// been idle (no datagram in either direction, tracked in last) for the idle
// timeout.
func (e *Egress) copyUDP(dst, src net.Conn, last *atomic.Int64) int64 {
	buf := make([]byte, egMaxIPPacket)
	var total int64
	for {
		idleFor := time.Since(time.Unix(0, last.Load()))
		if idleFor >= e.udpIdle {
			return total
		}
		_ = src.SetReadDeadline(time.Now().Add(e.udpIdle - idleFor))
		n, err := src.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // re-check idleness across both directions
			}
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue // ICMP port unreachable from the target: keep the flow
			}
			return total
		}
		last.Store(time.Now().UnixNano())
		total += int64(n)
		if _, err := dst.Write(buf[:n]); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			return total
		}
	}
}
