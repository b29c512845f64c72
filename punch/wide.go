package punch

import (
	"context"
	"math/rand/v2"
	"net/netip"
	"time"
)

// The wide round: cone ↔ symmetric by probing many ports (the birthday
// approach; Tailscale's "How NAT traversal works" describes it).
//
// The hard side, behind a NAT that maps every destination to a new random
// port, cannot be reached at a port anyone knows: the port its NAT gave
// the gateway is not the one it gives the peer. So it opens HardSockets
// extra sockets and pings the easy side's public address once from each:
// its NAT opens that many mappings toward the easy side, at random ports.
// (The easy side's NAT drops those pings; they only open mappings.) The
// easy side, behind a NAT that keeps one mapping for its one port, sends
// up to BurstProbes pings, BurstRate a second, to random ports of the hard
// side's public IP. Each lands on an open mapping with probability
// HardSockets/PortSpan, so the burst finds one with probability about
// 1-exp(-HardSockets*BurstProbes/PortSpan): 98% for 256 and 1024 (87% at
// 512). The first ping that does reaches one of the hard side's extra
// sockets, which answers it through the same mapping (the easy side's NAT
// lets that in: it just sent there), and that socket is from then on the
// hard side's end of the direct path.
//
// Why a second socket carries the path, and not the node's one port: the
// one port's mapping toward the easy side is one random port among 64512
// (a burst at one port in 64512 is hopeless), and its NAT gives no way to
// learn or choose it. The extra socket that was hit is the only thing
// both NATs will pass, so the session's probes and direct frames to that
// peer address go out through it (underlay's wide.go); everything else
// (gateway, relay, other sessions) stays on the one port.
//
// Which side is which is a guess from ports: a NAT that kept the socket's
// port for the gateway (observed port == local port) is taken for a cone
// (endpoint-independent mapping), one that changed it for symmetric. Only
// one side hard starts a round; both hard (symmetric ↔ symmetric: then
// two random ports must meet, 256×1024 tries in 64512² do not) or both
// easy (the normal probes work, or a firewall blocks) do not.
const (
	HardSockets = 256              // extra sockets the hard side opens per round
	BurstProbes = 1024             // pings the easy side sends per round, at most
	BurstRate   = 200              // the burst's pings a second
	WideEvery   = 60 * time.Second // one round per session this often, at most
	// PortSpan is the ports a NAT picks at random from (Linux: 1024-65535).
	PortSpan  = 65536 - PortFirst
	PortFirst = 1024
)

// Role is a node's part in a wide round.
type Role int

const (
	RoleNone Role = iota // no round: neither or both sides look hard
	RoleHard             // open the extra sockets
	RoleEasy             // send the burst
)

func (r Role) String() string {
	switch r {
	case RoleHard:
		return "hard"
	case RoleEasy:
		return "easy"
	}
	return "none"
}

// WideRole guesses this node's part from ports: self is this node's
// address as the gateway saw it and its socket's port; peerObserved the
// peer's as the gateway saw it and peerCands the candidates the peer
// announced (its interface addresses carry its socket's port). Unknown
// ports give RoleNone.
func WideRole(self netip.AddrPort, localPort uint16, peerObserved netip.AddrPort, peerCands []netip.AddrPort) Role {
	if !self.IsValid() || localPort == 0 || !peerObserved.IsValid() {
		return RoleNone
	}
	var peerLocal uint16
	for _, c := range peerCands {
		if c.IsValid() && c != peerObserved && c.Port() != 0 {
			peerLocal = c.Port()
			break
		}
	}
	if peerLocal == 0 {
		return RoleNone
	}
	selfHard := self.Port() != localPort
	peerHard := peerObserved.Port() != peerLocal
	switch {
	case selfHard && !peerHard:
		return RoleHard
	case !selfHard && peerHard:
		return RoleEasy
	}
	return RoleNone
}

// RandomPorts returns n distinct ports of ip drawn at random from
// [PortFirst, 65535] (n at most BurstProbes).
func RandomPorts(ip netip.Addr, n int) []netip.AddrPort {
	n = min(n, BurstProbes)
	seen := make(map[uint16]bool, n)
	out := make([]netip.AddrPort, 0, n)
	for len(out) < n {
		port := uint16(PortFirst + rand.IntN(PortSpan))
		if !seen[port] {
			seen[port] = true
			out = append(out, netip.AddrPortFrom(ip, port))
		}
	}
	return out
}

// Burst sends one ping to each of targets (at most BurstProbes of them),
// rate a second (at most BurstRate), until done reports true or ctx ends.
// It returns how many it sent.
func Burst(ctx context.Context, targets []netip.AddrPort, rate int, send func(netip.AddrPort), done func() bool) int {
	if len(targets) > BurstProbes {
		targets = targets[:BurstProbes]
	}
	if rate <= 0 || rate > BurstRate {
		rate = BurstRate
	}
	// Pace in ticks of 10 ms (a burst of rate/100 each): finer timers
	// cost more than they smooth.
	const tick = 10 * time.Millisecond
	per := max(1, rate/int(time.Second/tick))
	t := time.NewTicker(time.Second * time.Duration(per) / time.Duration(rate))
	defer t.Stop()
	sent := 0
	for sent < len(targets) {
		if done() {
			return sent
		}
		for i := 0; i < per && sent < len(targets); i++ {
			send(targets[sent])
			sent++
		}
		select {
		case <-ctx.Done():
			return sent
		case <-t.C:
		}
	}
	return sent
}
