//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/gateway"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// natsPort is where the cluster's NATS servers take clients (the
// gateways); natsRoutePort is where they talk to each other.
const (
	natsPort      = 4222
	natsRoutePort = 6222
)

// natsNode is one nats-server of the cluster's NATS, with JetStream, in a
// namespace of its own on the simulated internet.
type natsNode struct {
	ns   string
	addr netip.Addr
	conf string
	proc *lab.Process
}

// clusterGateway is one gateway of a cluster. Gateway 1 is the lab's
// gateway host (198.18.1.2); the others have namespaces of their own.
type clusterGateway struct {
	ns     string
	addr   netip.Addr
	public string   // --public-addr: ADDR:PORT unless a setup names it otherwise
	extra  []string // further flags from a setup (e.g. --acme-domain)
	state  string
	args   []string
	proc   *lab.Process
}

// publicAddr is the gateway's --public-addr.
func (g *clusterGateway) publicAddr() string { return g.public }

// clusterEnv is a lab with several gateways serving one network, sharing
// their state through a cluster of NATS servers. The env's own gateway
// fields name gateway 1 (e.token issues tokens from its state: every
// gateway admits the same authority).
type clusterEnv struct {
	*env
	nats  []*natsNode
	gws   []*clusterGateway
	urls  string // --cluster
	creds string // --cluster-creds (user:password)
}

// newClusterEnv builds the lab (opts), starts nNATS NATS servers as one
// cluster with JetStream (namespaces PREFIX-nats1.., 198.18.31.2 ..) and
// nGW gateways with --cluster (gateway 1 in the lab's gateway namespace,
// gateway i > 1 in PREFIX-gwI at 198.18.2I.2), all with gateway 1's
// gateway key and authority, as the README tells to deploy them; and the
// LAN's servers. No agent or client runs yet. Everything is stopped by PID
// and the namespaces deleted by name at cleanup.
func newClusterEnv(t *testing.T, opts lab.Options, nGW, nNATS int) *clusterEnv {
	t.Helper()
	return newClusterEnvWith(t, opts, nGW, nNATS, nil)
}

// newClusterEnvWith is newClusterEnv with setup, if not nil, called once
// every gateway's namespace and address exist and before any gateway
// starts: it may start services the gateways need (an ACME CA) and set
// each gateway's public address and extra flags.
func newClusterEnvWith(t *testing.T, opts lab.Options, nGW, nNATS int, setup func(ce *clusterEnv)) *clusterEnv {
	t.Helper()
	e := &env{t: t, dir: t.TempDir()}
	e.lab = newLab(t, opts)
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
	})
	ce := &clusterEnv{env: e}
	startLANServers(t, e.lab)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	natsBin := filepath.Join(e.dir, "nats-server")
	build := exec.Command("go", "build", "-o", natsBin, "github.com/nats-io/nats-server/v2")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building nats-server (go.mod tool): %v\n%s", err, out)
	}
	ce.creds = filepath.Join(e.dir, "nats-creds")
	if err := os.WriteFile(ce.creds, []byte("nlvpn-gw:e2e-only-password\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var urls, routes []string
	for i := range nNATS {
		ns, addr, err := e.lab.AddPublicHost(ctx, fmt.Sprintf("nats%d", i+1), byte(31+i))
		if err != nil {
			t.Fatal(err)
		}
		ce.nats = append(ce.nats, &natsNode{ns: ns, addr: addr})
		urls = append(urls, fmt.Sprintf("nats://%s", netip.AddrPortFrom(addr, natsPort)))
		routes = append(routes, fmt.Sprintf("%q", "nats-route://"+netip.AddrPortFrom(addr, natsRoutePort).String()))
	}
	ce.urls = strings.Join(urls, ",")
	for i, n := range ce.nats {
		n.conf = filepath.Join(e.dir, fmt.Sprintf("nats%d.conf", i+1))
		conf := fmt.Sprintf(`server_name: "nats%d"
listen: "%s"
authorization { user: "nlvpn-gw", password: "e2e-only-password" }
jetstream { store_dir: %q }
`, i+1, netip.AddrPortFrom(n.addr, natsPort), filepath.Join(e.dir, fmt.Sprintf("nats%d-store", i+1)))
		// One server runs alone: in a cluster of one, JetStream would wait
		// for routes that never come.
		if nNATS > 1 {
			conf += fmt.Sprintf(`cluster {
  name: "nlvpn"
  listen: "%s"
  routes: [%s]
}
`, netip.AddrPortFrom(n.addr, natsRoutePort), strings.Join(routes, ", "))
		}
		if err := os.WriteFile(n.conf, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		n.proc = e.startCmd(t, n.ns, fmt.Sprintf("nats%d", i+1), natsBin, "-c", n.conf)
	}
	for i, n := range ce.nats {
		wctx, wcancel := context.WithTimeout(context.Background(), 20*time.Second)
		err := n.proc.WaitLog(wctx, "Server is ready")
		wcancel()
		if err != nil {
			t.Fatalf("nats%d: %v", i+1, err)
		}
	}

	for i := range nGW {
		g := &clusterGateway{ns: e.lab.NS.GW, addr: e.lab.Gateway, state: filepath.Join(e.dir, fmt.Sprintf("gw%d", i+1))}
		if i > 0 {
			var err error
			if g.ns, g.addr, err = e.lab.AddPublicHost(ctx, fmt.Sprintf("gw%d", i+1), byte(20+i+1)); err != nil {
				t.Fatal(err)
			}
		}
		g.public = netip.AddrPortFrom(g.addr, gwPort).String()
		ce.gws = append(ce.gws, g)
	}
	if setup != nil {
		setup(ce)
	}
	for i, g := range ce.gws {
		if i > 0 {
			// The cluster's one gateway key and authority.
			if err := os.MkdirAll(g.state, 0o700); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"gateway.key", gateway.AuthorityFile} {
				b, err := os.ReadFile(filepath.Join(ce.gws[0].state, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(g.state, f), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
		}
		g.args = append([]string{"gateway", "--listen", fmt.Sprintf(":%d", gwPort), "--public-addr", g.publicAddr(),
			"--state-dir", g.state, "--metrics", metricsAddr, "--cluster", ce.urls, "--cluster-creds", ce.creds}, g.extra...)
		ce.startGatewayN(t, i)
		if i == 0 {
			e.gateway, e.gwState, e.gwArgs = g.proc, g.state, g.args
		}
	}
	return ce
}

// startGatewayN starts gateway i (from 0) and waits until it has joined
// the cluster and listens.
func (ce *clusterEnv) startGatewayN(t *testing.T, i int) {
	t.Helper()
	g := ce.gws[i]
	g.proc = ce.start(t, g.ns, fmt.Sprintf("gateway%d", i+1), g.args...)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	if err := g.proc.WaitLog(ctx, "gateway listening"); err != nil {
		t.Fatalf("gateway %d: %v", i+1, err)
	}
}

// startAgentOn starts agent name on gateway i (from 0), from the agent's
// namespace, advertising adv, and waits until it registered; it returns
// the process and its overlay address.
func (ce *clusterEnv) startAgentOn(t *testing.T, i int, name string, adv netip.Prefix) (*lab.Process, netip.Addr) {
	t.Helper()
	tok := ce.token(t, "--agent", name)
	p := ce.start(t, ce.lab.NS.Agent, name, "agent", "--token-file", ce.tokenFile(tok), "--gateway", ce.gws[i].publicAddr(),
		"--advertise", adv.String(), "--state-dir", filepath.Join(ce.dir, "agent-"+name))
	return p, waitRegistered(t, p)
}

var overlayInLog = regexp.MustCompile(`registered with gateway.*overlay=(100\.[0-9.]+)`)

// waitRegistered waits for a node's registration and returns its overlay
// address from the log.
func waitRegistered(t *testing.T, p *lab.Process) netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.WaitLog(ctx, "registered with gateway"); err != nil {
		t.Fatalf("%s: %v", p.Name, err)
	}
	m := overlayInLog.FindStringSubmatch(p.Log())
	if m == nil {
		t.Fatalf("%s: no overlay address in its log", p.Name)
	}
	return netip.MustParseAddr(m[1])
}

// agentsOn runs `nlvpn agents --json` against gateway i (from 0) with a
// client token for every agent.
type listedAgent struct {
	Name      string         `json:"name"`
	Online    bool           `json:"online"`
	Advertise []netip.Prefix `json:"advertise"`
	LastSeen  int64          `json:"last_seen"`
}

func (ce *clusterEnv) agentsOn(t *testing.T, i int, tokFile, state string) ([]listedAgent, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stdout, stderr, err := lab.Run(ctx, ce.lab.NS.Client, nlvpnBin, "agents", "--json", "--token-file", tokFile,
		"--gateway", ce.gws[i].publicAddr(), "--state-dir", state)
	if err != nil {
		return nil, fmt.Errorf("nlvpn agents: %v: %s", err, stderr)
	}
	var got struct {
		Agents []listedAgent `json:"agents"`
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		return nil, fmt.Errorf("nlvpn agents printed %q: %v", stdout, err)
	}
	return got.Agents, nil
}

// gatewayMetric reads one value from gateway i's /metrics.
func (ce *clusterEnv) gatewayMetric(t *testing.T, i int, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := lab.Output(ctx, ce.gws[i].ns, "curl", "-sS", "--noproxy", "*", "http://"+metricsAddr+"/metrics")
	if err != nil {
		t.Fatalf("metrics of gateway %d: %v", i+1, err)
	}
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// connectVia asks gateway i (from 0) for a session to agent as a Go-level
// client (control.Client) in the client's namespace, and returns the
// gateway's error reply (nil if it set up a session).
func (ce *clusterEnv) connectVia(t *testing.T, i int, agent string) *wire.Error {
	t.Helper()
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	tok, err := token.ParseToken(ce.token(t, "--client", "carol", "--allow-agent", agent))
	if err != nil {
		t.Fatal(err)
	}
	info, ok, err := gateway.ReadInfoFile(ce.gws[i].state)
	if err != nil || !ok {
		t.Fatalf("gateway %d info: %v", i+1, err)
	}
	var uc *net.UDPConn
	if err := lab.Do(ce.lab.NS.Client, func() error {
		var err error
		uc, err = net.ListenUDP("udp4", nil)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	tr := &quic.Transport{Conn: uc}
	defer tr.Close()
	c := control.New(control.Config{Gateway: ce.gws[i].publicAddr(), Pin: info.Pin, Token: tok.Enroll(key.Public()), Key: key,
		Over: control.OverUDP, Transport: tr, Log: quietLogger()})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go c.Run(ctx)
	if _, err := c.Ready(ctx); err != nil {
		t.Fatalf("Go client on gateway %d: %v", i+1, err)
	}
	_, err = c.Request(ctx, &wire.Message{Type: wire.TypeConnect, Connect: &wire.Connect{Agent: agent}})
	var we *wire.Error
	if errors.As(err, &we) {
		return we
	}
	if err != nil {
		t.Fatalf("connect via gateway %d: %v", i+1, err)
	}
	return nil
}

// TestClusterGateways: two gateways in namespaces of their own and three
// NATS servers (a JetStream cluster, routes between them). Overlay
// addresses stay unique across gateways; `nlvpn agents` on gateway 1 lists
// an agent online on gateway 2 and one that left; a Connect on gateway 1
// for the agent on gateway 2 is answered agent_elsewhere naming gateway 2;
// a revocation added on gateway 1 ends a session on gateway 2 within 2 s;
// with one NATS server killed registrations and lookups carry on; a
// gateway whose NATS connection is cut keeps its sessions and admits the
// nodes it knows.
func TestClusterGateways(t *testing.T) {
	ce := newClusterEnv(t, coneCone, 2, 3)
	far := netip.MustParsePrefix("10.77.0.0/16")
	miranda, mirandaAddr := ce.startAgentOn(t, 1, agentName, ce.lab.LANSubnet)
	prospero, prosperoAddr := ce.startAgentOn(t, 0, "prospero", far)
	t.Logf("miranda on gateway 2 at %s, prospero on gateway 1 at %s", mirandaAddr, prosperoAddr)
	if mirandaAddr == prosperoAddr {
		t.Fatalf("two agents on two gateways both got %s", mirandaAddr)
	}

	t.Run("agents lists the cluster", func(t *testing.T) {
		prospero.Stop()
		tok := ce.tokenFile(ce.token(t, "--client", "bob", "--allow-agent", agentName, "--allow-agent", "prospero"))
		var got []listedAgent
		err := ce.poll(5*time.Second, func() error {
			var err error
			if got, err = ce.agentsOn(t, 0, tok, filepath.Join(ce.dir, "bob")); err != nil {
				return err
			}
			if len(got) != 2 || got[0].Name != agentName || !got[0].Online || got[1].Name != "prospero" || got[1].Online {
				return fmt.Errorf("listed %+v", got)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("gateway 1 lists: %v; want %s online (on gateway 2), prospero offline", err, agentName)
		}
		if len(got[0].Advertise) != 1 || got[0].Advertise[0] != ce.lab.LANSubnet || len(got[1].Advertise) != 1 || got[1].Advertise[0] != far || got[1].LastSeen == 0 {
			t.Fatalf("listed %+v, want %s with %v and prospero with %v, last seen", got, agentName, ce.lab.LANSubnet, far)
		}
	})

	t.Run("connect on gateway 1 is sent to gateway 2", func(t *testing.T) {
		we := ce.connectVia(t, 0, agentName)
		if we == nil || we.Code != wire.CodeAgentElsewhere || we.Gateway != ce.gws[1].publicAddr() {
			t.Fatalf("connect for %s on gateway 1: %+v, want agent_elsewhere naming %s", agentName, we, ce.gws[1].publicAddr())
		}
		if v := ce.gatewayMetric(t, 0, "nlvpn_gateway_redirects_total"); v != "1" {
			t.Fatalf("gateway 1 counted %q redirects, want 1", v)
		}
	})

	// A client of miranda's, on gateway 2 (its home), with the tunnel up.
	ce.clientTok = ce.token(t, "--client", "alice", "--allow-agent", agentName, "--uses", "20")
	startOn := func(t *testing.T, name string) *lab.Process {
		args := []string{"up", "--token-file", ce.tokenFile(ce.clientTok), "--gateway", ce.gws[1].publicAddr(), "--agent", agentName,
			"--state-dir", filepath.Join(ce.dir, name), "--tun", tunName, "--relay"}
		c := ce.start(t, ce.lab.NS.Client, name, args...)
		ce.waitFor(t, readyTimeout, "the tunnel through gateway 2", func() error {
			if !c.Running() {
				return errStop(fmt.Errorf("client exited (%s)", c.ExitStatus()))
			}
			return ce.httpHealth()
		})
		return c
	}

	t.Run("gateway cut from NATS keeps its sessions", func(t *testing.T) {
		client := startOn(t, "client-cut")
		defer client.Stop()
		ctx := context.Background()
		if err := ce.lab.DropTCPTo(ctx, ce.gws[1].ns, natsPort); err != nil {
			t.Fatal(err)
		}
		defer ce.lab.RestoreTCPTo(ctx, ce.gws[1].ns, natsPort)
		ce.waitFor(t, 20*time.Second, "gateway 2 to notice NATS is gone", func() error {
			if v := ce.gatewayMetric(t, 1, "nlvpn_gateway_cluster_connected"); v != "0" {
				return fmt.Errorf("cluster_connected %q", v)
			}
			return nil
		})
		start := time.Now()
		for time.Since(start) < 5*time.Second {
			if err := ce.httpHealth(); err != nil {
				t.Fatalf("the tunnel through gateway 2 failed %s after NATS was cut: %v", time.Since(start).Round(time.Millisecond), err)
			}
			time.Sleep(500 * time.Millisecond)
		}
		// The agent it knows comes back while NATS is still away.
		miranda.Stop()
		miranda = ce.startCmd(t, ce.lab.NS.Agent, agentName, miranda.Args...)
		if a := waitRegistered(t, miranda); a != mirandaAddr {
			t.Fatalf("miranda came back at %s, had %s", a, mirandaAddr)
		}
		ce.waitFor(t, readyTimeout, "the tunnel after the agent came back", ce.httpHealth)
		if err := ce.lab.RestoreTCPTo(ctx, ce.gws[1].ns, natsPort); err != nil {
			t.Fatal(err)
		}
		ce.waitFor(t, 30*time.Second, "gateway 2 back in the cluster", func() error {
			if v := ce.gatewayMetric(t, 1, "nlvpn_gateway_cluster_connected"); v != "1" {
				return fmt.Errorf("cluster_connected %q", v)
			}
			return nil
		})
	})

	t.Run("revocation on gateway 1 ends a session on gateway 2", func(t *testing.T) {
		client := startOn(t, "client-revoked")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		start := time.Now()
		if _, stderr, err := lab.Run(ctx, ce.gws[0].ns, nlvpnBin, "token", "revoke", "--state-dir", ce.gws[0].state, "--client", "alice"); err != nil {
			t.Fatalf("nlvpn token revoke on gateway 1: %v\n%s", err, stderr)
		}
		ce.waitFor(t, 5*time.Second, "the client on gateway 2 to be disconnected", func() error {
			if strings.Contains(ce.gws[1].proc.Log(), "token revoked; disconnecting the node") {
				return nil
			}
			return errors.New("not yet")
		})
		took := time.Since(start)
		t.Logf("revoked on gateway 1; gateway 2 disconnected the client after %s", took.Round(time.Millisecond))
		if took > 2*time.Second {
			t.Fatalf("revocation took %s to reach gateway 2, want within 2 s", took)
		}
		if !client.Wait(10 * time.Second) {
			t.Fatal("the revoked client is still running")
		}
	})

	t.Run("one NATS server killed", func(t *testing.T) {
		ce.nats[0].proc.Stop()
		start := time.Now()
		for i := range ce.gws {
			ce.waitFor(t, 20*time.Second, fmt.Sprintf("gateway %d on the NATS servers left", i+1), func() error {
				if v := ce.gatewayMetric(t, i, "nlvpn_gateway_cluster_connected"); v != "1" {
					return fmt.Errorf("cluster_connected %q", v)
				}
				return nil
			})
		}
		// A new agent needs a new address: a write through the two NATS
		// servers left.
		ariel, arielAddr := ce.startAgentOn(t, 0, "ariel", netip.MustParsePrefix("10.78.0.0/16"))
		defer ariel.Stop()
		t.Logf("with nats1 killed, ariel registered on gateway 1 at %s after %s", arielAddr, time.Since(start).Round(time.Millisecond))
		if arielAddr == mirandaAddr || arielAddr == prosperoAddr {
			t.Fatalf("ariel got %s, taken already", arielAddr)
		}
		// A connect asks NATS itself when the watch has not caught up
		// (a watch's consumer on a dead server is rebuilt after seconds).
		if we := ce.connectVia(t, 1, "ariel"); we == nil || we.Code != wire.CodeAgentElsewhere || we.Gateway != ce.gws[0].publicAddr() {
			t.Fatalf("connect for ariel on gateway 2: %+v, want agent_elsewhere naming gateway 1", we)
		}
		tok := ce.tokenFile(ce.token(t, "--client", "dave", "--allow-agent", "ariel"))
		ce.waitFor(t, 20*time.Second, "gateway 2 lists ariel online", func() error {
			got, err := ce.agentsOn(t, 1, tok, filepath.Join(ce.dir, "dave"))
			if err != nil {
				return err
			}
			if len(got) != 1 || got[0].Name != "ariel" || !got[0].Online {
				return fmt.Errorf("listed %+v", got)
			}
			return nil
		})
	})
}
