package client

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

func (c *Client) pathKind() string {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	return c.path.kind
}

func (c *Client) setPath(kind, remote string) {
	c.pmu.Lock()
	c.path = pathState{kind: kind, remote: remote, since: time.Now()}
	c.pmu.Unlock()
}

// fallBack says in the status which path a session without a direct one
// is on.
func (c *Client) fallBack() {
	if c.cfg.Mode == wire.ModeDirect {
		c.setPath("none", "")
	} else {
		c.setPath("relay", c.u.Ctrl.Gateway())
	}
}

// startPunch (re)starts punching for the session the gateway just set up.
// In relay mode nothing is probed; in direct mode nothing may use the relay.
func (c *Client) startPunch(off *wire.Session, agentKey identity.PublicKey, offer *punch.Offer) error {
	c.pmu.Lock()
	if c.punch != nil {
		// Retire the last session's punch under its own ID, so a late pong
		// for it cannot report a path the new session does not have; a
		// session that is not resumed leaves the path table.
		if c.punch.ID() == off.ID {
			c.punch.Stop()
		} else {
			c.punch.Close()
		}
		c.punch = nil
	}
	// A confirmation signalled for the retired punch must not count.
	select {
	case <-c.direct:
	default:
	}
	c.pmu.Unlock()
	c.fallBack()
	cfg := underlay.DirectConfig{ID: off.ID, Mode: c.cfg.Mode, Log: c.log,
		OnDirect: func(remote netip.AddrPort, _ time.Duration) {
			c.setPath("direct", remote.String())
			select {
			case c.direct <- struct{}{}:
			default:
			}
		},
		OnLost: func(netip.AddrPort) { c.fallBack() },
	}
	if c.cfg.Mode != wire.ModeRelay {
		key, err := offer.Key(off.ID, agentKey, off.ProbePub, off.ProbeSig)
		if err != nil {
			return fmt.Errorf("agent %q: %w", c.cfg.Agent, err)
		}
		cfg.Key = key
		// Never probe into the tunnel: candidates inside the agent's subnets
		// would be routed through the TUN. And probe only where the agent
		// can be (the rules the agent applies to clients): an agent, or a
		// gateway in the middle, must not aim this machine's probes at its
		// own loopback, its LAN's other hosts or anyone on the internet.
		screen := c.agentScreen(off)
		c.agentAt.set(*screen, off.Advertise)
		for _, a := range punch.Usable(off.Candidates, off.Advertise, punch.MaxCandidates) {
			if r := screen.Check(a); r == punch.Accepted {
				cfg.Peer = append(cfg.Peer, a)
			} else {
				c.probesRefused.Add(1)
				c.log.Debug("not probing the agent's candidate", "candidate", a, "reason", r)
			}
		}
		cfg.Accept = func(from netip.AddrPort) bool { return c.agentAt.check(from) == punch.Accepted }
		// Cone ↔ symmetric: a wide round when the normal probing fails
		// (punch/wide.go; one a punch.WideEvery per session).
		cfg.PeerObserved, cfg.PeerCandidates = off.PeerObserved, off.Candidates
		if c.cfg.Mode != wire.ModeDirect {
			c.log.Info("the tunnel starts on the relay and is on hold and waiting to create the direct channel")
		}
	}
	d := c.u.StartDirect(c.ctx, cfg)
	c.pmu.Lock()
	c.punch = d
	c.pmu.Unlock()
	return nil
}

// waitDirect waits for the direct path in direct-only mode and, when it
// does not come, says what was observed.
func (c *Client) waitDirect(ctx context.Context, off *wire.Session) error {
	t := time.NewTimer(c.cfg.DirectTimeout)
	defer t.Stop()
	select {
	case <-c.direct:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
	}
	c.pmu.Lock()
	d := c.punch
	c.pmu.Unlock()
	if _, _, ok := d.Remote(); ok {
		return nil
	}
	var p *punch.Punch
	if d != nil {
		p = d.Punch()
	}
	var tried []string
	var heard, sent uint64
	if p != nil {
		for _, a := range p.Candidates() {
			tried = append(tried, a.String())
		}
		heard, sent = p.Stats()
	}
	var observed string
	if w := c.u.Ctrl.Welcome(); w != nil {
		observed = w.Observed.String()
	}
	why := "no probe from the agent reached us and none of ours was answered: both sides appear to be behind endpoint-dependent (symmetric) NAT, or a firewall drops UDP between them"
	if heard > 0 {
		why = fmt.Sprintf("the agent's probes reached us (%d) but ours were never answered: our NAT or firewall filters the agent's replies (endpoint-dependent NAT on our side?)", heard)
	}
	if len(tried) == 0 {
		why = "the agent announced no usable address"
	}
	return fmt.Errorf("no direct path to agent %q within %s: %s (sent %d probes to %s; our public address as the gateway sees it: %s)",
		c.cfg.Agent, c.cfg.DirectTimeout, why, sent, strings.Join(tried, ", "), observed)
}

// agentScreen is where this client may probe the agent of session offer
// off: the agent's public address as the gateway saw it (or, from a
// gateway that does not say, its first candidate if that is public), and
// private addresses on this machine's own LANs.
func (c *Client) agentScreen(off *wire.Session) *punch.Screen {
	s := &punch.Screen{}
	switch {
	case off.PeerObserved.IsValid():
		s.Observed = off.PeerObserved.Addr().Unmap()
	case len(off.Candidates) > 0:
		if ip := off.Candidates[0].Addr().Unmap(); ip.IsGlobalUnicast() && !ip.IsPrivate() {
			s.Observed = ip
		}
	}
	local, err := platform.InterfacePrefixes()
	if err != nil {
		c.log.Warn("could not read this machine's interfaces; probing no private candidate of the agent", "err", err)
	}
	s.Local = local
	return s
}

// agentPlaces is where the client may probe the agent of the current
// session: the screen (agentScreen) and the agent's subnets, whose
// addresses are never probed (they are routed into the tunnel).
type agentPlaces struct {
	mu     sync.Mutex
	screen punch.Screen
	routed []netip.Prefix
}

func (p *agentPlaces) set(s punch.Screen, routed []netip.Prefix) {
	p.mu.Lock()
	p.screen, p.routed = s, routed
	p.mu.Unlock()
}

func (p *agentPlaces) check(a netip.AddrPort) punch.Reason {
	p.mu.Lock()
	s := p.screen
	p.mu.Unlock()
	return s.Check(a)
}

// moved takes the agent's new address to: its IP, if public, becomes the
// agent's observed one. It reports whether to may be probed.
func (p *agentPlaces) moved(to netip.AddrPort) punch.Reason {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(punch.Usable([]netip.AddrPort{to}, p.routed, 1)) == 0 {
		return punch.RefusedInvalid // into the tunnel, or no address at all
	}
	s := p.screen
	if ip := to.Addr().Unmap(); ip.IsGlobalUnicast() && !ip.IsPrivate() {
		s.Observed = ip
	}
	r := s.Check(to)
	if r == punch.Accepted {
		p.screen = s
	}
	return r
}

// onMoved is told by the gateway that the agent of session id now comes
// from to (its NAT mapping changed): if that is the current session, its
// punching probes there at once, so the direct path comes back (this
// client's NAT drops the agent's probes from its new port until the client
// has sent there).
func (c *Client) onMoved(id uint64, to netip.AddrPort) {
	to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	c.pmu.Lock()
	d := c.punch
	c.pmu.Unlock()
	if d == nil || d.ID() != id || d.Punch() == nil {
		return
	}
	if r := c.agentAt.moved(to); r != punch.Accepted {
		c.probesRefused.Add(1)
		c.log.Info("not probing the agent's new address", "addr", to, "reason", r)
		return
	}
	d.AddPeer(to)
	c.log.Info("the agent's address changed; probing it there", "session", wire.SessionID(id), "addr", to)
}
