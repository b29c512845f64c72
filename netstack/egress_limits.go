package netstack

import (
	"context"
	"io"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
)

// Per-client and total bounds on what clients can make the egress hold.
//
// One client (a flooding script, a stolen credential) must not take the
// agent down or starve the others: every flow costs the agent an fd, a
// gVisor endpoint and two goroutines, every dial an fd and a goroutine for
// up to the dial timeout. So each client gets its own budget, and all of
// them together a total one; what is refused is counted per client and in
// total, never logged per packet.

// EgressLimits bounds what the clients of an Egress can make it hold. A
// zero field means its default (DefaultEgressLimits).
type EgressLimits struct {
	TCPPerClient    int // established and dialing TCP flows of one client
	TCPTotal        int // of all clients
	UDPPerClient    int // UDP flows of one client (each: one socket until idle)
	UDPTotal        int
	DialsPerClient  int // real TCP dials in progress for one client
	EchoesPerClient int // outstanding ICMP echoes of one client (the total is MaxEchoes)
}

// DefaultEgressLimits fit a small server: a few clients each with a
// browser's and a developer's worth of connections. All of them taken
// cost ~150 MiB (BenchmarkEgressTCPFlowMemory and ...UDPFlowMemory: about
// 25 KB per idle TCP flow, 19 KB per UDP flow); one client's, ~17 MiB.
var DefaultEgressLimits = EgressLimits{
	TCPPerClient:    512,
	TCPTotal:        4096,
	UDPPerClient:    256,
	UDPTotal:        2048,
	DialsPerClient:  64,
	EchoesPerClient: 32,
}

// WithDefaults is l with each zero field set from DefaultEgressLimits.
func (l EgressLimits) WithDefaults() EgressLimits {
	d := DefaultEgressLimits
	for _, f := range []struct{ v, def *int }{
		{&l.TCPPerClient, &d.TCPPerClient}, {&l.TCPTotal, &d.TCPTotal},
		{&l.UDPPerClient, &d.UDPPerClient}, {&l.UDPTotal, &d.UDPTotal},
		{&l.DialsPerClient, &d.DialsPerClient}, {&l.EchoesPerClient, &d.EchoesPerClient},
	} {
		if *f.v <= 0 {
			*f.v = *f.def
		}
	}
	return l
}

// egResource is one kind of thing a client holds.
type egResource int

const (
	egTCP egResource = iota
	egUDP
	egDial
	egEcho
	egResources
)

var egResourceNames = [egResources]string{"tcp_flows", "udp_flows", "dials", "icmp_echoes"}

// egClient is what one client (by overlay address) holds now.
type egClient struct {
	held    [egResources]int
	limited [egResources]uint64    // refusals because a bound was hit
	conns   map[io.Closer]struct{} // real connections, closed by CloseClient
}

// egLedger keeps the per-client and total counts. One mutex: it is taken
// once per new flow, dial or echo, never per packet of an existing flow.
type egLedger struct {
	lim EgressLimits

	mu      sync.Mutex
	clients map[netip.Addr]*egClient
	total   [egResources]int
	limited [egResources]atomic.Uint64 // total refusals, by resource
}

func (l *egLedger) perClient(r egResource) int {
	switch r {
	case egTCP:
		return l.lim.TCPPerClient
	case egUDP:
		return l.lim.UDPPerClient
	case egDial:
		return l.lim.DialsPerClient
	default:
		return l.lim.EchoesPerClient
	}
}

// totalBound is 0 where the total is bounded elsewhere (dials by gVisor's
// in-flight SYN limit, echoes by MaxEchoes).
func (l *egLedger) totalBound(r egResource) int {
	switch r {
	case egTCP:
		return l.lim.TCPTotal
	case egUDP:
		return l.lim.UDPTotal
	}
	return 0
}

func (l *egLedger) client(addr netip.Addr) *egClient {
	c := l.clients[addr]
	if c == nil {
		if l.clients == nil {
			l.clients = make(map[netip.Addr]*egClient)
		}
		c = &egClient{}
		l.clients[addr] = c
	}
	return c
}

// acquire takes one r for client, or counts a refusal and returns false.
func (l *egLedger) acquire(client netip.Addr, r egResource) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.client(client)
	if c.held[r] >= l.perClient(r) || (l.totalBound(r) > 0 && l.total[r] >= l.totalBound(r)) {
		c.limited[r]++
		l.limited[r].Add(1)
		return false
	}
	c.held[r]++
	l.total[r]++
	return true
}

// release gives back one r that acquire took.
func (l *egLedger) release(client netip.Addr, r egResource) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.clients[client]
	if c == nil || c.held[r] == 0 {
		return // the client was closed meanwhile and forgotten
	}
	c.held[r]--
	l.total[r]--
	l.forgetIfIdle(client, c)
}

// forgetIfIdle drops the entry of a client that holds nothing, so the map
// has one entry per client with something open, not one per client ever.
// Its refusal counts go with it (the totals keep them).
func (l *egLedger) forgetIfIdle(addr netip.Addr, c *egClient) {
	if len(c.conns) > 0 {
		return
	}
	for _, n := range c.held {
		if n > 0 {
			return
		}
	}
	delete(l.clients, addr)
}

func (l *egLedger) addConn(client netip.Addr, cl io.Closer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.client(client)
	if c.conns == nil {
		c.conns = make(map[io.Closer]struct{})
	}
	c.conns[cl] = struct{}{}
}

func (l *egLedger) removeConn(client netip.Addr, cl io.Closer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if c := l.clients[client]; c != nil {
		delete(c.conns, cl)
		l.forgetIfIdle(client, c)
	}
}

// takeConns removes and returns the client's real connections.
func (l *egLedger) takeConns(client netip.Addr) map[io.Closer]struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.clients[client]
	if c == nil {
		return nil
	}
	m := c.conns
	c.conns = nil
	l.forgetIfIdle(client, c)
	return m
}

// EgressClient is what one client holds in an Egress now, and how often
// its bounds were hit while it held something.
type EgressClient struct {
	Addr    netip.Addr        `json:"addr"`
	Held    map[string]int    `json:"held"`              // by resource: tcp_flows, udp_flows, dials, icmp_echoes
	Limited map[string]uint64 `json:"limited,omitempty"` // refusals by resource
}

// Clients lists the clients that hold something, by address.
func (e *Egress) Clients() []EgressClient {
	e.ledger.mu.Lock()
	out := make([]EgressClient, 0, len(e.ledger.clients))
	for addr, c := range e.ledger.clients {
		ec := EgressClient{Addr: addr, Held: make(map[string]int, egResources)}
		for r := range egResources {
			ec.Held[egResourceNames[r]] = c.held[r]
			if c.limited[r] > 0 {
				if ec.Limited == nil {
					ec.Limited = make(map[string]uint64)
				}
				ec.Limited[egResourceNames[r]] = c.limited[r]
			}
		}
		out = append(out, ec)
	}
	e.ledger.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Addr.Less(out[j].Addr) })
	return out
}

// Limited returns the total refusals because a bound was hit, by resource
// (names as in EgressClient).
func (e *Egress) Limited() map[string]uint64 {
	out := make(map[string]uint64, egResources)
	for r := range egResources {
		out[egResourceNames[r]] = e.ledger.limited[r].Load()
	}
	return out
}

// egClientKey carries the client's overlay address in a dial's context, so
// that a dial answered in-process (DNS) can be bounded per client too.
type egClientKey struct{}

// ClientOf returns the overlay address of the client a dial made by the
// Egress is for (the context passed to EgressConfig.Dial).
func ClientOf(ctx context.Context) (netip.Addr, bool) {
	a, ok := ctx.Value(egClientKey{}).(netip.Addr)
	return a, ok
}
