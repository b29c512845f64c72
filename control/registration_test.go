package control

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/wire"
)

// The control client's state machine (registration, refusals, retries,
// reconnects, notices, requests both ways) against a fake gateway on
// loopback (fakeGateway: the real wire package, the real QUIC
// configuration), through the public API only.

// nodeOn returns a Client for the fake gateway at ln with pin, configured
// by cfg (its callbacks, token, advertised subnets) and the test's key,
// UDP port and log.
func nodeOn(t *testing.T, ln *quic.Listener, pin string, cfg Config) *Client {
	t.Helper()
	cfg.Gateway, cfg.Pin, cfg.Over = ln.Addr().String(), pin, OverUDP
	return newNode(t, cfg)
}

// run runs c until the test ends; the channel yields Run's result.
func run(t *testing.T, c *Client) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done, stopped := make(chan error, 1), make(chan struct{})
	go func() {
		done <- c.Run(ctx)
		close(stopped)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			t.Error("Run did not stop after cancel")
		}
	})
	return done
}

// gwConn is the fake gateway's end of one node connection.
type gwConn struct {
	t      *testing.T
	qc     *quic.Conn
	st     *quic.Stream
	ch     *wire.Channel
	hello  *wire.Hello
	accept time.Time // when the node's connection came in
}

// acceptHello takes the node's next connection and its hello.
func acceptHello(t *testing.T, ln *quic.Listener) *gwConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	qc, err := ln.Accept(ctx)
	if err != nil {
		t.Fatalf("the node did not connect: %v", err)
	}
	at := time.Now()
	st, err := qc.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(st)
	if err != nil || m.Type != wire.TypeHello {
		t.Fatalf("first message %+v, %v; want a hello", m, err)
	}
	return &gwConn{t: t, qc: qc, st: st, ch: wire.NewChannel(st), hello: m.Hello, accept: at}
}

func (g *gwConn) send(m *wire.Message) {
	g.t.Helper()
	if err := g.ch.Write(m); err != nil {
		g.t.Fatal(err)
	}
}

func (g *gwConn) welcome(overlay string) *wire.Welcome {
	g.t.Helper()
	w := &wire.Welcome{Name: "miranda", Role: "agent", Overlay: netip.MustParseAddr(overlay),
		Observed: netip.MustParseAddrPort("198.18.3.2:41000")}
	g.send(&wire.Message{Type: wire.TypeWelcome, Welcome: w})
	return w
}

// read reads the node's next message.
func (g *gwConn) read() *wire.Message {
	g.t.Helper()
	g.st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(g.st)
	if err != nil {
		g.t.Fatalf("reading from the node: %v", err)
	}
	return m
}

func ready(t *testing.T, c *Client) *wire.Welcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := c.Ready(ctx)
	if err != nil {
		t.Fatalf("Ready: %v", err)
	}
	return w
}

// Registration: the hello carries the node's token, subnets and protocol
// version (and no overlay address the first time); the welcome makes the
// node ready, runs OnUp with it and is what Welcome returns.
func TestRegistration(t *testing.T) {
	ln, pin := fakeGateway(t)
	ups := make(chan *wire.Welcome, 4)
	adv := []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24")}
	c := nodeOn(t, ln, pin, Config{Token: "nlv1.the.token", Advertise: adv,
		OnUp: func(_ context.Context, w *wire.Welcome) { ups <- w }})
	run(t, c)
	g := acceptHello(t, ln)
	if h := g.hello; h.Token != "nlv1.the.token" || !slices.Equal(h.Advertise, adv) || h.Version != wire.ProtocolVersion || h.Overlay.IsValid() {
		t.Fatalf("hello %+v", h)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	if _, err := c.Ready(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ready before the welcome = %v, want to wait", err)
	}
	cancel()
	if c.Transport() != "" || c.Welcome() != nil {
		t.Fatalf("before the welcome: transport %q, welcome %+v", c.Transport(), c.Welcome())
	}

	want := g.welcome("100.64.0.7")
	if w := ready(t, c); w.Name != want.Name || w.Overlay != want.Overlay || w.Observed != want.Observed {
		t.Fatalf("Ready = %+v, want %+v", w, want)
	}
	select {
	case w := <-ups:
		if w.Overlay != want.Overlay {
			t.Fatalf("OnUp(%+v)", w)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("OnUp not called")
	}
	if c.Welcome().Overlay != want.Overlay || c.Transport() != OverUDP || c.GatewayAddr().String() != ln.Addr().String() {
		t.Fatalf("welcome %+v, transport %q, gateway %v", c.Welcome(), c.Transport(), c.GatewayAddr())
	}
}

// A refusal retrying cannot fix ends Run with a *FatalError, before or
// after the welcome; OnUp never runs for a refused registration.
func TestFatalRefusal(t *testing.T) {
	for _, code := range []string{wire.CodeBadToken, wire.CodeExpired, wire.CodeRevoked, wire.CodeTokenUsed, wire.CodeForbidden, wire.CodeNameInUse, wire.CodeBadRequest} {
		for _, after := range []bool{false, true} {
			name := code
			if after {
				name += " on a live connection"
			}
			t.Run(name, func(t *testing.T) {
				ln, pin := fakeGateway(t)
				ups := make(chan struct{}, 1)
				c := nodeOn(t, ln, pin, Config{OnUp: func(context.Context, *wire.Welcome) { ups <- struct{}{} }})
				done := run(t, c)
				g := acceptHello(t, ln)
				if after {
					g.welcome("100.64.0.7")
					ready(t, c)
					<-ups
				}
				g.send(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: code, Message: "refused: " + code}})
				var err error
				select {
				case err = <-done:
				case <-time.After(10 * time.Second):
					t.Fatal("Run goes on after a fatal refusal")
				}
				var fe *FatalError
				if !errors.As(err, &fe) || fe.Code != code || fe.Message != "refused: "+code {
					t.Fatalf("Run = %v (%T), want a FatalError with code %s", err, err, code)
				}
				if _, rerr := c.Ready(context.Background()); !after && rerr != err {
					t.Fatalf("Ready = %v, want Run's error", rerr)
				}
				if !after && len(ups) != 0 {
					t.Fatal("OnUp ran for a refused registration")
				}
			})
		}
	}
}

// A refusal that may pass (the gateway busy) and a registration that goes
// wrong (no welcome) are retried, with a backoff that doubles (the wait is
// at least half the backoff: 500 ms, then 1 s); a registered node that
// loses its connection reconnects asking for its overlay address, and
// OnUp runs again, its first run's context ended with the first
// connection.
func TestRetryAndReconnect(t *testing.T) {
	ln, pin := fakeGateway(t)
	type up struct {
		ctx context.Context
		w   *wire.Welcome
	}
	ups := make(chan up, 4)
	c := nodeOn(t, ln, pin, Config{OnUp: func(ctx context.Context, w *wire.Welcome) { ups <- up{ctx, w} }})
	done := run(t, c)

	g := acceptHello(t, ln)
	g.send(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "busy"}})
	refused := time.Now()
	g = acceptHello(t, ln)
	if gap := g.accept.Sub(refused); gap < 250*time.Millisecond {
		t.Fatalf("retried %v after the refusal, want a backoff of at least 250ms", gap)
	}
	g.send(&wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{ID: 1}}) // not a welcome
	refused = time.Now()
	g = acceptHello(t, ln)
	if gap := g.accept.Sub(refused); gap < 500*time.Millisecond {
		t.Fatalf("retried %v after the second failure, want the backoff doubled (at least 500ms)", gap)
	}
	if g.hello.Overlay.IsValid() {
		t.Fatalf("hello asks for overlay %v before any registration", g.hello.Overlay)
	}
	w1 := g.welcome("100.64.0.7")
	ready(t, c)
	first := <-ups

	g.qc.CloseWithError(0, "gateway restarting")
	select {
	case <-first.ctx.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("OnUp's context did not end with its connection")
	}
	g = acceptHello(t, ln)
	if g.hello.Overlay != w1.Overlay {
		t.Fatalf("reconnect asks for overlay %v, want %v", g.hello.Overlay, w1.Overlay)
	}
	w2 := g.welcome("100.64.0.7")
	select {
	case second := <-ups:
		if second.ctx.Err() != nil || second.w.Overlay != w2.Overlay {
			t.Fatalf("OnUp after the reconnect: %+v (ctx %v)", second.w, second.ctx.Err())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("OnUp not run after the reconnect")
	}
	select {
	case err := <-done:
		t.Fatalf("Run ended: %v", err)
	default:
	}
}

// Notices reach their callbacks in order, with what they carry, and the
// node stays registered through notices it has no use for (a non-fatal
// error, a late reply, an unexpected message).
func TestNotices(t *testing.T) {
	ln, pin := fakeGateway(t)
	got := make(chan any, 16)
	c := nodeOn(t, ln, pin, Config{
		OnGone:    func(id uint64) { got <- wire.Gone{ID: id} },
		OnMoved:   func(id uint64, addr netip.AddrPort) { got <- wire.Moved{ID: id, Addr: addr} },
		OnRevoked: func(r *wire.Revoked) { got <- r },
	})
	done := run(t, c)
	g := acceptHello(t, ln)
	g.welcome("100.64.0.7")
	ready(t, c)

	revoked := &wire.Revoked{IDs: []uint64{3, 4}, List: "nlr1.x.y"}
	for _, tt := range []struct {
		name   string
		notice *wire.Message
		want   any // nil: no callback
	}{
		{"gone", &wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: 7}}, wire.Gone{ID: 7}},
		{"a non-fatal error", &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "later"}}, nil},
		{"a late reply", &wire.Message{ID: 99, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeBadToken, Message: "too late"}}, nil},
		{"an unexpected message", &wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{ID: 1}}, nil},
		{"moved", &wire.Message{Type: wire.TypeMoved, Moved: &wire.Moved{ID: 8, Addr: netip.MustParseAddrPort("198.18.3.9:61007")}},
			wire.Moved{ID: 8, Addr: netip.MustParseAddrPort("198.18.3.9:61007")}},
		{"revoked", &wire.Message{Type: wire.TypeRevoked, Revoked: revoked}, revoked},
	} {
		g.send(tt.notice)
		if tt.want == nil {
			continue
		}
		select {
		case v := <-got:
			switch want := tt.want.(type) {
			case *wire.Revoked:
				r, ok := v.(*wire.Revoked)
				if !ok || !slices.Equal(r.IDs, want.IDs) || r.List != want.List {
					t.Fatalf("%s: got %+v, want %+v", tt.name, v, want)
				}
			default:
				if v != tt.want {
					t.Fatalf("%s: got %+v, want %+v", tt.name, v, tt.want)
				}
			}
		case err := <-done:
			t.Fatalf("%s: Run ended: %v", tt.name, err)
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no callback", tt.name)
		}
	}
	if len(got) != 0 {
		t.Fatalf("a callback for a notice that has none: %+v", <-got)
	}
	// Still registered and reading: a request gets its reply.
	reply := make(chan error, 1)
	go func() {
		_, err := c.Request(context.Background(), &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}})
		reply <- err
	}()
	m := g.read()
	g.send(&wire.Message{ID: m.ID, Type: wire.TypeAgents, Agents: &wire.Agents{}})
	if err := <-reply; err != nil {
		t.Fatalf("request after the notices: %v", err)
	}
}

// Requests to the gateway: each reply goes to the request of its ID, in
// whatever order replies come; an error reply is a *wire.Error; a reply to
// no waiting request is dropped; a request the caller gave up on, or one
// pending when the connection drops, returns instead of hanging.
func TestRequests(t *testing.T) {
	ln, pin := fakeGateway(t)
	c := nodeOn(t, ln, pin, Config{})
	run(t, c)
	g := acceptHello(t, ln)
	g.welcome("100.64.0.7")
	ready(t, c)

	type result struct {
		m   *wire.Message
		err error
	}
	request := func(ctx context.Context, agent string) <-chan result {
		r := make(chan result, 1)
		go func() {
			m, err := c.Request(ctx, &wire.Message{Type: wire.TypeConnect, Connect: &wire.Connect{Agent: agent}})
			r <- result{m, err}
		}()
		return r
	}
	wait := func(r <-chan result) result {
		t.Helper()
		select {
		case v := <-r:
			return v
		case <-time.After(10 * time.Second):
			t.Fatal("request did not return")
			return result{}
		}
	}

	// Two at once, answered in reverse order, after a reply to nobody.
	ra, rb := request(context.Background(), "a"), request(context.Background(), "b")
	ids := map[string]uint64{}
	for range 2 {
		m := g.read()
		if m.Type != wire.TypeConnect || m.ID == 0 {
			t.Fatalf("request %+v", m)
		}
		ids[m.Connect.Agent] = m.ID
	}
	if ids["a"] == ids["b"] {
		t.Fatalf("two requests with ID %d", ids["a"])
	}
	g.send(&wire.Message{ID: ids["a"] + ids["b"] + 100, Type: wire.TypeSession, Session: &wire.Session{ID: 666}})
	g.send(&wire.Message{ID: ids["b"], Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnknownAgent, Message: "no agent b"}})
	g.send(&wire.Message{ID: ids["a"], Type: wire.TypeSession, Session: &wire.Session{ID: 11}})
	if v := wait(ra); v.err != nil || v.m.Session.ID != 11 {
		t.Fatalf("request a = %+v, %v; want session 11", v.m, v.err)
	}
	var we *wire.Error
	if v := wait(rb); !errors.As(v.err, &we) || we.Code != wire.CodeUnknownAgent {
		t.Fatalf("request b = %+v, %v; want the gateway's unknown_agent", v.m, v.err)
	}

	// Given up by the caller: returns; its late reply harms nothing.
	ctx, cancel := context.WithCancel(context.Background())
	rc := request(ctx, "c")
	m := g.read()
	cancel()
	if v := wait(rc); !errors.Is(v.err, context.Canceled) {
		t.Fatalf("cancelled request = %v, want context.Canceled", v.err)
	}
	g.send(&wire.Message{ID: m.ID, Type: wire.TypeSession, Session: &wire.Session{ID: 12}})

	// Pending when the gateway goes: ErrNotConnected, not a hang.
	rd := request(context.Background(), "d")
	g.read()
	g.qc.CloseWithError(0, "gateway restarting")
	if v := wait(rd); !errors.Is(v.err, ErrNotConnected) {
		t.Fatalf("request pending at disconnect = %v, want ErrNotConnected", v.err)
	}
}

// The gateway's requests are answered through OnRequest, the reply
// carrying the request's ID whatever OnRequest set.
func TestGatewayRequestsAnswered(t *testing.T) {
	ln, pin := fakeGateway(t)
	c := nodeOn(t, ln, pin, Config{OnRequest: func(_ context.Context, m *wire.Message) *wire.Message {
		if m.Session.ID == 2 {
			return &wire.Message{ID: 999, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeForbidden, Message: "not you"}}
		}
		return &wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{ID: m.Session.ID, Resumed: true}}
	}})
	run(t, c)
	g := acceptHello(t, ln)
	g.welcome("100.64.0.7")
	ready(t, c)
	g.send(&wire.Message{ID: 41, Type: wire.TypeSession, Session: &wire.Session{ID: 1}})
	g.send(&wire.Message{ID: 42, Type: wire.TypeSession, Session: &wire.Session{ID: 2}})
	replies := map[uint64]*wire.Message{}
	for range 2 {
		m := g.read()
		replies[m.ID] = m
	}
	if r := replies[41]; r == nil || r.Type != wire.TypeAccept || r.Accept.ID != 1 || !r.Accept.Resumed {
		t.Fatalf("reply to 41: %+v", r)
	}
	if r := replies[42]; r == nil || r.Type != wire.TypeError || r.Error.Code != wire.CodeForbidden {
		t.Fatalf("reply to 42: %+v", r)
	}
}

// A node stopped while the gateway has not answered its hello stops at
// once and says so to the gateway, as a registered one does, instead of
// waiting out the registration's read deadline.
func TestStopDuringRegistration(t *testing.T) {
	ln, pin := fakeGateway(t)
	c := nodeOn(t, ln, pin, Config{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	g := acceptHello(t, ln) // and say nothing
	cancel()
	select {
	case <-g.qc.Context().Done():
	case <-time.After(20 * time.Second):
		t.Fatal("the node's connection stayed open")
	}
	var ae *quic.ApplicationError
	if err := context.Cause(g.qc.Context()); !errors.As(err, &ae) || ae.ErrorMessage != "node stopping" {
		t.Fatalf("the node closed its connection with %v, want its goodbye (node stopping)", err)
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want context.Canceled", err)
	}
}
