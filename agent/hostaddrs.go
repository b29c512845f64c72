package agent

import (
	"context"
	"log/slog"
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
	}
	h.set.Store(&m)
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
