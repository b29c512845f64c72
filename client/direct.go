package client

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/punch"
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

// fallBack puts session id on the path it takes without a direct one, and
// says so in the status.
func (c *Client) fallBack(id uint64) {
	c.u.Conn.SetPath(id, punch.Fallback(c.cfg.Mode))
	if c.cfg.Mode == wire.ModeDirect {
		c.setPath("none", "")
	} else {
		c.setPath("relay", c.cfg.Gateway)
	}
}

// startPunch (re)starts punching for the session the gateway just set up.
// In relay mode nothing is probed; in direct mode nothing may use the relay.
func (c *Client) startPunch(off *wire.Session, agentKey identity.PublicKey, offer *punch.Offer) error {
	c.pmu.Lock()
	if c.pstop != nil {
		// Retire the last session's punch under its own ID, so a late pong
		// for it cannot report a path the new session does not have.
		c.pstop()
		c.u.Mux.Remove(c.punchID, c.punch)
		if c.punchID != off.ID {
			c.u.Conn.SetPath(c.punchID, nil)
		}
		c.pstop, c.punch = nil, nil
	}
	// A confirmation signalled for the retired punch must not count.
	select {
	case <-c.direct:
	default:
	}
	c.pmu.Unlock()
	c.fallBack(off.ID)
	if c.cfg.Mode == wire.ModeRelay {
		return nil
	}
	key, err := offer.Key(off.ID, agentKey, off.ProbePub, off.ProbeSig)
	if err != nil {
		return fmt.Errorf("agent %q: %w", c.cfg.Agent, err)
	}
	// Never probe into the tunnel: candidates inside the agent's subnets
	// would be routed through the TUN.
	cands := punch.Usable(off.Candidates, off.Advertise, punch.MaxCandidates)
	id := off.ID
	p := punch.New(punch.Config{
		ID: id, Key: key, Peer: cands, Send: c.u.Mux.Send, Log: c.log,
		OnDirect: func(remote netip.AddrPort, took time.Duration) {
			c.u.Conn.SetPath(id, &punch.Path{Mux: c.u.Mux, Remote: remote})
			c.setPath("direct", remote.String())
			c.log.Info("The direct channel has just been established", "remote", remote, "took", took.Round(time.Millisecond))
			select {
			case c.direct <- struct{}{}:
			default:
			}
		},
		OnLost: func(netip.AddrPort) { c.fallBack(id) },
	})
	ctx, cancel := context.WithCancel(c.ctx)
	c.pmu.Lock()
	c.punch, c.pstop, c.punchID = p, cancel, id
	c.pmu.Unlock()
	c.u.Mux.Add(id, p)
	if c.cfg.Mode != wire.ModeDirect {
		c.log.Info("the tunnel starts on the relay and is on hold and waiting to create the direct channel")
	}
	c.log.Info("Trying to create a direct (peer-to-peer) channel", "candidates", cands)
	go p.Run(ctx)
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
	p := c.punch
	c.pmu.Unlock()
	if p != nil {
		if _, _, ok := p.Remote(); ok {
			return nil
		}
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
