package client

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// The client's session state machine (reattach, resume, a new session),
// driven by a fake gateway on loopback built from the real wire package,
// with the end-to-end dial replaced by loopback QUIC sessions: no TUN, no
// namespaces, no root.

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// sessionPair is a session on a real QUIC connection over loopback: the
// client's end, and the far end's connection (the agent's), which ends it
// when closed.
func sessionPair(t *testing.T, id uint64) (*session.Session, *quic.Conn) {
	t.Helper()
	s, far, err := newSessionPair(t, id)
	if err != nil {
		t.Fatal(err)
	}
	return s, far
}

// newSessionPair is sessionPair for any goroutine.
func newSessionPair(t *testing.T, id uint64) (*session.Session, *quic.Conn, error) {
	k, err := identity.Generate()
	if err != nil {
		return nil, nil, err
	}
	cert, err := k.Certificate()
	if err != nil {
		return nil, nil, err
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", identity.ServerTLS(cert, "test"), &quic.Config{EnableDatagrams: true})
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { ln.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	far := make(chan *quic.Conn, 1)
	go func() {
		qc, err := ln.Accept(ctx)
		if err != nil {
			close(far)
			return
		}
		far <- qc
	}()
	qc, err := quic.DialAddr(ctx, ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"test"}, Certificates: []tls.Certificate{cert}},
		&quic.Config{EnableDatagrams: true})
	if err != nil {
		return nil, nil, err
	}
	t.Cleanup(func() { qc.CloseWithError(0, "") })
	fc := <-far
	if fc == nil {
		return nil, nil, errors.New("far end of the session not accepted")
	}
	t.Cleanup(func() { fc.CloseWithError(0, "") })
	return session.New(id, qc, quiet), fc, nil
}

func TestResumes(t *testing.T) {
	alive, _ := sessionPair(t, 5)
	dead, far := sessionPair(t, 5)
	far.CloseWithError(0, "agent restarted")
	select {
	case <-dead.Conn.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the session did not end with its far end")
	}

	for _, tt := range []struct {
		name string
		cur  *session.Session
		want uint64
	}{
		{"no session yet", nil, 0},
		{"a live session is resumed", alive, 5},
		{"a dead one is not", dead, 0},
	} {
		if got := resumeID(tt.cur); got != tt.want {
			t.Errorf("resumeID: %s: %d, want %d", tt.name, got, tt.want)
		}
	}

	for _, tt := range []struct {
		name  string
		cur   *session.Session
		asked uint64
		off   wire.Session
		keep  bool
	}{
		{"the agent holds it: keep the connection", alive, 5, wire.Session{ID: 5, Resumed: true}, true},
		{"the agent lost it: a new connection", alive, 5, wire.Session{ID: 5}, false},
		{"the gateway set up another session", alive, 5, wire.Session{ID: 6, Resumed: true}, false},
		{"nothing was asked to resume", alive, 0, wire.Session{ID: 5, Resumed: true}, false},
		{"the client's end died meanwhile", dead, 5, wire.Session{ID: 5, Resumed: true}, false},
		{"no session to keep", nil, 5, wire.Session{ID: 5, Resumed: true}, false},
		{"asked for another session than the current", alive, 6, wire.Session{ID: 6, Resumed: true}, false},
	} {
		if got := resumes(tt.cur, tt.asked, &tt.off); got != tt.keep {
			t.Errorf("resumes: %s: %v, want %v", tt.name, got, tt.keep)
		}
	}
}

// gatewayFake listens on loopback as a gateway does.
type gatewayFake struct {
	ln  *quic.Listener
	pin string
}

func newGatewayFake(t *testing.T) *gatewayFake {
	t.Helper()
	k, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := identity.SelfSigned(k.Signer(), "gateway")
	if err != nil {
		t.Fatal(err)
	}
	cfg := control.QUICConfig()
	cfg.MaxIncomingStreams = 1
	ln, err := quic.ListenAddr("127.0.0.1:0", identity.ServerTLS(cert, wire.ALPNGateway), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &gatewayFake{ln: ln, pin: identity.Fingerprint(cert.Leaf)}
}

// nodeConn is the fake gateway's end of one node connection.
type nodeConn struct {
	t     *testing.T
	qc    *quic.Conn
	st    *quic.Stream
	ch    *wire.Channel
	hello *wire.Hello
}

// accept takes the node's next connection and its hello.
func (g *gatewayFake) accept(t *testing.T) *nodeConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	qc, err := g.ln.Accept(ctx)
	if err != nil {
		t.Fatalf("the node did not connect: %v", err)
	}
	st, err := qc.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(st)
	if err != nil || m.Type != wire.TypeHello {
		t.Fatalf("first message %+v, %v; want a hello", m, err)
	}
	return &nodeConn{t: t, qc: qc, st: st, ch: wire.NewChannel(st), hello: m.Hello}
}

func (n *nodeConn) send(m *wire.Message) {
	n.t.Helper()
	if err := n.ch.Write(m); err != nil {
		n.t.Fatal(err)
	}
}

// connect reads the node's next message, which must be a Connect.
func (n *nodeConn) connect() *wire.Message {
	n.t.Helper()
	n.st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(n.st)
	if err != nil || m.Type != wire.TypeConnect || m.ID == 0 {
		n.t.Fatalf("got %+v, %v; want a connect request", m, err)
	}
	return m
}

// reattachBench is a client with its tunnel up (as far as the session
// goes) on session 5, registered with a fake gateway as 100.64.0.3.
type reattachBench struct {
	c     *Client
	gw    *gatewayFake
	node  *nodeConn
	agent *identity.Key
	cred  string // the agent's credential
	// authorityKey signs the credentials of this network.
	authorityKey *identity.Key
	runErr       <-chan error
	far          map[uint64]*quic.Conn // the agent's ends of the sessions dialed, by ID
	dialed       chan *wire.Session    // offers dialSession was called for
	mu           sync.Mutex
}

const benchOverlay = "100.64.0.3"

func newReattachBench(t *testing.T) *reattachBench {
	t.Helper()
	authority, _ := identity.Generate()
	ckey, _ := identity.Generate()
	akey, _ := identity.Generate()
	tok, err := token.Issue(authority, token.Claims{Role: token.RoleAgent, Name: "miranda", Expires: time.Now().Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	pt, err := token.ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	b := &reattachBench{gw: newGatewayFake(t), agent: akey, cred: pt.Enroll(akey.Public()), authorityKey: authority,
		far: make(map[uint64]*quic.Conn), dialed: make(chan *wire.Session, 8)}

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &Client{cfg: Config{Gateway: b.gw.ln.Addr().String(), Pin: b.gw.pin, Token: "nlv1.x.y", Key: ckey, Agent: "miranda",
		Mode: wire.ModeRelay, Over: control.OverUDP, Log: quiet},
		log: quiet, authority: authority.Public(), ctx: ctx, direct: make(chan struct{}, 1),
		up: make(chan struct{}, 1), moved: make(chan netip.Addr, 1)}
	c.dialSession = func(ctx context.Context, off *wire.Session, key identity.PublicKey) (*session.Session, *wire.PeerInfo, error) {
		if !key.Equal(akey.Public()) {
			t.Errorf("dialing agent key %s, want %s", key, akey.Public())
		}
		b.dialed <- off
		s, far, err := newSessionPair(t, off.ID)
		if err != nil {
			return nil, nil, err
		}
		b.mu.Lock()
		b.far[off.ID] = far
		b.mu.Unlock()
		return s, c.info, nil
	}
	u, err := underlay.Open(c.gatewayConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	c.u = u
	b.c = c
	b.runErr = u.Start()
	t.Cleanup(u.Stop)

	b.node = b.gw.accept(t)
	if b.node.hello.Overlay.IsValid() {
		t.Fatalf("first hello asks for overlay %s", b.node.hello.Overlay)
	}
	b.node.send(&wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "laptop", Role: "client", Overlay: netip.MustParseAddr(benchOverlay)}})
	rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
	w, err := u.Ctrl.Ready(rctx)
	rcancel()
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.up: // the first registration, as Run takes it
	case <-time.After(10 * time.Second):
		t.Fatal("onUp not told of the registration")
	}

	// The tunnel is up on session 5 (what Run does after firstSession).
	s, far := sessionPair(t, 5)
	b.far[5] = far
	c.info = &wire.PeerInfo{Name: "miranda", Overlay: netip.MustParseAddr("100.64.0.2")}
	c.cur.Store(s)
	c.overlay = w.Overlay
	c.mine.Store(&w.Overlay)
	c.pump(s)
	return b
}

// keep runs keepAttached, as Run does once the tunnel is up.
func (b *reattachBench) keep(t *testing.T) <-chan error {
	ctx, cancel := context.WithCancel(context.Background())
	done, stopped := make(chan error, 1), make(chan struct{})
	go func() {
		done <- b.c.keepAttached(ctx, b.runErr)
		close(stopped)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			t.Error("keepAttached did not stop")
		}
	})
	return done
}

// answer replies to connect request m with session id.
func (b *reattachBench) answer(m *wire.Message, id uint64, resumed bool) {
	b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeSession, Session: &wire.Session{ID: id, PeerName: "miranda",
		PeerCredential: b.cred, PeerKey: b.agent.Public().String(), PeerAddr: netip.MustParseAddr("100.64.0.2"),
		Mode: wire.ModeRelay, Resumed: resumed}})
}

func (b *reattachBench) farEnd(id uint64) *quic.Conn {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.far[id]
}

func (b *reattachBench) noDial(t *testing.T, what string) {
	t.Helper()
	select {
	case off := <-b.dialed:
		t.Fatalf("%s: a new end-to-end connection was dialed for session %d", what, off.ID)
	default:
	}
}

func (b *reattachBench) wantDial(t *testing.T, id uint64) {
	t.Helper()
	select {
	case off := <-b.dialed:
		if off.ID != id {
			t.Fatalf("dialed session %d, want %d", off.ID, id)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("no end-to-end connection dialed for session %d", id)
	}
}

// waitCur waits until the current session is id, on a connection other
// than old's.
func (b *reattachBench) waitCur(t *testing.T, id uint64, old *session.Session) *session.Session {
	t.Helper()
	for range 1000 {
		if s := b.c.cur.Load(); s != old && s.ID == id {
			return s
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the current session is still %d (replaced: %v), want a new one %d", b.c.cur.Load().ID, b.c.cur.Load() != old, id)
	return nil
}

// The agent left the gateway (Gone), the gateway restarted, the agent
// lost the session, the session ended: each time the client asks the
// gateway again, resuming what both ends still hold and dialing anew only
// what is lost.
func TestReattach(t *testing.T) {
	b := newReattachBench(t)
	c := b.c
	first := c.cur.Load()
	b.keep(t)

	// Gone for another session changes nothing; for ours it re-attaches,
	// asking to resume 5; the agent still holds it: the same connection
	// carries on. (The next Connect shows the reattach before it is done.)
	b.node.send(&wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: 9}})
	b.node.send(&wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: 5}})
	m := b.node.connect()
	if m.Connect.Resume != 5 || m.Connect.Agent != "miranda" || m.Connect.Mode != wire.ModeRelay {
		t.Fatalf("after Gone: connect %+v, want agent miranda resuming 5 in relay mode", m.Connect)
	}
	b.answer(m, 5, true)

	// The gateway restarts: the node comes back with its overlay address,
	// and the session resumes over the new gateway connection.
	b.node.qc.CloseWithError(0, "gateway restarting")
	b.node = b.gw.accept(t)
	if got := b.node.hello.Overlay; got != netip.MustParseAddr(benchOverlay) {
		t.Fatalf("hello after the reconnect asks for overlay %v, want %s", got, benchOverlay)
	}
	b.node.send(&wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "laptop", Role: "client", Overlay: netip.MustParseAddr(benchOverlay)}})
	m = b.node.connect()
	if m.Connect.Resume != 5 {
		t.Fatalf("after the gateway restart: connect resumes %d, want 5", m.Connect.Resume)
	}
	b.noDial(t, "the first resume")
	if c.cur.Load() != first || !first.Alive() {
		t.Fatal("a resumed session was replaced or closed")
	}
	b.answer(m, 5, true)

	// The agent restarted and holds session 5 no more (the gateway binds
	// the same ID again, not resumed): a new end-to-end connection, and
	// the old one is closed.
	b.node.send(&wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: 5}})
	m = b.node.connect()
	b.noDial(t, "the resume after the gateway restart")
	if c.cur.Load() != first {
		t.Fatal("a resumed session was replaced")
	}
	b.answer(m, 5, false)
	b.wantDial(t, 5)
	second := b.waitCur(t, 5, first)
	select {
	case <-first.Conn.Context().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the replaced session's connection was not closed")
	}

	// The session ends (the agent went away for good with it): a new one,
	// asking to resume nothing; an agent that is not there yet is asked
	// for again.
	b.farEnd(5).CloseWithError(0, "agent stopping")
	m = b.node.connect()
	if m.Connect.Resume != 0 {
		t.Fatalf("after the session ended: connect resumes %d, want a new session", m.Connect.Resume)
	}
	b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnknownAgent, Message: "no agent miranda"}})
	m = b.node.connect()
	b.noDial(t, "an agent not there")
	b.answer(m, 7, false)
	b.wantDial(t, 7)
	b.waitCur(t, 7, second)
}

// A reconnect that gives the client another overlay address (another
// process with its name holds it now) ends the tunnel with an error that
// says so, as does a refusal the gateway connection cannot get past.
func TestReattachEnds(t *testing.T) {
	t.Run("overlay taken", func(t *testing.T) {
		b := newReattachBench(t)
		done := b.keep(t)
		b.node.qc.CloseWithError(0, "gateway restarting")
		b.node = b.gw.accept(t)
		b.node.send(&wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "laptop", Role: "client", Overlay: netip.MustParseAddr("100.64.0.99")}})
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), "100.64.0.99") {
				t.Fatalf("keepAttached = %v, want an error naming the new address", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the tunnel went on with an overlay address it does not have")
		}
	})
	t.Run("token revoked", func(t *testing.T) {
		b := newReattachBench(t)
		done := b.keep(t)
		b.node.send(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeRevoked, Message: "token revoked"}})
		select {
		case err := <-done:
			var fe *control.FatalError
			if !errors.As(err, &fe) || fe.Code != wire.CodeRevoked {
				t.Fatalf("keepAttached = %v, want the gateway's refusal", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the tunnel went on after a fatal refusal")
		}
	})
	t.Run("refused while reattaching", func(t *testing.T) {
		// The gateway connection gives up while the client retries a
		// reattach: reattach returns its error instead of retrying on.
		b := newReattachBench(t)
		done := b.keep(t)
		b.node.send(&wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: 5}})
		m := b.node.connect()
		b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "busy"}})
		b.node.send(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeExpired, Message: "token expired"}})
		select {
		case err := <-done:
			var fe *control.FatalError
			if !errors.As(err, &fe) || fe.Code != wire.CodeExpired {
				t.Fatalf("keepAttached = %v, want the gateway's refusal", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("reattach went on retrying after a fatal refusal")
		}
	})
}

// A Gone notice re-attaches only the current session; the signal is one
// slot deep, so a burst of notices makes one reattach.
func TestOnGoneOnlyForTheCurrentSession(t *testing.T) {
	s, _ := sessionPair(t, 5)
	c := &Client{up: make(chan struct{}, 1)}
	c.onGone(5) // no session yet
	if len(c.up) != 0 {
		t.Fatal("Gone before the tunnel is up signalled a reattach")
	}
	c.cur.Store(s)
	c.onGone(9)
	if len(c.up) != 0 {
		t.Fatal("Gone for another session signalled a reattach")
	}
	c.onGone(5)
	c.onGone(5)
	if len(c.up) != 1 {
		t.Fatalf("%d reattach signals after Gone for the current session, want 1", len(c.up))
	}
}

// The first session: an agent that is not online yet is asked for again
// while WaitAgent allows (until stopped by default, not at all when
// negative); any other refusal ends it at once.
func TestFirstSessionWaitsForAgent(t *testing.T) {
	for _, tt := range []struct {
		name    string
		wait    time.Duration
		replies []string // the gateway's answers: "absent", "busy", "forbidden", "session"
		err     string   // in the error; "" for a session
	}{
		{"waits until the agent is there", 0, []string{"absent", "busy", "session"}, ""},
		{"does not wait with a negative wait", -1, []string{"absent"}, "no agent miranda"},
		{"a refusal is not waited out", 0, []string{"forbidden"}, "not for you"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newReattachBench(t)
			b.c.cfg.WaitAgent = tt.wait
			done := b.firstSession()
			for _, r := range tt.replies {
				m := b.node.connect()
				if m.Connect.Resume != 0 {
					t.Fatalf("the first session resumes %d", m.Connect.Resume)
				}
				code := map[string]string{"absent": wire.CodeUnknownAgent, "busy": wire.CodeUnavailable, "forbidden": wire.CodeForbidden}[r]
				if r == "session" {
					b.answer(m, 8, false)
				} else {
					b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeError, Error: &wire.Error{Code: code, Message: map[string]string{
						"absent": "no agent miranda", "busy": "agent busy", "forbidden": "not for you"}[r]}})
				}
			}
			res := b.firstResult(t, done)
			if tt.err == "" {
				if res.err != nil || res.s == nil || res.s.ID != 8 {
					t.Fatalf("firstSession = %v, %v; want session 8", res.s, res.err)
				}
				b.wantDial(t, 8)
				return
			}
			if res.err == nil || !strings.Contains(res.err.Error(), tt.err) {
				t.Fatalf("firstSession error %v, want one saying %q", res.err, tt.err)
			}
			b.noDial(t, tt.name)
		})
	}

	t.Run("waits no longer than told", func(t *testing.T) {
		b := newReattachBench(t)
		b.c.cfg.WaitAgent = 2 * time.Second
		done := b.firstSession()
		// One reader owns the stream: a short read deadline could fire
		// between a message's length and its body and lose the framing.
		asked := make(chan *wire.Message, 16)
		go func() {
			defer close(asked)
			for {
				m, err := wire.ReadMessage(b.node.st)
				if err != nil {
					return
				}
				asked <- m
			}
		}()
		asks := 0
		var res firstResult
		end := time.After(20 * time.Second)
	answer:
		for {
			select {
			case m, ok := <-asked:
				if !ok {
					t.Fatal("the control stream ended before firstSession returned")
				}
				asks++
				b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnknownAgent, Message: "no agent miranda"}})
			case res = <-done:
				break answer
			case <-end:
				t.Fatal("firstSession did not return")
			}
		}
		if asks < 2 || res.err == nil || !strings.Contains(res.err.Error(), "--wait") {
			t.Fatalf("asked %d times, then %v; want asking again, then an error naming --wait", asks, res.err)
		}
	})
}

type firstResult struct {
	s   *session.Session
	err error
}

// firstSession runs the client's firstSession, as Run does.
func (b *reattachBench) firstSession() chan firstResult {
	done := make(chan firstResult, 1)
	go func() {
		s, _, err := b.c.firstSession(context.Background(), b.runErr)
		done <- firstResult{s, err}
	}()
	return done
}

func (b *reattachBench) firstResult(t *testing.T, done chan firstResult) firstResult {
	t.Helper()
	select {
	case r := <-done:
		return r
	case <-time.After(20 * time.Second):
		t.Fatal("firstSession did not return")
		return firstResult{}
	}
}

// The client takes the agent's key only with a credential from its own
// authority for that agent: a gateway that puts its own key in the middle
// (or another agent's) is refused for good, and nothing is dialed.
func TestAgentKeyNeedsTheAuthority(t *testing.T) {
	other, _ := identity.Generate()
	issue := func(t *testing.T, by *identity.Key, role, name string, key *identity.Key) string {
		tok, err := token.Issue(by, token.Claims{Role: role, Name: name, Expires: time.Now().Add(time.Hour).Unix()})
		if err != nil {
			t.Fatal(err)
		}
		pt, err := token.ParseToken(tok)
		if err != nil {
			t.Fatal(err)
		}
		return pt.Enroll(key.Public())
	}
	gwKey, _ := identity.Generate()
	for _, tt := range []struct {
		name string
		cred func(b *reattachBench) (cred string, key *identity.Key)
	}{
		{"the gateway's own key, credential from another authority", func(*reattachBench) (string, *identity.Key) {
			return issue(t, other, token.RoleAgent, "miranda", gwKey), gwKey
		}},
		{"another agent's credential and key", func(b *reattachBench) (string, *identity.Key) {
			return issue(t, b.authorityKey, token.RoleAgent, "prospero", gwKey), gwKey
		}},
		{"a client's credential", func(b *reattachBench) (string, *identity.Key) {
			return issue(t, b.authorityKey, token.RoleClient, "miranda", gwKey), gwKey
		}},
		{"the agent's credential with another key", func(b *reattachBench) (string, *identity.Key) {
			return b.cred, gwKey
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := newReattachBench(t)
			b.c.cfg.WaitAgent = -1
			done := b.firstSession()
			m := b.node.connect()
			cred, key := tt.cred(b)
			b.node.send(&wire.Message{ID: m.ID, Type: wire.TypeSession, Session: &wire.Session{ID: 8, PeerName: "miranda",
				PeerCredential: cred, PeerKey: key.Public().String(), PeerAddr: netip.MustParseAddr("100.64.0.2"), Mode: wire.ModeRelay}})
			res := b.firstResult(t, done)
			var fe *control.FatalError
			if !errors.As(res.err, &fe) || fe.Code != wire.CodeForbidden {
				t.Fatalf("firstSession = %v, want a fatal refusal of the agent's key", res.err)
			}
			b.noDial(t, tt.name)
		})
	}
}
