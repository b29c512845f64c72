package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// A network may have several gateways (a cluster). The node connects to
// the one that completes its handshake first, which is the nearest one
// answering; when its connection is lost (or Suspect finds the gateway
// dead) it races them all again, so it moves to another by itself. A
// client moves to the gateway its agent is on when told to (MoveTo), so
// that one gateway relays each session.
const (
	// MaxGateways bounds the gateways a node races.
	MaxGateways = 8
	// preferWait bounds the handshake with the gateway MoveTo names; an
	// honest gateway answers in one round trip.
	preferWait = 3 * time.Second
	// downFor is how long a gateway that did not answer a move is not
	// moved to again: the agent it holds is probably moving too.
	downFor = 15 * time.Second
	// checkEvery and checkWait pace Suspect's pings.
	checkEvery = 3 * time.Second
	checkWait  = 2 * time.Second
)

// gatewayList is first followed by the others, without repeats, at most
// MaxGateways.
func gatewayList(first string, others []string) []string {
	var l []string
	for _, g := range append([]string{first}, others...) {
		if g != "" && !slices.Contains(l, g) && len(l) < MaxGateways {
			l = append(l, g)
		}
	}
	return l
}

// dialGateway connects to the gateway MoveTo asked for, if any and it
// answers, and otherwise to whichever gateway answers first.
func (c *Client) dialGateway(ctx context.Context) (*dialed, error) {
	if p := c.prefer.Swap(nil); p != nil {
		tc, err := c.tlsConfig(*p)
		if err == nil {
			pctx, cancel := context.WithTimeout(ctx, preferWait)
			var d *dialed
			d, err = c.dial(pctx, tc, *p)
			cancel()
			if err == nil {
				return d, nil
			}
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		c.markDown(*p)
		c.log.Warn("cannot reach the gateway the agent is on; connecting to the nearest other", "gateway", *p, "err", err)
	}
	switch len(c.addrs) {
	case 0:
		return nil, &FatalError{Code: wire.CodeBadRequest, Message: "no gateway address given"}
	case 1:
		tc, err := c.tlsConfig(c.addrs[0])
		if err != nil {
			return nil, &FatalError{Code: wire.CodeBadRequest, Message: err.Error()}
		}
		return c.dial(ctx, tc, c.addrs[0])
	}
	return c.race(ctx, c.addrs)
}

// race dials every gateway in gws at once and keeps the first to connect.
// It fails for good only if every gateway refused for good: one
// misconfigured gateway of a cluster must not stop a node the others
// would take.
func (c *Client) race(ctx context.Context, gws []string) (*dialed, error) {
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		d   *dialed
		err error
	}
	res := make(chan result, len(gws))
	for _, gw := range gws {
		go func() {
			tc, err := c.tlsConfig(gw)
			if err != nil {
				res <- result{nil, &FatalError{Code: wire.CodeBadRequest, Message: err.Error()}}
				return
			}
			d, err := c.dial(rctx, tc, gw)
			if err != nil {
				err = fmt.Errorf("%s: %w", gw, err)
			}
			res <- result{d, err}
		}()
	}
	var errs []error
	fatals := 0
	var firstFatal error
	for i := range gws {
		r := <-res
		if r.err == nil {
			// The losers: close any that connect after all.
			if left := len(gws) - i - 1; left > 0 {
				go func() {
					for range left {
						if o := <-res; o.err == nil {
							o.d.close()
						}
					}
				}()
			}
			return r.d, nil
		}
		errs = append(errs, r.err)
		var fe *FatalError
		if errors.As(r.err, &fe) {
			fatals++
			if firstFatal == nil {
				firstFatal = fe
			}
		}
	}
	if fatals == len(gws) {
		return nil, firstFatal
	}
	return nil, errors.Join(errs...)
}

func (c *Client) markDown(gw string) {
	c.mu.Lock()
	c.down[gw] = time.Now().Add(downFor).UnixNano()
	c.mu.Unlock()
}

func (c *Client) isDown(gw string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	until, ok := c.down[gw]
	if ok && time.Now().UnixNano() >= until {
		delete(c.down, gw)
		return false
	}
	return ok
}

// Gateways is every gateway the node was given, Config.Gateway first,
// without repeats.
func (c *Client) Gateways() []string { return slices.Clone(c.addrs) }

// Gateway is the HOST:PORT of the gateway the node is connected to now
// (as dialed), or "" while disconnected.
func (c *Client) Gateway() string {
	if c == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return ""
	}
	return c.cur.gw
}

// Generation counts the node's registrations: it changes at every
// reconnect, to the same gateway or another.
func (c *Client) Generation() uint64 { return c.gen.Load() }

// ErrGatewayDown is MoveTo's answer for a gateway that did not answer a
// move a moment ago.
var ErrGatewayDown = errors.New("that gateway did not answer a moment ago")

// MoveTo moves the node's gateway connection to gw, another gateway of
// its network (a CodeAgentElsewhere reply), and waits until the node is
// registered again: there if gw answers (nil), else on the nearest other
// (an error wrapping ErrGatewayDown). gw is verified like every
// gateway (the pin, or the CA and its name), so a gateway can send a node
// only to another gateway of the same network.
func (c *Client) MoveTo(ctx context.Context, gw string) error {
	if _, _, err := net.SplitHostPort(gw); err != nil {
		return fmt.Errorf("the gateway named another gateway at %q, not a HOST:PORT", gw)
	}
	if c.isDown(gw) {
		return fmt.Errorf("the agent's gateway %s: %w", gw, ErrGatewayDown)
	}
	c.mu.Lock()
	k, wait := c.cur, c.regCh
	c.mu.Unlock()
	if k != nil && k.gw == gw {
		return fmt.Errorf("the gateway %s sent this node to itself", gw)
	}
	c.log.Info("moving to the gateway the agent is on", "from", c.Gateway(), "to", gw)
	c.prefer.Store(&gw)
	if k != nil {
		c.moveNow.Store(true)
		k.qc.CloseWithError(0, "moving to another gateway of the network")
	}
	select {
	case <-wait:
	case <-c.failed:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	}
	if now := c.Gateway(); now != gw {
		return fmt.Errorf("cannot reach the agent's gateway %s (now on %s): %w", gw, now, ErrGatewayDown)
	}
	return nil
}

// Suspect is told that the gateway may be gone (the relay went quiet while
// the node sends through it). Unless it asked within checkEvery, it asks
// the gateway for a sign of life, and if none comes within checkWait it
// closes the connection: Run then reconnects, to whichever gateway answers
// first. QUIC's idle timeout alone would take MaxIdleTimeout.
func (c *Client) Suspect() {
	now := time.Now().UnixNano()
	last := c.lastCheck.Load()
	if now-last < int64(checkEvery) || !c.lastCheck.CompareAndSwap(last, now) {
		return
	}
	c.mu.Lock()
	k := c.cur
	c.mu.Unlock()
	if k == nil || !k.pings {
		return // an older gateway: its idle timeout will tell
	}
	go func() {
		ctx, cancel := context.WithTimeout(k.qc.Context(), checkWait)
		defer cancel()
		_, err := k.ch.Request(ctx, &wire.Message{Type: wire.TypePing})
		var we *wire.Error
		if err == nil || errors.As(err, &we) || k.qc.Context().Err() != nil {
			return // any answer is a sign of life; a closed connection is being replaced
		}
		c.log.Warn("the gateway does not answer; reconnecting", "gateway", k.gw, "err", err)
		k.qc.CloseWithError(0, "gateway not answering")
	}()
}

// heartbeat runs Suspect every Config.Heartbeat until ctx ends.
func (c *Client) heartbeat(ctx context.Context) {
	t := time.NewTicker(max(c.cfg.Heartbeat, checkEvery))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Suspect()
		}
	}
}
