package agent

import (
	"context"
	"log/slog"
	"maps"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/platform"
)

// hostAddrsEvery is how often the agent re-reads its host's addresses: a
// DHCP renewal or a new interface must not open a way in for long, and the
// read is one netlink dump.
const hostAddrsEvery = 5 * time.Second

// hostAddrs is the set of this host's own addresses, read by the policy on
// every new flow without a lock.
type hostAddrs struct {
	set atomic.Pointer[map[netip.Addr]bool]
}

func (h *hostAddrs) has(ip netip.Addr) bool {
	m := h.set.Load()
	return m != nil && (*m)[ip]
}

// refresh reads the host's interface addresses now. On error the last set
// stays.
func (h *hostAddrs) refresh(log *slog.Logger) {
	ps, err := platform.InterfacePrefixes()
	if err != nil {
		log.Warn("could not read this host's addresses; keeping the last known", "err", err)
		return
	}
	m := make(map[netip.Addr]bool, len(ps))
	for _, p := range ps {
		m[p.Addr()] = true
		// A subnet's broadcast address reaches this host too (and with
		// --routed the kernel would take a packet to it as its own).
		if p.Addr().Is4() && p.Bits() < 31 {
			m[lastAddr(p)] = true
		}
	}
	// The same set keeps its pointer: the routed egress's flow caches
	// hold while it does (clientState.allowedFlow).
	if old := h.set.Load(); old != nil && maps.Equal(*old, m) {
		return
	}
	h.set.Store(&m)
}

// lastAddr is the last address of IPv4 prefix p: its broadcast address.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// run refreshes the set every hostAddrsEvery until ctx ends.
func (h *hostAddrs) run(ctx context.Context, log *slog.Logger) {
	t := time.NewTicker(hostAddrsEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			h.refresh(log)
		}
	}
}
