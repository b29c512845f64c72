package gateway

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/nlvpn/nlvpn/cluster"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
)

// A gateway in a cluster (Config.Cluster) shares with the others, through
// NATS JetStream (package cluster): which gateway each agent is on, the
// overlay addresses, the directory, the tokens' enrolled machines and the
// authority's revocation list. All gateways of a cluster share one
// gateway key (STATE-DIR/gateway.key copied to each), so the one pin in a
// token verifies every gateway of the network and a redirect
// (CodeAgentElsewhere) can send a node only to a real gateway of it; they
// admit one authority. Join checks both against the cluster's.
//
// A session is relayed by one gateway, the agent's home: a client asking
// another gateway for the agent is sent there, never chained through.
//
// When NATS is away the gateway keeps the sessions it has, admits the
// nodes it knows (cached addresses and enrollments), refuses only what
// needs the cluster's word (a new address, a new machine), and catches up
// when NATS is back. A name another gateway gave to another key meanwhile
// stays that gateway's: the agent here is closed (OnNameLost).

// addressBook binds overlay addresses to slots ("agent/NAME",
// "client/NAME#i"): the state directory's pool standalone, the cluster's
// buckets in a cluster.
type addressBook interface {
	Peek(slot string) (netip.Addr, bool)
	Get(slot string) (netip.Addr, error)
}

// clusterAddresses is the cluster's address book.
type clusterAddresses struct{ c *cluster.Cluster }

func (a clusterAddresses) Peek(slot string) (netip.Addr, bool) {
	ad, ok := a.c.PeekAddress(slot)
	return ad, ok && overlayPrefix.Contains(ad)
}

func (a clusterAddresses) Get(slot string) (netip.Addr, error) {
	ad, err := a.c.Address(context.Background(), slot, overlayPrefix)
	if err == nil && !overlayPrefix.Contains(ad) {
		return netip.Addr{}, fmt.Errorf("the cluster bound %s to %s, outside the overlay", slot, ad)
	}
	return ad, err
}

// joinCluster joins the cluster configured, wiring its callbacks to this
// gateway. The returned cluster is closed by the caller.
func (g *Gateway) joinCluster(ctx context.Context) (*cluster.Cluster, error) {
	cfg := *g.cfg.Cluster
	cfg.PublicAddr = g.cfg.PublicAddr
	cfg.Pin = g.pin
	cfg.Authority = g.cfg.Authority.String()
	cfg.Log = g.log
	cfg.RevocationSerial = func(signed string) (uint64, error) {
		rs, err := token.ParseRevocations(signed, g.cfg.Authority)
		if err != nil {
			return 0, err
		}
		return rs.Serial, nil
	}
	cfg.OnRevocations = func(signed string) {
		// The authority's signature, checked here: NATS content never
		// revokes (or un-revokes) by itself.
		rs, err := token.ParseRevocations(signed, g.cfg.Authority)
		if err != nil {
			g.log.Error("revocation list from the cluster does not verify; ignored", "err", err)
			return
		}
		g.applyRevocations(rs, signed, "cluster")
	}
	cfg.OnMoved = func(name string, p cluster.Presence) {
		g.mu.Lock()
		a := g.agents[name]
		g.mu.Unlock()
		if a != nil && a.key.String() == p.Key {
			g.log.Info("agent connected to another gateway; closing its connection here", "name", name, "gateway", p.Gateway)
			a.qc.CloseWithError(0, "replaced by a connection to another gateway")
		}
	}
	cfg.OnNameLost = func(name string, lost, holder cluster.Presence) {
		// Both gateways admitted the name while they could not see each
		// other; the one the cluster holds wins, as at registration. The
		// agent here reconnects and is refused name_in_use (or, if it is
		// the holder's machine after all, goes there).
		g.mu.Lock()
		a := g.agents[name]
		g.mu.Unlock()
		if a != nil && a.key.String() == lost.Key {
			g.log.Warn("agent name held on another gateway by another key since a cluster split; closing the agent's connection here",
				"name", name, "key", lost.Key, "gateway", holder.Gateway, "holder_key", holder.Key)
			a.qc.CloseWithError(0, fmt.Sprintf("the agent name %q is held on gateway %s by another key", name, holder.Gateway))
		}
	}
	c, err := cluster.Join(ctx, cfg)
	if err != nil {
		return nil, err
	}
	g.cluster.Store(c)
	g.overlay = clusterAddresses{c}
	// Our list, if newer than the cluster's, goes to the others.
	if signed := g.revoked.Load().signed; signed != "" {
		if err := c.PublishRevocations(ctx, signed); err != nil {
			g.log.Warn("revocation list not put into the cluster", "err", err)
		}
	}
	return c, nil
}

// clusterNow is the cluster, nil standalone (or before Run joined it).
func (g *Gateway) clusterNow() *cluster.Cluster { return g.cluster.Load() }

// elsewhere says on which other gateway of the cluster the agent name is
// online, if it is.
func (g *Gateway) elsewhere(name string) (string, bool) {
	c := g.clusterNow()
	if c == nil {
		return "", false
	}
	p, ok := c.LookupNow(context.Background(), name)
	if !ok || p.Gateway == c.PublicAddr() {
		return "", false
	}
	return p.Gateway, true
}

// enroll records the token's use by key: across the cluster in one, in
// the state directory standalone.
func (g *Gateway) enroll(claims *token.Claims, key identity.PublicKey) error {
	if c := g.clusterNow(); c != nil {
		err := c.Enroll(context.Background(), claims.ID, claims.Uses, time.Unix(claims.Expires, 0), key.String())
		switch {
		case errors.Is(err, cluster.ErrTokenUsed):
			return errTokenUsed
		case err != nil:
			return err
		}
	}
	return g.enrolled.use(claims.ID, claims.Expires, claims.Uses, key)
}

// announceAgent claims the agent's name across the cluster (nil
// standalone).
func (g *Gateway) announceAgent(n *node) error {
	c := g.clusterNow()
	if c == nil {
		return nil
	}
	return c.Announce(context.Background(), n.name, cluster.Presence{Advertise: n.adv, Key: n.key.String(), Since: time.Now().Unix()})
}

// shareDirectory passes the directory's entry for name, held here by key,
// to the cluster: not when the cluster has the name online with another
// key (the agent here lost it, OnNameLost), whose gateway's entry stands.
func (g *Gateway) shareDirectory(name string, key identity.PublicKey) {
	c := g.clusterNow()
	if c == nil {
		return
	}
	if p, ok := c.Lookup(name); ok && p.Key != key.String() {
		return
	}
	if e, ok := g.dir.get(name); ok {
		c.Seen(context.Background(), name, cluster.DirEntry(e))
	}
}
