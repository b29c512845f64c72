package gateway

import (
	"testing"

	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// The gateway answers a node's ping (its sign of life when the relay goes
// quiet), but not a second one within minPingInterval: pings must cost
// no more than keepalives, and a node that floods them keeps its
// registration but gets no answers.
func TestPing(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	n := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda"}})})
	n.ready(t)
	// It says so in its welcome: a node pings only a gateway that does.
	if w := n.c.Welcome(); w == nil || !w.Has(wire.FeaturePing) {
		t.Fatalf("the welcome does not list %q: %+v", wire.FeaturePing, w)
	}
	r, err := request(t, n, &wire.Message{Type: wire.TypePing})
	if err != nil || r.Type != wire.TypePing {
		t.Fatalf("ping: %+v, %v; want a ping back", r, err)
	}
	if r, err := request(t, n, &wire.Message{Type: wire.TypePing}); err == nil {
		t.Fatalf("a second ping at once was answered: %+v", r)
	}
	if got := tg.g.refusals[reasonUnexpectedMessage].Load(); got != 1 {
		t.Fatalf("unexpected_message count = %d, want 1 for the ping too many", got)
	}
	// Still registered: other requests are answered.
	if _, err := request(t, n, &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}}); err != nil {
		t.Fatalf("after a ping too many: %v", err)
	}
}
