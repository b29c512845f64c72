package client

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// The gateway's word that the agent moved makes the current session's
// punching probe the new address first, with its IP as the agent's
// observed one (pings from there answered, from the old IP no more);
// a move for another session, into the agent's subnets or to an address
// the screen refuses changes nothing.
func TestClientProbesAgentsNewAddress(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ckey, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	akey, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	u, err := underlay.Open(control.Config{Gateway: "127.0.0.1:1", Key: ckey, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &Client{cfg: Config{Gateway: "198.18.0.1:4433", Agent: "miranda"}, log: log, u: u, ctx: ctx, direct: make(chan struct{}, 1)}
	mine, err := punch.NewOffer(ckey)
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := punch.NewOffer(akey)
	if err != nil {
		t.Fatal(err)
	}
	// Addresses of the benchmarking range (RFC 2544): should probes leave
	// for real, no real host has them.
	seen := netip.MustParseAddrPort("198.18.3.2:41000")
	off := &wire.Session{ID: 7, PeerObserved: seen, Advertise: []netip.Prefix{netip.MustParsePrefix("198.18.200.0/24")},
		Punch: wire.Punch{Candidates: []netip.AddrPort{seen}, ProbePub: theirs.Pub, ProbeSig: theirs.Sig}}
	if err := c.startPunch(off, akey.Public(), mine); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.punch.Close() })
	cands := func() []netip.AddrPort { return c.punch.Punch().Candidates() }

	for _, to := range []netip.AddrPort{
		netip.MustParseAddrPort("198.18.3.9:61000"),   // another session's agent
		netip.MustParseAddrPort("198.18.200.7:61000"), // inside the agent's subnets: into the tunnel
		netip.MustParseAddrPort("127.0.0.1:22"),       // loopback
		netip.MustParseAddrPort("10.254.253.7:61000"), // a private network this machine is not on
	} {
		id := uint64(7)
		if to.Addr() == netip.MustParseAddr("198.18.3.9") {
			id = 8
		}
		c.onMoved(id, to)
		if got := cands(); !slices.Equal(got, []netip.AddrPort{seen}) {
			t.Fatalf("after a move of session %d to %v: probing %v", id, to, got)
		}
	}
	if c.agentAt.check(netip.MustParseAddrPort("198.18.3.9:61000")) == punch.Accepted {
		t.Fatal("a refused move changed the agent's observed address")
	}

	moved := netip.MustParseAddrPort("198.18.3.5:61000") // the agent changed networks
	c.onMoved(7, moved)
	if got := cands(); !slices.Equal(got, []netip.AddrPort{moved, seen}) {
		t.Fatalf("probing %v; want the new address first", got)
	}
	if c.agentAt.check(netip.MustParseAddrPort("198.18.3.5:61001")) != punch.Accepted || c.agentAt.check(seen) == punch.Accepted {
		t.Fatal("pings are not screened by the agent's new observed address")
	}
}
