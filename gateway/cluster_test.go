package gateway

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/nlvpn/nlvpn/cluster"
	"github.com/nlvpn/nlvpn/cluster/clustertest"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// startNATS runs an embedded nats-server with JetStream on loopback.
func startNATS(t *testing.T) *server.Server {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(s.Shutdown)
	return s
}

// startCluster starts n gateways on loopback in one cluster: the first
// one's gateway key and authority copied to the others, as the README
// says to deploy them. Gateway i's public address is gw<i>.test:4433.
func startCluster(t *testing.T, n int) []*testGateway {
	t.Helper()
	s := startNATS(t)
	urls := make([]string, n)
	for i := range urls {
		urls[i] = s.ClientURL()
	}
	return startClusterOn(t, urls)
}

// startClusterOn is startCluster with gateway i reaching NATS at urls[i].
func startClusterOn(t *testing.T, urls []string) []*testGateway {
	t.Helper()
	first := t.TempDir()
	var gws []*testGateway
	for i, url := range urls {
		dir := first
		if i > 0 {
			dir = t.TempDir()
			for _, f := range []string{"gateway.key", AuthorityFile} {
				b, err := os.ReadFile(filepath.Join(first, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
		tg := startGatewayIn(t, dir, func(c *Config) {
			c.PublicAddr = "gw" + string(rune('1'+i)) + ".test:4433"
			c.Cluster = &cluster.Config{URLs: []string{url}, PresenceTTL: 3 * time.Second}
		})
		t.Cleanup(func() { tg.stop(t) })
		gws = append(gws, tg)
	}
	return gws
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("not within %s: %s", d, what)
}

func TestClusterNeedsPublicAddr(t *testing.T) {
	st, _ := OpenState(t.TempDir())
	auth, _ := LoadAuthority(st.Dir)
	_, err := New(Config{State: st, Authority: auth.Public(), Listen: "127.0.0.1:0", Cluster: &cluster.Config{URLs: []string{"nats://127.0.0.1:1"}}})
	if err == nil || !strings.Contains(err.Error(), "--public-addr") {
		t.Fatalf("New with a cluster and no public address: %v, want an error naming --public-addr", err)
	}
}

func TestClusterRefusesOtherKey(t *testing.T) {
	s := startNATS(t)
	for i, dir := range []string{t.TempDir(), t.TempDir()} { // two keys: two pins
		st, _ := OpenState(dir)
		auth, _ := LoadAuthority(dir)
		g, err := New(Config{State: st, Authority: auth.Public(), Listen: "127.0.0.1:0", Log: quietLog(), PublicAddr: "gw.test:4433",
			Cluster: &cluster.Config{URLs: []string{s.ClientURL()}, JoinTimeout: 5 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err = g.Run(ctx)
		cancel()
		if i == 1 && (err == nil || !strings.Contains(err.Error(), "gateway.key")) {
			t.Fatalf("second gateway with its own key: Run = %v, want a refusal naming gateway.key", err)
		}
	}
}

// TestClusterAgentElsewhere: an agent on gateway 2; a client on gateway 1
// asking for it is sent to gateway 2 (agent_elsewhere naming its public
// address, counted); gateway 1 lists it online, then offline once it left;
// the agent's name is held by its key on every gateway.
func TestClusterAgentElsewhere(t *testing.T) {
	gws := startCluster(t, 2)
	g1, g2 := gws[0], gws[1]
	agentTok := g2.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})
	agent := startNode(t, g2, nodeOpts{token: agentTok, advertise: lan})
	aw := agent.ready(t)
	client := startNode(t, g1, nodeOpts{token: g1.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	cw := client.ready(t)
	if cw.Overlay == aw.Overlay {
		t.Fatalf("client on gateway 1 and agent on gateway 2 both got %s", cw.Overlay)
	}
	var we *wire.Error
	eventually(t, 10*time.Second, "gateway 1 sends the client to gateway 2", func() bool {
		_, err := request(t, client, connectMsg("miranda"))
		we = wantWireErrorAny(err)
		return we != nil && we.Code == wire.CodeAgentElsewhere
	})
	if we.Gateway != "gw2.test:4433" || !strings.Contains(we.Message, "miranda") {
		t.Fatalf("agent_elsewhere = %+v, want gateway gw2.test:4433", we)
	}
	want := "# HELP nlvpn_gateway_redirects_total Connects answered agent_elsewhere: the agent is on another gateway of the cluster.\n# TYPE nlvpn_gateway_redirects_total counter\nnlvpn_gateway_redirects_total 1\n" +
		"# HELP nlvpn_gateway_cluster_connected 1 while the cluster's NATS is reachable, else 0.\n# TYPE nlvpn_gateway_cluster_connected gauge\nnlvpn_gateway_cluster_connected 1\n"
	if err := testutil.CollectAndCompare(g1.g, strings.NewReader(want), "nlvpn_gateway_redirects_total", "nlvpn_gateway_cluster_connected"); err != nil {
		t.Fatal(err)
	}
	r, err := request(t, client, &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}})
	if err != nil || len(r.Agents.Agents) != 1 || !r.Agents.Agents[0].Online || r.Agents.Agents[0].Advertise[0] != lan[0] {
		t.Fatalf("gateway 1's list: %+v %v, want miranda online with %v", r, err, lan)
	}

	// Another machine with its own token for the name, on gateway 1.
	impostor := startNode(t, g1, nodeOpts{token: g1.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})})
	if fe := impostor.refused(t); fe.Code != wire.CodeNameInUse || !strings.Contains(fe.Message, "gw2.test:4433") {
		t.Fatalf("impostor on gateway 1: %q %q, want name_in_use naming gateway 2", fe.Code, fe.Message)
	}
	// A copy of the agent's token on another machine, on gateway 1.
	if fe := startNode(t, g1, nodeOpts{token: agentTok, advertise: lan}).refused(t); fe.Code != wire.CodeTokenUsed {
		t.Fatalf("copied token on gateway 1: %q %q, want token_used", fe.Code, fe.Message)
	}

	agent.stop(t)
	eventually(t, 10*time.Second, "gateway 1 lists miranda offline", func() bool {
		r, err := request(t, client, &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}})
		return err == nil && len(r.Agents.Agents) == 1 && !r.Agents.Agents[0].Online && r.Agents.Agents[0].LastSeen > 0
	})
	if _, err := request(t, client, connectMsg("miranda")); wantWireErrorAny(err) == nil || wantWireErrorAny(err).Code != wire.CodeUnknownAgent {
		t.Fatalf("connect once the agent left: %v, want unknown_agent", err)
	}
	// The agent moves to gateway 1: same key, same address.
	moved := startNode(t, g1, nodeOpts{token: agentTok, key: agent.key, advertise: lan})
	if w := moved.ready(t); w.Overlay != aw.Overlay {
		t.Fatalf("agent on gateway 1 got %s, had %s on gateway 2", w.Overlay, aw.Overlay)
	}
}

// TestClusterRevocation: a revocation written on gateway 1 ends a client's
// connection on gateway 2 within 2 s, and gateway 2 keeps the list.
func TestClusterRevocation(t *testing.T) {
	gws := startCluster(t, 2)
	g1, g2 := gws[0], gws[1]
	client := startNode(t, g2, nodeOpts{token: g2.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)
	start := time.Now()
	if err := AddRevocation(g1.state.Dir, g1.authority, Revocation{Role: token.RoleClient, Name: "alice", At: time.Now().Unix() + 1}); err != nil {
		t.Fatal(err)
	}
	fe := client.refused(t)
	took := time.Since(start)
	if fe.Code != wire.CodeRevoked {
		t.Fatalf("client on gateway 2: %q %q, want revoked", fe.Code, fe.Message)
	}
	if took > 2*time.Second {
		t.Fatalf("revocation on gateway 1 took %s to end the session on gateway 2, want within 2 s", took)
	}
	t.Logf("revoked on gateway 1, client on gateway 2 disconnected after %s", took.Round(time.Millisecond))
	rs, _, err := LoadRevocations(g2.state.Dir, g2.authority.Public())
	if err != nil || rs == nil || len(rs.List) != 1 {
		t.Fatalf("gateway 2's saved list: %+v %v", rs, err)
	}
}

// wantWireErrorAny is the *wire.Error in err, or nil.
func wantWireErrorAny(err error) *wire.Error {
	var we *wire.Error
	if errors.As(err, &we) {
		return we
	}
	return nil
}

// TestClusterNATSAway: with NATS gone, a gateway keeps its sessions and
// admits the nodes it knows (an agent reconnecting under its name and
// address), and refuses a machine it has never seen, as unavailable
// (nodes retry that), until NATS is back.
func TestClusterNATSAway(t *testing.T) {
	s := startNATS(t)
	dir := t.TempDir()
	tg := startGatewayIn(t, dir, func(c *Config) {
		c.PublicAddr = "gw1.test:4433"
		c.Cluster = &cluster.Config{URLs: []string{s.ClientURL()}}
	})
	t.Cleanup(func() { tg.stop(t) })
	agentTok := tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})
	agent := startNode(t, tg, nodeOpts{token: agentTok, advertise: lan})
	aw := agent.ready(t)
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)

	s.Shutdown()
	eventually(t, 5*time.Second, "the gateway notices NATS is gone", func() bool { return !tg.g.clusterNow().Connected() })
	// The session it has carries on.
	r, err := request(t, client, connectMsg("miranda"))
	if err != nil || r.Session == nil || r.Session.PeerKey != agent.key.Public().String() {
		t.Fatalf("connect while NATS is away: %+v %v", r, err)
	}
	// The agent it knows comes back under its name and address.
	agent.stop(t)
	back := startNode(t, tg, nodeOpts{token: agentTok, key: agent.key, advertise: lan})
	if w := back.ready(t); w.Overlay != aw.Overlay || w.Name != "miranda" {
		t.Fatalf("agent back while NATS is away: %+v, want miranda at %s", w, aw.Overlay)
	}
	// A machine never seen is not admitted (no enrolment without the
	// cluster's word), and is told why.
	before := tg.g.refusals[reasonEnrollFailed].Load()
	stranger := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "bob", Agents: []string{"*"}})})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := stranger.c.Ready(ctx); err == nil {
		t.Fatal("a new machine was admitted while NATS is away")
	}
	if tg.g.refusals[reasonEnrollFailed].Load() == before {
		t.Fatal("the refusal of a new machine while NATS is away was not counted")
	}
}

// TestClusterNameTakenDuringSplit: gateway 1 is cut off from NATS past the
// presence TTL while its agent miranda stays connected; another machine
// takes the name on gateway 2. When gateway 1 is back, gateway 2's claim
// (the one in the cluster) wins: gateway 1 closes its agent's connection
// (counted), the agent reconnecting is refused name_in_use, and a client
// on gateway 1 is sent to gateway 2's miranda.
func TestClusterNameTakenDuringSplit(t *testing.T) {
	s := startNATS(t)
	link := clustertest.NewLink(t, s.ClientURL())
	gws := startClusterOn(t, []string{link.URL(), s.ClientURL()})
	g1, g2 := gws[0], gws[1]
	first := startNode(t, g1, nodeOpts{token: g1.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	first.ready(t)
	client := startNode(t, g1, nodeOpts{token: g1.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)

	link.Cut()
	eventually(t, 5*time.Second, "gateway 1 notices it is cut off", func() bool { return !g1.g.clusterNow().Connected() })
	eventually(t, 10*time.Second, "miranda's presence expires on gateway 2", func() bool {
		_, ok := g2.g.clusterNow().Lookup("miranda")
		return !ok
	})
	second := startNode(t, g2, nodeOpts{token: g2.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})})
	second.ready(t)
	link.Restore()

	fe := first.refused(t)
	if fe.Code != wire.CodeNameInUse || !strings.Contains(fe.Message, "gw2.test:4433") {
		t.Fatalf("the first agent after the split: %q %q, want name_in_use naming gateway 2", fe.Code, fe.Message)
	}
	want := "# HELP nlvpn_gateway_cluster_name_conflicts_total Agents let go here because another gateway held their name with another key (both admitted it while cut off from each other, the cluster's claim won).\n" +
		"# TYPE nlvpn_gateway_cluster_name_conflicts_total counter\nnlvpn_gateway_cluster_name_conflicts_total 1\n"
	if err := testutil.CollectAndCompare(g1.g, strings.NewReader(want), "nlvpn_gateway_cluster_name_conflicts_total"); err != nil {
		t.Fatal(err)
	}
	var we *wire.Error
	eventually(t, 5*time.Second, "gateway 1 sends the client to gateway 2", func() bool {
		_, err := request(t, client, connectMsg("miranda"))
		we = wantWireErrorAny(err)
		return we != nil && we.Code == wire.CodeAgentElsewhere
	})
	if we.Gateway != "gw2.test:4433" {
		t.Fatalf("agent_elsewhere names %q, want gw2.test:4433", we.Gateway)
	}
	g2.g.mu.Lock()
	a := g2.g.agents["miranda"]
	g2.g.mu.Unlock()
	if a == nil || !a.key.Equal(second.key.Public()) || a.qc.Context().Err() != nil {
		t.Fatal("gateway 2 no longer has the second machine as miranda")
	}
	if err := testutil.CollectAndCompare(g2.g, strings.NewReader(strings.ReplaceAll(want, "total 1", "total 0")), "nlvpn_gateway_cluster_name_conflicts_total"); err != nil {
		t.Fatal(err)
	}
	// nlvpn agents on either gateway describes the machine that holds the
	// name (its token), not the one let go: gateway 1 does not write its
	// lost agent's entry over gateway 2's.
	held, ok := g2.g.dir.get("miranda")
	if !ok {
		t.Fatal("gateway 2 has no directory entry for miranda")
	}
	for _, g := range gws {
		eventually(t, 5*time.Second, "the cluster's directory names the second machine's token", func() bool {
			return g.g.clusterNow().Directory()["miranda"].TokenID == held.TokenID
		})
	}
	time.Sleep(time.Second) // a late write from gateway 1 would land by now
	for i, g := range gws {
		if e := g.g.clusterNow().Directory()["miranda"]; e.TokenID != held.TokenID {
			t.Fatalf("gateway %d's view of the cluster's directory: miranda's token %q, want the holder's %q", i+1, e.TokenID, held.TokenID)
		}
	}
}

// TestClusterEnrollmentExpires: the enrolment of a token that expires
// leaves the cluster after it (the gateway passes the token's expiry on),
// counted in the metric; one of a valid token does not.
func TestClusterEnrollmentExpires(t *testing.T) {
	s := startNATS(t)
	tg := startGatewayIn(t, t.TempDir(), func(c *Config) {
		c.PublicAddr = "gw1.test:4433"
		c.Cluster = &cluster.Config{URLs: []string{s.ClientURL()}, PresenceTTL: 3 * time.Second, EnrollGrace: time.Millisecond}
	})
	t.Cleanup(func() { tg.stop(t) })
	// Token expiries are whole seconds: this one ends in one or two.
	short := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "brief", Expires: time.Now().Unix() + 2})})
	short.ready(t)
	long := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice"})})
	long.ready(t)
	metric := func(enrollments int) string {
		return "# HELP nlvpn_gateway_cluster_pruned_total Entries gone from the cluster's buckets because their token expired, by kind: directory (deleted by this gateway: the agent offline and its token expired a week ago), enrollment (expired in NATS with their token, dropped from this gateway's cache).\n" +
			"# TYPE nlvpn_gateway_cluster_pruned_total counter\n" +
			"nlvpn_gateway_cluster_pruned_total{kind=\"directory\"} 0\n" +
			fmt.Sprintf("nlvpn_gateway_cluster_pruned_total{kind=\"enrollment\"} %d\n", enrollments)
	}
	eventually(t, 10*time.Second, "the expired token's enrolment leaves the cluster", func() bool {
		return testutil.CollectAndCompare(tg.g, strings.NewReader(metric(1)), "nlvpn_gateway_cluster_pruned_total") == nil
	})
	if n := tg.g.clusterNow().Stats().EnrollmentsExpired; n != 1 {
		t.Fatalf("EnrollmentsExpired = %d, want 1 (the valid token's stays)", n)
	}
}
