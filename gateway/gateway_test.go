package gateway

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/relay"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

var overlayNet = netip.MustParsePrefix("100.64.0.0/10")

// testGateway is a gateway running on loopback.
type testGateway struct {
	g         *Gateway
	state     *State
	authority *identity.Key
	cancel    context.CancelFunc
	done      chan error
	once      sync.Once
}

func startGateway(t *testing.T, dir string) *testGateway {
	t.Helper()
	return startGatewayIn(t, dir, nil)
}

// startGatewayIn starts a gateway on loopback with its state in dir and
// its config adjusted by set (nil: as is), and stops it at cleanup.
func startGatewayIn(tb testing.TB, dir string, set func(*Config)) *testGateway {
	tb.Helper()
	st, err := OpenState(dir)
	if err != nil {
		tb.Fatal(err)
	}
	auth, err := LoadAuthority(dir)
	if err != nil {
		tb.Fatal(err)
	}
	// TCP on a port of its own: the default, the UDP port's number, may
	// be taken on TCP by anything else on this machine (a flake seen).
	cfg := Config{State: st, Authority: auth.Public(), Listen: "127.0.0.1:0", ListenTCP: "127.0.0.1:0", Log: quietLog()}
	if set != nil {
		set(&cfg)
	}
	g, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tg := &testGateway{g: g, state: st, authority: auth, cancel: cancel, done: make(chan error, 1)}
	go func() { tg.done <- g.Run(ctx) }()
	deadline := time.Now().Add(3 * time.Second)
	for g.Addr() == nil {
		if time.Now().After(deadline) {
			tb.Fatal("gateway did not start listening")
		}
		select {
		case err := <-tg.done:
			tb.Fatalf("gateway Run: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	if !g.Addr().IP.IsLoopback() {
		tb.Fatalf("gateway listens on %v", g.Addr())
	}
	tb.Cleanup(func() { tg.stop(tb) })
	return tg
}

// stop ends Run and waits for it briefly. A Run that does not return is
// the bug TestShutdownWithConnectedNodes reports; other tests only need the
// gateway out of the way, so they do not fail on it.
func (tg *testGateway) stop(t testing.TB) {
	t.Helper()
	tg.once.Do(func() {
		tg.cancel()
		select {
		case err := <-tg.done:
			if err != nil {
				t.Errorf("gateway Run returned %v", err)
			}
		case <-time.After(500 * time.Millisecond):
		}
	})
}

func (tg *testGateway) token(t *testing.T, c token.Claims) string {
	t.Helper()
	if c.Expires == 0 {
		c.Expires = time.Now().Add(time.Hour).Unix()
	}
	c.Gateway = tg.g.Addr().String()
	c.Pin = tg.g.Pin()
	tok, err := token.Issue(tg.authority, c)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

type relayed struct {
	id  uint64
	pkt []byte
}

type nodeOpts struct {
	token     string
	key       *identity.Key // nil: a fresh one
	advertise []netip.Prefix
	pin       string // "": the gateway's
	onRequest func(ctx context.Context, m *wire.Message) *wire.Message
	over      string   // control.Config.Over
	proxy     *url.URL // control.Config.Proxy
	gateway   string   // "": the gateway's UDP address
}

// testNode is a control.Client with its own UDP socket.
type testNode struct {
	c      *control.Client
	key    *identity.Key
	relay  chan relayed
	offers chan *wire.Session
	// revoked receives the session IDs the gateway tells this (agent) node
	// to end.
	revoked chan *wire.Revoked
	runErr  chan error
	cancel  context.CancelFunc
	once    sync.Once
	tr      *quic.Transport
}

// acceptOffers is an agent's OnRequest that takes every session offer.
func (n *testNode) acceptOffers(_ context.Context, m *wire.Message) *wire.Message {
	if m.Type != wire.TypeSession {
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeBadRequest, Message: "only offers"}}
	}
	n.offers <- m.Session
	return &wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{ID: m.Session.ID}}
}

func startNode(t *testing.T, tg *testGateway, o nodeOpts) *testNode {
	t.Helper()
	key := o.key
	if key == nil {
		var err error
		if key, err = identity.Generate(); err != nil {
			t.Fatal(err)
		}
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	cred := o.token
	if tok, err := token.ParseToken(o.token); err == nil {
		cred = tok.Enroll(key.Public()) // what the CLI does with a token
	}
	n := &testNode{key: key, relay: make(chan relayed, 1024), offers: make(chan *wire.Session, 16), revoked: make(chan *wire.Revoked, 16), runErr: make(chan error, 1), tr: &quic.Transport{Conn: uc}}
	pin := o.pin
	if pin == "" {
		pin = tg.g.Pin()
	}
	onRequest := o.onRequest
	if onRequest == nil {
		onRequest = n.acceptOffers
	}
	gw := o.gateway
	if gw == "" {
		gw = tg.g.Addr().String()
	}
	n.c = control.New(control.Config{
		Over: o.over, Proxy: o.proxy,
		Gateway: gw, Pin: pin, Token: cred, Key: key, Advertise: o.advertise,
		Transport: n.tr, Log: quietLog(),
		OnRelay: func(id uint64, pkt []byte) {
			select {
			case n.relay <- relayed{id, pkt}:
			default:
			}
		},
		OnRequest: onRequest,
		OnRevoked: func(r *wire.Revoked) { n.revoked <- r },
	})
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() { n.runErr <- n.c.Run(ctx) }()
	t.Cleanup(func() { n.stop(t) })
	return n
}

// stop cancels Run and closes the node's socket. Run should return at
// once (TestClientRunReturnsOnCancel checks it); here it is not waited for
// long, and the transport is closed in any case.
func (n *testNode) stop(t *testing.T) {
	n.once.Do(func() {
		n.cancel()
		select {
		case err := <-n.runErr:
			n.runErr <- err
		case <-time.After(300 * time.Millisecond):
		}
		n.tr.Close()
		n.tr.Conn.Close()
	})
}

func (n *testNode) ready(t *testing.T) *wire.Welcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w, err := n.c.Ready(ctx)
	if err != nil {
		t.Fatalf("registration: %v", err)
	}
	return w
}

// refused waits for Run to give up with a FatalError.
func (n *testNode) refused(t *testing.T) *control.FatalError {
	t.Helper()
	select {
	case err := <-n.runErr:
		n.runErr <- err // for stop
		var fe *control.FatalError
		if !errors.As(err, &fe) {
			t.Fatalf("Run returned %v (%T), want a *control.FatalError", err, err)
		}
		return fe
	case <-time.After(5 * time.Second):
		t.Fatal("Run kept retrying a registration the gateway refuses for good")
		return nil
	}
}

func connectMsg(agent string) *wire.Message {
	return &wire.Message{Type: wire.TypeConnect, Connect: &wire.Connect{Agent: agent}}
}

func request(t *testing.T, n *testNode, m *wire.Message) (*wire.Message, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return n.c.Request(ctx, m)
}

func wantWireError(t *testing.T, err error, code string) *wire.Error {
	t.Helper()
	var we *wire.Error
	if !errors.As(err, &we) {
		t.Fatalf("err = %v (%T), want a *wire.Error %s", err, err, code)
	}
	if we.Code != code {
		t.Fatalf("error code = %q (%s), want %q", we.Code, we.Message, code)
	}
	return we
}

var lan = []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24")}

func TestRegisterAndConnect(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	aw := agent.ready(t)
	if aw.Name != "miranda" || aw.Role != token.RoleAgent {
		t.Fatalf("agent welcome = %+v", aw)
	}
	if !overlayNet.Contains(aw.Overlay) {
		t.Fatalf("agent overlay %v is outside %v", aw.Overlay, overlayNet)
	}
	if aw.Observed.Addr() != netip.MustParseAddr("127.0.0.1") || aw.Observed.Port() == 0 {
		t.Errorf("observed address = %v, want the agent's loopback socket", aw.Observed)
	}
	if got := agent.tr.Conn.LocalAddr().(*net.UDPAddr).AddrPort(); got.Port() != aw.Observed.Port() {
		t.Errorf("observed %v, but the agent's socket is %v", aw.Observed, got)
	}

	// "nosuch" is allowed by the token, so asking for it tests the directory.
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda", "nosuch"}, Groups: []string{"ops"}})})
	cw := client.ready(t)
	if cw.Role != token.RoleClient || !overlayNet.Contains(cw.Overlay) || cw.Overlay == aw.Overlay {
		t.Fatalf("client welcome = %+v (agent overlay %v)", cw, aw.Overlay)
	}

	r, err := request(t, client, connectMsg("miranda"))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	if r.Type != wire.TypeSession || r.Session == nil {
		t.Fatalf("Connect reply = %+v", r)
	}
	s := r.Session
	if s.ID == 0 || s.PeerName != "miranda" || s.PeerKey != agent.key.Public().String() || s.PeerAddr != aw.Overlay {
		t.Fatalf("session = %+v; want agent miranda, key %s, overlay %v", s, agent.key.Public(), aw.Overlay)
	}
	if len(s.Advertise) != 1 || s.Advertise[0] != lan[0] {
		t.Errorf("session advertise = %v, want %v", s.Advertise, lan)
	}
	// The agent was offered the same session with the client's identity.
	select {
	case off := <-agent.offers:
		if off.ID != s.ID || off.PeerName != "alice" || off.PeerKey != client.key.Public().String() || off.PeerAddr != cw.Overlay {
			t.Fatalf("agent offer = %+v; want session %x from alice %s at %v", off, s.ID, client.key.Public(), cw.Overlay)
		}
		// The agent learns where the gateway sees the client, the one
		// public address it will probe (the client learns the agent's).
		if off.PeerObserved != cw.Observed || s.PeerObserved != aw.Observed {
			t.Fatalf("observed addresses in offer %v and session %v, want %v and %v", off.PeerObserved, s.PeerObserved, cw.Observed, aw.Observed)
		}
		// The agent gets the client's credential to check for itself,
		// groups and all; the client gets the agent's.
		cc, err := token.Verify(off.PeerCredential, tg.authority.Public(), client.key.Public(), time.Now())
		if err != nil || cc.Name != "alice" || len(cc.Groups) != 1 || cc.Groups[0] != "ops" {
			t.Fatalf("client credential in the offer: %+v, %v", cc, err)
		}
		ac, err := token.Verify(s.PeerCredential, tg.authority.Public(), agent.key.Public(), time.Now())
		if err != nil || ac.Name != "miranda" || ac.Role != token.RoleAgent {
			t.Fatalf("agent credential in the session: %+v, %v", ac, err)
		}
	default:
		t.Fatal("the agent was never offered the session")
	}

	t.Run("relay", func(t *testing.T) {
		testRelay(t, tg, client, agent, s.ID)
	})
	t.Run("relay as UDP frames", func(t *testing.T) {
		testRelayUDP(t, tg, client, agent, s.ID)
	})

	tests := []struct {
		name string
		from *testNode
		msg  *wire.Message
		code string
	}{
		{"unknown agent", client, connectMsg("nosuch"), wire.CodeUnknownAgent},
		{"agent may not connect", agent, connectMsg("miranda"), wire.CodeBadRequest},
		{"a message nodes do not send", client, &wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{}}, wire.CodeBadRequest},
		{"again (counted, not logged again)", client, &wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{}}, wire.CodeBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := request(t, tt.from, tt.msg)
			wantWireError(t, err, tt.code)
		})
	}
	// The agent's connect and the client's two welcomes.
	if n := tg.g.refusals[reasonUnexpectedMessage].Load(); n != 3 {
		t.Errorf("unexpected_message count %d, want 3", n)
	}
	// A refused request is an answer, not the end of the node's connection.
	if _, err := request(t, client, connectMsg("miranda")); err != nil {
		t.Fatalf("Connect after refusals: %v", err)
	}
}

func testRelay(t *testing.T, tg *testGateway, client, agent *testNode, id uint64) {
	before := tg.g.RelayStats()
	const n = 20
	send := func(from *testNode, dir byte, i int) []byte {
		pkt := bytes.Repeat([]byte{dir, byte(i)}, 50+i*30) // up to 1340 bytes
		if err := from.c.SendRelayDatagram(id, pkt); err != nil {
			t.Fatalf("Send: %v", err)
		}
		return pkt
	}
	recv := func(to *testNode, want []byte) {
		t.Helper()
		select {
		case r := <-to.relay:
			if r.id != id || !bytes.Equal(r.pkt, want) {
				t.Fatalf("relayed %x/%d bytes, want %x/%d bytes unchanged", r.id, len(r.pkt), id, len(want))
			}
		case <-time.After(3 * time.Second):
			t.Fatal("relayed packet did not arrive")
		}
	}
	var ab, ba uint64
	for i := 0; i < n; i++ {
		p := send(client, 'c', i)
		ab += uint64(wire.FrameHeaderLen + len(p))
		recv(agent, p)
		p = send(agent, 'a', i)
		ba += uint64(wire.FrameHeaderLen + len(p))
		recv(client, p)
	}
	// The MTU budget: a peer session packet of full PeerPacketSize fits one
	// relay DATAGRAM on the gateway connection, both ways.
	full := bytes.Repeat([]byte{0x5a}, wire.PeerPacketSize)
	for _, d := range []struct{ from, to *testNode }{{client, agent}, {agent, client}} {
		if err := d.from.c.SendRelayDatagram(id, full); err != nil {
			t.Fatalf("Send of a %d-byte peer packet over the relay: %v", len(full), err)
		}
		recv(d.to, full)
	}
	ab += uint64(wire.FrameHeaderLen + len(full))
	ba += uint64(wire.FrameHeaderLen + len(full))

	st := tg.g.RelayStats()
	if st.Frames-before.Frames != 2*n+2 || st.Bytes-before.Bytes != ab+ba {
		t.Errorf("relay frames, bytes = +%d, +%d; want +%d, +%d", st.Frames-before.Frames, st.Bytes-before.Bytes, 2*n+2, ab+ba)
	}
	var rs *struct{ ab, ba uint64 }
	for _, r := range st.Sessions {
		if r.ID == id {
			rs = &struct{ ab, ba uint64 }{r.BytesAToB, r.BytesBToA}
			if r.A != "client/alice" || r.B != "agent/miranda" || r.PacketsAToB != n+1 || r.PacketsBToA != n+1 || r.RelayedTotal != ab+ba {
				t.Errorf("route stats = %+v", r)
			}
		}
	}
	if rs == nil {
		t.Fatalf("no route stats for session %x in %+v", id, st.Sessions)
	}
	if rs.ab != ab || rs.ba != ba {
		t.Errorf("route bytes = %d/%d, want %d/%d", rs.ab, rs.ba, ab, ba)
	}
	// A frame for a session the node is not part of is not delivered.
	if err := client.c.SendRelayDatagram(id^1, []byte("stray")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	select {
	case r := <-agent.relay:
		t.Fatalf("frame for an unknown session delivered: %x", r.id)
	default:
	}
	if got := tg.g.RelayStats().DropUnknown - before.DropUnknown; got != 1 {
		t.Errorf("DropUnknown = +%d, want +1", got)
	}
}

func TestConnectForbiddenByToken(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)
	tests := []struct {
		agents []string
		code   string // "" means allowed
	}{
		{[]string{"other"}, wire.CodeForbidden},
		{nil, wire.CodeForbidden},
		{[]string{"*"}, ""},
		{[]string{"other", "miranda"}, ""},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.agents, ","), func(t *testing.T) {
			c := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "bob", Agents: tt.agents})})
			c.ready(t)
			r, err := request(t, c, connectMsg("miranda"))
			if tt.code == "" {
				if err != nil || r.Session == nil {
					t.Fatalf("Connect = %+v, %v; want a session", r, err)
				}
				<-agent.offers
				return
			}
			we := wantWireError(t, err, tt.code)
			if !strings.Contains(we.Message, "miranda") {
				t.Errorf("message %q does not name the agent", we.Message)
			}
			select {
			case off := <-agent.offers:
				t.Fatalf("agent was offered a forbidden session: %+v", off)
			default:
			}
		})
	}
}

func TestRegistrationRefused(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	otherKey, _ := identity.Generate()
	forged, err := token.Issue(otherKey, token.Claims{Role: token.RoleClient, Name: "mallory", Agents: []string{"*"}, Expires: time.Now().Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	otherCert, _ := identity.SelfSigned(otherKey.Signer(), "nlvpn-gateway")
	valid := tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})
	// A credential is not a secret: the gateway sees it, so does anyone who
	// reads a node's config. Presented with another key, it is refused.
	owner, _ := identity.Generate()
	tok, _ := token.ParseToken(tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}}))
	owned := tok.Enroll(owner.Public())
	altered := []byte(owned)
	altered[len("nlc2.")+5] ^= 1

	tests := []struct {
		name string
		opts nodeOpts
		code string
		msg  string
	}{
		{"expired token", nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Expires: time.Now().Add(-time.Minute).Unix()})}, wire.CodeExpired, "expired"},
		{"token of another authority", nodeOpts{token: forged}, wire.CodeBadToken, "not signed by this authority"},
		{"credential of another machine", nodeOpts{token: owned}, wire.CodeBadToken, "not bound to this node's key"},
		{"altered credential", nodeOpts{token: string(altered), key: owner}, wire.CodeBadToken, "malformed"},
		{"token sent as it is", nodeOpts{token: "x" + valid}, wire.CodeBadToken, "malformed"},
		{"garbage", nodeOpts{token: "hello, gateway"}, wire.CodeBadToken, "malformed"},
		{"empty", nodeOpts{token: ""}, wire.CodeBadToken, "malformed"},
		{"wrong pin", nodeOpts{token: valid, pin: identity.Fingerprint(otherCert.Leaf)}, wire.CodeBadRequest, "pin mismatch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t, tg, tt.opts)
			start := time.Now()
			fe := n.refused(t)
			if fe.Code != tt.code || !strings.Contains(fe.Message, tt.msg) {
				t.Errorf("FatalError = %q %q; want code %q, message containing %q", fe.Code, fe.Message, tt.code, tt.msg)
			}
			if d := time.Since(start); d > 4*time.Second {
				t.Errorf("refusal took %v", d)
			}
			if n.c.Welcome() != nil {
				t.Error("a refused node has a Welcome")
			}
		})
	}
	// The gateway still serves good nodes.
	startNode(t, tg, nodeOpts{token: valid}).ready(t)
}

func TestAgentNameInUse(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	tok := tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})
	first := startNode(t, tg, nodeOpts{token: tok, advertise: lan})
	w1 := first.ready(t)

	// Another machine with a token of its own for the same name (a copy
	// of the first token is refused before: TestTokenEnrollsItsMachines).
	impostor := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})})
	fe := impostor.refused(t)
	if fe.Code != wire.CodeNameInUse || !strings.Contains(fe.Message, "miranda") {
		t.Fatalf("FatalError = %q %q, want name_in_use naming the agent", fe.Code, fe.Message)
	}

	// The first agent is untouched: clients still reach it, with its key.
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)
	r, err := request(t, client, connectMsg("miranda"))
	if err != nil || r.Session.PeerKey != first.key.Public().String() {
		t.Fatalf("Connect after the impostor = %+v, %v; want the first agent's key", r, err)
	}

	// The same agent (same key) reconnecting from a new socket replaces
	// the old connection and keeps its overlay address.
	again := startNode(t, tg, nodeOpts{token: tok, key: first.key, advertise: lan})
	w2 := again.ready(t)
	if w2.Overlay != w1.Overlay {
		t.Fatalf("reconnected agent overlay %v, was %v", w2.Overlay, w1.Overlay)
	}
}

func TestOverlaySurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	agentKey, _ := identity.Generate()
	clientKey, _ := identity.Generate()

	run := func() (agentAddr, clientAddr netip.Addr) {
		tg := startGateway(t, dir)
		a := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), key: agentKey, advertise: lan})
		c := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice"}), key: clientKey})
		agentAddr, clientAddr = a.ready(t).Overlay, c.ready(t).Overlay
		a.stop(t)
		c.stop(t)
		tg.stop(t)
		return
	}
	a1, c1 := run()
	// Another agent registers in between, on a third gateway instance.
	tg := startGateway(t, dir)
	other := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "prospero"}), advertise: lan})
	o := other.ready(t).Overlay
	other.stop(t)
	tg.stop(t)

	a2, c2 := run()
	if a1 != a2 || c1 != c2 {
		t.Fatalf("overlay addresses changed across a restart: agent %v → %v, client %v → %v", a1, a2, c1, c2)
	}
	if o == a1 || o == c1 || a1 == c1 {
		t.Fatalf("overlay addresses collide: %v %v %v", a1, c1, o)
	}
	for _, a := range []netip.Addr{a1, c1, o} {
		if !overlayNet.Contains(a) {
			t.Fatalf("%v outside %v", a, overlayNet)
		}
	}
}

// TestShutdownWithConnectedNodes: cancelling Run's context stops the
// gateway even while nodes are connected (Ctrl-C on `nlvpn gateway`).
func TestShutdownWithConnectedNodes(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	a := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	a.ready(t)
	tg.cancel()
	select {
	case err := <-tg.done:
		tg.done <- err
	case <-time.After(2 * time.Second):
		t.Fatal("BUG: gateway Run does not return after its context ends while a node is connected " +
			"(serve goroutines block in ReadMessage; Run waits for them before closing the transport)")
	}
}

// TestClientRunReturnsOnCancel: control.Client.Run returns when its
// context ends, and the gateway learns at once that the node left (the
// agent's name is free again for another key).
func TestClientRunReturnsOnCancel(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	tok := tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})
	a := startNode(t, tg, nodeOpts{token: tok, advertise: lan})
	a.ready(t)
	a.cancel()
	select {
	case err := <-a.runErr:
		a.runErr <- err
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want context.Canceled", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("BUG: control.Client.Run does not return after its context ends while registered " +
			"(readControl blocks in wire.ReadMessage and never watches ctx; the connection is never closed)")
	}
	// A new agent of that name, with another key and a token of its own,
	// is welcome now.
	b := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	b.ready(t)
}

// hostile dials the gateway with a valid node certificate but speaks
// nonsense on the control stream.
func hostile(t *testing.T, tg *testGateway, payload []byte) (*wire.Message, *quic.Conn, error) {
	t.Helper()
	qc, err := dialFrom(t, tg, "127.0.0.1")
	if err != nil {
		t.Fatalf("raw dial: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write(payload); err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(5 * time.Second))
	m, err := wire.ReadMessage(st)
	return m, qc, err
}

func frame(body string) []byte {
	b := []byte{0, 0, 0, 0}
	b[0], b[1], b[2], b[3] = byte(len(body)>>24), byte(len(body)>>16), byte(len(body)>>8), byte(len(body))
	return append(b, body...)
}

func TestHostileFirstMessage(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)

	tests := []struct {
		name    string
		payload []byte
		want    string
	}{
		{"garbage json", frame("\x00garbage{"), "bad registration"},
		{"huge length", []byte{0xff, 0xff, 0xff, 0xff, 'x'}, "bad registration"},
		{"connect before hello", frame(`{"type":"connect","id":1,"connect":{"agent":"miranda"}}`), "must be hello"},
		{"unknown type", frame(`{"type":"reboot"}`), "bad registration"},
		{"hello without body", frame(`{"type":"hello"}`), "bad registration"},
	}
	// The gateway gives a refused node 2s to hang up by itself before it
	// closes the connection; the connections are opened first and their
	// ends awaited together, so the test takes that time only once.
	conns := make([]*quic.Conn, len(tests))
	for i, tt := range tests {
		m, qc, err := hostile(t, tg, tt.payload)
		if err != nil {
			t.Fatalf("%s: no error message from the gateway: %v", tt.name, err)
		}
		if m.Type != wire.TypeError || m.Error.Code != wire.CodeBadRequest || !strings.Contains(m.Error.Message, tt.want) {
			t.Fatalf("%s: gateway answered %+v %+v; want bad_request containing %q", tt.name, m, m.Error, tt.want)
		}
		conns[i] = qc
	}
	deadline := time.After(4 * time.Second)
	for i, qc := range conns {
		select {
		case <-qc.Context().Done():
		case <-deadline:
			t.Fatalf("%s: gateway kept the hostile connection open", tests[i].name)
		}
	}
	// Everyone else is still served.
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)
	if _, err := request(t, client, connectMsg("miranda")); err != nil {
		t.Fatalf("Connect after hostile nodes: %v", err)
	}
}

// TestAgentRefusal: an agent's refusal reaches the client as an answer
// with the agent's code.
func TestAgentRefusal(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{
		token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan,
		onRequest: func(context.Context, *wire.Message) *wire.Message {
			return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeForbidden, Message: "not today"}}
		},
	})
	agent.ready(t)
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)
	_, err := request(t, client, connectMsg("miranda"))
	we := wantWireError(t, err, wire.CodeForbidden)
	if !strings.Contains(we.Message, "not today") {
		t.Errorf("message %q lost the agent's reason", we.Message)
	}
	if tg.g.RelayStats().Routes != 0 {
		t.Error("a refused session left a relay route")
	}
}

// TestLateReplyDoesNotKillClient: a client that gave up waiting for a
// Connect must survive the gateway's late answer. A late error reply whose
// code happens to be "fatal" (forbidden, unknown_agent, ...) must not be
// taken for a notice that ends the node's gateway connection for good.
func TestLateReplyDoesNotKillClient(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{
		token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan,
		onRequest: func(context.Context, *wire.Message) *wire.Message {
			time.Sleep(400 * time.Millisecond)
			return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeForbidden, Message: "slow no"}}
		},
	})
	agent.ready(t)
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})})
	client.ready(t)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	_, err := client.c.Request(ctx, connectMsg("miranda"))
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Request = %v, want context.DeadlineExceeded", err)
	}
	select {
	case err := <-client.runErr:
		client.runErr <- err
		t.Fatalf("BUG: the client's Run ended for good after a late reply to an abandoned request: %v", err)
	case <-time.After(time.Second):
	}
	if _, err := request(t, client, connectMsg("nosuch")); err == nil || errors.Is(err, control.ErrNotConnected) {
		t.Fatalf("client unusable after a late reply: %v", err)
	}
}

// sendUDP writes a datagram from the node's own port (where its gateway
// connection comes from) to the gateway's port.
func (n *testNode) sendUDP(t *testing.T, tg *testGateway, b []byte) {
	t.Helper()
	if _, err := n.tr.WriteTo(b, tg.g.Addr()); err != nil {
		t.Fatal(err)
	}
}

// readUDP waits for a non-QUIC datagram on the node's port.
func (n *testNode) readUDP(within time.Duration) ([]byte, netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	buf := make([]byte, 2048)
	k, from, err := n.tr.ReadNonQUICPacket(ctx, buf)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	ap := from.(*net.UDPAddr).AddrPort()
	return buf[:k], netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// checkRelay sends relay checks until the gateway echoes one.
func (n *testNode) checkRelay(t *testing.T, tg *testGateway) {
	t.Helper()
	tok := n.c.Welcome().RelayToken
	if len(tok) != relay.CheckTokenLen {
		t.Fatalf("welcome carries a relay token of %d bytes", len(tok))
	}
	for i := 0; i < 20; i++ {
		h := wire.FrameHeader(wire.FrameRelayCheck, uint64(1000+i))
		c := append(h[:], tok...)
		n.sendUDP(t, tg, c)
		b, _, err := n.readUDP(200 * time.Millisecond)
		if err == nil {
			if !bytes.Equal(b, c) {
				t.Fatalf("relay check answered with %x, want the check %x back", b, c)
			}
			return
		}
	}
	t.Fatal("the gateway never answered a relay check from a node")
}

// testRelayUDP: relay frames sent as UDP from a node's port reach the other
// end unchanged, from the gateway's port, once that end has checked; a node
// that has not checked gets them in DATAGRAMs; frames from an address that
// is not an end of the route, for unknown sessions, and checks from
// strangers are dropped and counted, with nothing sent back.
func testRelayUDP(t *testing.T, tg *testGateway, client, agent *testNode, id uint64) {
	gw := tg.g.Addr().AddrPort()
	gw = netip.AddrPortFrom(gw.Addr().Unmap(), gw.Port())
	before := tg.g.RelayStats()

	// The agent has not checked: the client's UDP frame reaches it in a
	// DATAGRAM of its gateway connection (the fallback carrier).
	pkt := bytes.Repeat([]byte{0xc1}, 1200)
	client.sendUDP(t, tg, relay.Frame(id, pkt))
	select {
	case r := <-agent.relay:
		if r.id != id || !bytes.Equal(r.pkt, pkt) {
			t.Fatalf("DATAGRAM carrier delivered %x/%d bytes", r.id, len(r.pkt))
		}
	case <-time.After(3 * time.Second):
		t.Fatal("a UDP frame for a node that never checked did not arrive by DATAGRAM")
	}

	client.checkRelay(t, tg)
	agent.checkRelay(t, tg)
	for i := 0; i < 10; i++ {
		for _, d := range []struct{ from, to *testNode }{{client, agent}, {agent, client}} {
			pkt := bytes.Repeat([]byte{byte(i), 0x5a}, 100+60*i)
			f := relay.Frame(id, pkt)
			d.from.sendUDP(t, tg, f)
			b, src, err := d.to.readUDP(3 * time.Second)
			if err != nil {
				t.Fatalf("UDP frame %d not relayed: %v", i, err)
			}
			if !bytes.Equal(b, f) || src != gw {
				t.Fatalf("relayed frame %d: %d bytes from %v, want the same %d bytes from the gateway %v", i, len(b), src, len(f), gw)
			}
		}
	}
	full := relay.Frame(id, bytes.Repeat([]byte{0x77}, wire.PeerPacketSize))
	client.sendUDP(t, tg, full)
	if b, _, err := agent.readUDP(3 * time.Second); err != nil || !bytes.Equal(b, full) {
		t.Fatalf("a full-size peer packet as a UDP frame: %d bytes, %v", len(b), err)
	}

	// A stranger (not an end of the route) sends a frame for the session
	// and a relay check: both dropped, nothing reaches anyone.
	stranger, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	spoof := relay.Frame(id, []byte("spoofed"))
	stranger.WriteToUDP(spoof, tg.g.Addr())
	check := wire.FrameHeader(wire.FrameRelayCheck, 99)
	stranger.WriteToUDP(append(check[:], make([]byte, relay.CheckTokenLen)...), tg.g.Addr())
	// A check from a node's own address without its token (a forged
	// source) is refused too, and not answered.
	forged := append(check[:], bytes.Repeat([]byte{0xee}, relay.CheckTokenLen)...)
	client.sendUDP(t, tg, forged)
	// And a node names a session that does not exist.
	client.sendUDP(t, tg, relay.Frame(id^0xff, []byte("nobody's")))
	deadline := time.Now().Add(3 * time.Second)
	for {
		st := tg.g.RelayStats()
		if st.DropNotEndpoint > before.DropNotEndpoint && st.ChecksRefused >= before.ChecksRefused+2 && st.DropUnknown > before.DropUnknown {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("drops not counted: %+v", st)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if b, _, err := agent.readUDP(100 * time.Millisecond); err == nil {
		t.Fatalf("agent got %x from a spoofed or unknown frame", b)
	}
	if b, _, err := client.readUDP(100 * time.Millisecond); err == nil {
		t.Fatalf("the gateway answered a check without the node's token: %x", b)
	}
	stranger.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if n, _, err := stranger.ReadFromUDP(make([]byte, 100)); err == nil {
		t.Fatalf("the gateway answered a stranger with %d bytes", n)
	}
	st := tg.g.RelayStats()
	if st.UDPFrames-before.UDPFrames != 21 {
		t.Errorf("UDP frames forwarded = %d, want 21", st.UDPFrames-before.UDPFrames)
	}
}

// TestTokenExpiresOnLiveConnection: a node whose token runs out while it
// is connected is told and disconnected, its reconnect is refused as
// expired (its control client stops with that fatal error), and an agent
// offered a session learns when the client's token expires.
func TestTokenExpiresOnLiveConnection(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)
	// Token expiry has one-second resolution: 2-3 s from now.
	start := time.Now()
	exp := start.Add(3 * time.Second).Truncate(time.Second)
	// The gateway arms a timer for time.Until(exp) when it admits the
	// client, so the cut is late or not on the monotonic clock: exp has no
	// monotonic reading, and a step of the wall clock mid-test (seen on
	// the development VM: 15 s) must not count as lateness.
	expMono := start.Add(exp.Sub(start))
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}, Expires: exp.Unix()})})
	client.ready(t)
	if _, err := request(t, client, connectMsg("miranda")); err != nil {
		t.Fatalf("Connect: %v", err)
	}
	select {
	case off := <-agent.offers:
		if cr, err := token.ParseCredential(off.PeerCredential); err != nil || cr.Claims.Expires != exp.Unix() {
			t.Errorf("the offer's client credential: %+v, %v; want one that expires at %d", cr, err, exp.Unix())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the agent was never offered the session")
	}
	fe := client.refused(t)
	if fe.Code != wire.CodeExpired || !strings.Contains(fe.Message, "expired") {
		t.Fatalf("after expiry: FatalError %q %q, want code %q", fe.Code, fe.Message, wire.CodeExpired)
	}
	if late := time.Since(expMono); late > 3*time.Second {
		t.Errorf("cut %v after the token expired", late)
	}
	if time.Now().Before(exp) {
		t.Error("cut before the token expired")
	}
}

// TestTokenEnrollsItsMachines: a token enrolls as many machines (node
// keys) as it was issued for, one by default, and no other, also across a
// gateway restart: a copied agent token cannot take the agent's name while
// the agent is offline, and the agent itself comes back under its name.
func TestTokenEnrollsItsMachines(t *testing.T) {
	dir := t.TempDir()
	tg := startGateway(t, dir)
	agentKey, _ := identity.Generate()
	agentTok := tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"})
	a := startNode(t, tg, nodeOpts{token: agentTok, key: agentKey, advertise: lan})
	aw := a.ready(t)
	a.stop(t)

	// The agent is offline; a copy of its token on another machine.
	thief := startNode(t, tg, nodeOpts{token: agentTok, advertise: lan})
	fe := thief.refused(t)
	if fe.Code != wire.CodeTokenUsed || !strings.Contains(fe.Message, "already used by another machine") || !strings.Contains(fe.Message, "--uses") {
		t.Fatalf("copied token: FatalError %q %q, want %q saying what to do", fe.Code, fe.Message, wire.CodeTokenUsed)
	}
	// The real agent comes back under its name and address.
	back := startNode(t, tg, nodeOpts{token: agentTok, key: agentKey, advertise: lan})
	if w := back.ready(t); w.Name != "miranda" || w.Overlay != aw.Overlay {
		t.Fatalf("the agent came back as %+v, want miranda at %v", w, aw.Overlay)
	}
	back.stop(t)

	// A token for two machines enrolls two, not three.
	twoTok := tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}, Uses: 2})
	startNode(t, tg, nodeOpts{token: twoTok}).ready(t)
	startNode(t, tg, nodeOpts{token: twoTok}).ready(t)
	if fe := startNode(t, tg, nodeOpts{token: twoTok}).refused(t); fe.Code != wire.CodeTokenUsed {
		t.Fatalf("third machine on a two-machine token: %q %q", fe.Code, fe.Message)
	}

	// The gateway remembers across a restart.
	tg.stop(t)
	tg2 := startGateway(t, dir)
	if fe := startNode(t, tg2, nodeOpts{token: agentTok, advertise: lan}).refused(t); fe.Code != wire.CodeTokenUsed {
		t.Fatalf("after a gateway restart a copied token got %q %q", fe.Code, fe.Message)
	}
	startNode(t, tg2, nodeOpts{token: agentTok, key: agentKey, advertise: lan}).ready(t)
}

// TestRevocation: revoking a client's tokens by name while it has a
// session tells the agent to end that session and disconnects the client
// within 2 s with a fatal revoked_token; the token is refused from then on,
// across a gateway restart; a token issued for the name afterwards works.
func TestRevocation(t *testing.T) {
	dir := t.TempDir()
	tg := startGateway(t, dir)
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)
	clientKey, _ := identity.Generate()
	tok := tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})
	client := startNode(t, tg, nodeOpts{token: tok, key: clientKey})
	client.ready(t)
	r, err := request(t, client, connectMsg("miranda"))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	<-agent.offers

	start := time.Now()
	if err := AddRevocation(dir, tg.authority, Revocation{Role: token.RoleClient, Name: "alice", At: time.Now().Unix()}); err != nil {
		t.Fatal(err)
	}
	// The agent is told which session to end, and gets the authority's
	// signed list to check and enforce for itself.
	var ids []uint64
	var list *token.Revocations
	for ids == nil || list == nil {
		select {
		case m := <-agent.revoked:
			if m.IDs != nil {
				ids = m.IDs
			}
			if m.List != "" {
				if list, err = token.ParseRevocations(m.List, tg.authority.Public()); err != nil {
					t.Fatalf("the list sent to the agent does not verify: %v", err)
				}
			}
		case <-time.After(2 * time.Second):
			t.Fatalf("within 2 s the agent got session IDs %v and list %v", ids, list)
		}
	}
	if len(ids) != 1 || ids[0] != r.Session.ID {
		t.Errorf("agent told to end %v, want [%x]", ids, r.Session.ID)
	}
	if list.Serial != 1 || len(list.List) != 1 || list.List[0].Name != "alice" {
		t.Errorf("list sent to the agent: %+v", list)
	}
	fe := client.refused(t)
	if fe.Code != wire.CodeRevoked || !strings.Contains(fe.Message, "revoked") {
		t.Fatalf("client after revocation: %q %q", fe.Code, fe.Message)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("client cut %v after the revocation", d)
	}
	if fe := startNode(t, tg, nodeOpts{token: tok, key: clientKey}).refused(t); fe.Code != wire.CodeRevoked {
		t.Fatalf("revoked token at registration: %q %q", fe.Code, fe.Message)
	}
	tg.stop(t)
	tg2 := startGateway(t, dir)
	if fe := startNode(t, tg2, nodeOpts{token: tok, key: clientKey}).refused(t); fe.Code != wire.CodeRevoked {
		t.Fatalf("revoked token after a gateway restart: %q %q", fe.Code, fe.Message)
	}
	fresh := tg2.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}, Issued: time.Now().Add(2 * time.Second).Unix()})
	startNode(t, tg2, nodeOpts{token: fresh}).ready(t)
	// An agent of another name is untouched.
	agent2 := startNode(t, tg2, nodeOpts{token: tg2.token(t, token.Claims{Role: token.RoleAgent, Name: "caliban"}), advertise: lan})
	// and an agent that registers gets the list in force with its welcome.
	if rs, err := token.ParseRevocations(agent2.ready(t).Revocations, tg2.authority.Public()); err != nil || rs.Serial != 1 {
		t.Fatalf("list in the agent's welcome: %+v, %v", rs, err)
	}
}

// A revocation list the authority did not sign (a forged one, or one an
// attacker on the gateway machine altered), or one older than the list in
// force, is refused: the list in force stays and reaches no agent.
func TestRevocationListMustVerify(t *testing.T) {
	dir := t.TempDir()
	tg := startGateway(t, dir)
	if err := AddRevocation(dir, tg.authority, Revocation{ID: "t1", At: 1}); err != nil {
		t.Fatal(err)
	}
	if err := AddRevocation(dir, tg.authority, Revocation{ID: "t2", At: 2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "list 2 in force", func() bool { l := tg.g.revoked.Load().list; return l != nil && l.Serial == 2 })
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)

	other, _ := identity.Generate()
	forged, _ := token.Revocations{Serial: 9}.Sign(other)
	old, _ := token.Revocations{Serial: 1, List: []token.Revocation{{ID: "t1", At: 1}}}.Sign(tg.authority)
	for _, bad := range []string{forged, old, "nlr1.garbage"} {
		if err := os.WriteFile(RevocationsPath(dir), []byte(bad), 0o644); err != nil {
			t.Fatal(err)
		}
		time.Sleep(3 * revokeCheckEvery)
		if l := tg.g.revoked.Load().list; l.Serial != 2 || len(l.List) != 2 {
			t.Fatalf("after writing %.20q the list in force is %+v", bad, l)
		}
		select {
		case m := <-agent.revoked:
			t.Fatalf("the agent was sent %+v", m)
		default:
		}
	}
}

// TestConnectAfterClientLeft: a connect whose client is gone by the time
// the gateway binds its relay route (Ctrl-C at the wrong moment) ends with
// an error. It used to retry the bind for ever, at 100 % CPU.
func TestConnectAfterClientLeft(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)
	// The gateway's record of a client whose connection has just closed.
	c := &node{name: "alice", role: token.RoleClient, claims: &token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda"}},
		routes: make(map[string]uint64), peer: tg.g.hub.NewPeer("client/alice", netip.AddrPort{}, [relay.CheckTokenLen]byte{}, nil)}
	c.peer.Close() // what the client's leaving does first

	for _, resume := range []uint64{0, 12345} {
		done := make(chan *wire.Message, 1)
		go func() { done <- tg.g.connect(context.Background(), c, &wire.Connect{Agent: "miranda", Resume: resume}) }()
		select {
		case r := <-done:
			if r.Type != wire.TypeError || r.Error.Code != wire.CodeUnavailable {
				t.Fatalf("resume %d: connect for a gone client = %+v, want an %s error", resume, r, wire.CodeUnavailable)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("resume %d: connect for a gone client never returned (spinning on the relay bind)", resume)
		}
	}
	if n := tg.g.RelayStats().Routes; n != 0 {
		t.Errorf("%d relay routes left for a gone client", n)
	}
}

// TestClientsLeavingMidConnect: a hundred clients that disconnect while
// their connect is under way leave the gateway as it was: no relay
// routes, no goroutines, no CPU.
func TestClientsLeavingMidConnect(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{
		token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan,
		onRequest: func(ctx context.Context, m *wire.Message) *wire.Message {
			time.Sleep(20 * time.Millisecond) // the window in which clients leave
			return &wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{}}
		},
	})
	agent.ready(t)
	tok := tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda"}, Uses: 1000})
	settle := func() int {
		time.Sleep(200 * time.Millisecond)
		return runtime.NumGoroutine()
	}
	base := settle()

	const clients = 100
	for i := range clients {
		client := startNode(t, tg, nodeOpts{token: tok})
		client.ready(t)
		ctx, cancel := context.WithCancel(context.Background())
		go client.c.Request(ctx, connectMsg("miranda"))
		// Leave at a different moment of the connect each time.
		time.Sleep(time.Duration(i%25) * time.Millisecond)
		cancel()
		client.stop(t)
	}

	deadline := time.Now().Add(10 * time.Second)
	for {
		routes, g := tg.g.RelayStats().Routes, settle()
		if routes == 0 && g <= base+10 {
			t.Logf("after %d clients left mid-connect: %d goroutines (%d before), 0 routes", clients, g, base)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %d clients left mid-connect: %d relay routes, %d goroutines (%d before)", clients, routes, g, base)
		}
	}
	// Idle: a spinning connect would burn a whole core.
	before := cpuTime(t)
	time.Sleep(time.Second)
	if used := cpuTime(t) - before; used > 300*time.Millisecond {
		t.Errorf("the gateway used %v of CPU in an idle second after the clients left", used)
	}
}
