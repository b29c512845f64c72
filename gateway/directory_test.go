package gateway

import (
	"net/netip"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func agentsOf(t *testing.T, n *testNode) []wire.AgentInfo {
	t.Helper()
	r, err := request(t, n, &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}})
	if err != nil {
		t.Fatalf("agents request: %v", err)
	}
	if r.Type != wire.TypeAgents || r.Agents == nil {
		t.Fatalf("agents reply = %+v", r)
	}
	return r.Agents.Agents
}

// A client lists the agents its token allows, online or not, with their
// subnets; the directory outlives agents' connections and the gateway, and
// forgets agents whose tokens were revoked.
func TestAgentDirectory(t *testing.T) {
	dir := t.TempDir()
	tg := startGateway(t, dir)
	office := []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24"), netip.MustParsePrefix("10.9.0.0/16")}
	miranda := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: office})
	miranda.ready(t)
	prospero := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "prospero"}), advertise: lan})
	prospero.ready(t)
	startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "secret"}), advertise: lan}).ready(t)
	prospero.stop(t)

	alice := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda", "prospero"}})})
	alice.ready(t)
	var got []wire.AgentInfo
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = agentsOf(t, alice)
		// prospero's disconnect reaches the gateway when its connection closes.
		if len(got) == 2 && !got[1].Online || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(got) != 2 || got[0].Name != "miranda" || got[1].Name != "prospero" {
		t.Fatalf("alice sees %+v, want miranda and prospero only (not secret: her token does not allow it)", got)
	}
	if !got[0].Online || len(got[0].Advertise) != 2 || got[0].Advertise[0] != office[0] || got[0].Advertise[1] != office[1] {
		t.Errorf("miranda = %+v, want online with %v", got[0], office)
	}
	if got[1].Online || len(got[1].Advertise) != 1 || got[1].Advertise[0] != lan[0] || time.Since(time.Unix(got[1].LastSeen, 0)) > time.Minute {
		t.Errorf("prospero = %+v, want offline, last seen just now, with %v", got[1], lan)
	}

	// After a gateway restart nobody is online, and everyone is still known.
	tg.stop(t)
	tg2 := startGateway(t, dir)
	bob := startNode(t, tg2, nodeOpts{token: tg2.token(t, token.Claims{Role: token.RoleClient, Name: "bob", Agents: []string{"*"}})})
	bob.ready(t)
	got = agentsOf(t, bob)
	if len(got) != 3 || got[0].Online || got[1].Online || got[2].Online || got[2].Name != "secret" {
		t.Fatalf("after a restart bob sees %+v, want miranda, prospero and secret, all offline", got)
	}

	// A revoked agent is no longer listed.
	if err := AddRevocation(dir, tg2.authority, Revocation{Role: token.RoleAgent, Name: "prospero", At: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(5 * time.Second)
	for {
		got = agentsOf(t, bob)
		if len(got) == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(got) != 2 || got[0].Name != "miranda" || got[1].Name != "secret" {
		t.Fatalf("after revoking prospero bob sees %+v", got)
	}
}

// An agent list never outgrows one control message.
func TestAgentDirectoryFitsOneMessage(t *testing.T) {
	d, err := openDirectory(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	adv := make([]netip.Prefix, 32)
	for i := range adv {
		adv[i] = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16)
	}
	for i := range 600 {
		c := &token.Claims{ID: "t", Role: token.RoleAgent, Name: "agent-with-a-rather-long-name-" + string(rune('a'+i%26)) + time.Duration(i).String(), Expires: now.Add(time.Hour).Unix()}
		d.m[c.Name] = &dirEntry{Advertise: adv, LastSeen: now.Unix(), TokenID: c.ID, Expires: c.Expires}
	}
	l := d.list(&token.Claims{Role: token.RoleClient, Agents: []string{"*"}}, nil, nil, func(*token.Claims) bool { return false }, now)
	if !l.Truncated || len(l.Agents) == 0 {
		t.Fatalf("%d agents, truncated %v", len(l.Agents), l.Truncated)
	}
	m := &wire.Message{Type: wire.TypeAgents, ID: 1 << 60, Agents: l}
	if err := wire.WriteMessage(new(discard), m); err != nil {
		t.Fatalf("the list does not fit a message: %v", err)
	}
}

type discard struct{}

func (discard) Write(b []byte) (int, error) { return len(b), nil }
