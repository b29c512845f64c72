package netstack

// linkEndpoint is the NIC under both stacks (Egress and Proxy), in place of
// gVisor's channel.Endpoint. It differs from it in the three ways that
// decide throughput:
//
//   - In: packets arrive in batches (stackCore.inject) and go through
//     gVisor's own GRO engine (stack/gro), which merges consecutive
//     in-order segments of one TCP flow into one large segment before the
//     stack sees it. gVisor's TCP then handles, and ACKs, one segment per
//     batch and flow instead of one per MSS: the return path carries a
//     fraction of the ACK packets, each of which costs a tunnel packet.
//     GRO needs the stack to trust our checksum check (a merged segment
//     keeps the first segment's checksum), hence CapabilityRXChecksumOffload
//     and rxTransportValid.
//   - Out: the endpoint declares host GSO, so gVisor's TCP emits segments
//     of up to 64 KiB with a partial checksum, and the pump (outWriter)
//     cuts them into MTU-sized packets with finished headers and checksums,
//     written straight into reusable out buffers: one copy, no per-packet
//     PacketBuffer or view.
//   - The outbound queue holds references, not copies, and is handed to
//     the pump as a whole slice under one lock, bounded in packets and
//     bytes. When it is full, WritePackets waits (at most linkWaitMax) for
//     the pump to take it: the stack's TCP sender is held back, and with it
//     the real socket it reads from, so a fast LAN sender meets a closing
//     TCP window instead of drops inside the tunnel. What still does not
//     fit after the wait is dropped and counted.

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

const (
	// linkGSOMaxSize is the largest segment gVisor's TCP hands us: the
	// most one IPv4 total-length field can describe.
	linkGSOMaxSize = 1<<16 - 1
	// linkQueueBytes bounds the bytes waiting for the pump, on top of
	// stackLinkQueueDepth packets: a GSO packet holds up to 64 KiB.
	linkQueueBytes = 16 << 20
	// linkWaitMax bounds how long WritePackets waits for room: the pump
	// waits on the tunnel's own queues, which drain at CPU speed while the
	// paths take packets and hold a stalled session back for at most
	// session.SendWaitMax, once per stall; a longer wait means something
	// is stuck, and dropping is better.
	linkWaitMax = 50 * time.Millisecond
)

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

type linkEndpoint struct {
	mtu uint32

	dmu        sync.RWMutex // guards dispatcher
	dispatcher stack.NetworkDispatcher

	// Outbound queue, filled by WritePackets (gVisor's goroutines), emptied
	// by take (the pump).
	qmu    sync.Mutex
	q      []*stack.PacketBuffer
	qBytes int
	closed bool
	wake   chan struct{} // capacity 1: "q is not empty"
	room   chan struct{} // capacity 1: "take emptied q"

	dropped atomic.Uint64 // outbound packets the queue had no room for
}

func newLinkEndpoint(mtu int) *linkEndpoint {
	return &linkEndpoint{
		mtu:  uint32(mtu),
		q:    make([]*stack.PacketBuffer, 0, 256),
		wake: make(chan struct{}, 1),
		room: make(chan struct{}, 1),
	}
}

// currentDispatcher is the NIC to deliver inbound packets to, nil before
// the NIC exists or after it is gone.
func (l *linkEndpoint) currentDispatcher() stack.NetworkDispatcher {
	l.dmu.RLock()
	defer l.dmu.RUnlock()
	return l.dispatcher
}

// WritePackets queues the stack's outbound packets for the pump. It keeps a
// reference to each, never a copy.
func (l *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	all := pkts.AsSlice()
	n := 0
	var deadline *time.Timer
	defer func() {
		if deadline != nil {
			deadline.Stop()
		}
	}()
	for {
		l.qmu.Lock()
		if l.closed {
			l.qmu.Unlock()
			return n, &tcpip.ErrClosedForSend{}
		}
		for _, pkt := range all[n:] {
			size := pkt.Size()
			if len(l.q) >= stackLinkQueueDepth || l.qBytes+size > linkQueueBytes {
				break
			}
			l.q = append(l.q, pkt.IncRef())
			l.qBytes += size
			n++
		}
		l.qmu.Unlock()
		if n > 0 {
			select {
			case l.wake <- struct{}{}:
			default:
			}
		}
		if n == len(all) {
			return n, nil
		}
		// Full: wait for the pump to take the queue, up to linkWaitMax in
		// all. (The room signal wakes one waiter; one that misses it tries
		// again at the next take or gives up at the deadline.)
		if deadline == nil {
			deadline = time.NewTimer(linkWaitMax)
		}
		select {
		case <-l.room:
			continue
		case <-deadline.C:
		}
		break
	}
	l.dropped.Add(uint64(len(all) - n))
	if n == 0 {
		return 0, &tcpip.ErrNoBufferSpace{}
	}
	return n, nil
}

// take waits until packets are queued and returns them all, swapping in
// spare (emptied) as the new queue, so that the two slices alternate and
// nothing is allocated. It returns nil when ctx ends.
func (l *linkEndpoint) take(ctx context.Context, spare []*stack.PacketBuffer) []*stack.PacketBuffer {
	for {
		l.qmu.Lock()
		if len(l.q) > 0 {
			got := l.q
			l.q = spare[:0]
			l.qBytes = 0
			l.qmu.Unlock()
			select {
			case l.room <- struct{}{}:
			default:
			}
			return got
		}
		l.qmu.Unlock()
		select {
		case <-l.wake:
		case <-ctx.Done():
			return nil
		}
	}
}

// Close releases what is still queued and refuses further writes.
func (l *linkEndpoint) Close() {
	l.qmu.Lock()
	l.closed = true
	q := l.q
	l.q = nil
	l.qBytes = 0
	l.qmu.Unlock()
	for _, p := range q {
		p.DecRef()
	}
}

// Attach implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	l.dmu.Lock()
	l.dispatcher = d
	l.dmu.Unlock()
}

// IsAttached implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) IsAttached() bool { return l.currentDispatcher() != nil }

// MTU implements stack.NetworkLinkEndpoint. The MTU is fixed at creation.
func (l *linkEndpoint) MTU() uint32 { return l.mtu }

// SetMTU implements stack.NetworkLinkEndpoint; the MTU is fixed (the
// tunnel's), so it is ignored.
func (l *linkEndpoint) SetMTU(uint32) {}

// Capabilities implements stack.NetworkLinkEndpoint: inbound TCP/UDP
// checksums are verified by inject before GRO (see rxTransportValid).
func (l *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// GSOMaxSize implements stack.GSOEndpoint.
func (l *linkEndpoint) GSOMaxSize() uint32 { return linkGSOMaxSize }

// SupportedGSO implements stack.GSOEndpoint: "host" GSO, i.e. large TCP
// segments with a partial checksum that outWriter finishes.
func (l *linkEndpoint) SupportedGSO() stack.SupportedGSO { return stack.HostGSOSupported }

// MaxHeaderLength implements stack.NetworkLinkEndpoint: no link header.
func (l *linkEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint: an IP link has none.
func (l *linkEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Wait implements stack.NetworkLinkEndpoint; the pump is stackCore's.
func (l *linkEndpoint) Wait() {}

// ARPHardwareType implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// SetOnCloseAction implements stack.NetworkLinkEndpoint.
func (l *linkEndpoint) SetOnCloseAction(func()) {}
