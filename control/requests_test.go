package control

import (
	"context"
	"crypto/tls"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// A gateway (a broken-into one, say) that sends a flood of requests gets
// at most maxRequestHandlers answered at once; the rest are answered
// "unavailable" at once and counted, and the node stays registered.
func TestRequestHandlersBounded(t *testing.T) {
	ln, pin := fakeGateway(t)
	release := make(chan struct{})
	var running, peak atomic.Int64
	c := newTestClient(t, ln.Addr().String())
	c.cfg.Pin = pin
	c.cfg.OnRequest = func(ctx context.Context, m *wire.Message) *wire.Message {
		n := running.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		defer running.Add(-1)
		select {
		case <-release:
		case <-ctx.Done():
		}
		return &wire.Message{Type: wire.TypeAccept, Accept: &wire.Accept{ID: m.Session.ID}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(ctx) }()

	st := acceptNode(t, ctx, ln, runDone)
	ch := wire.NewChannel(st)
	if err := ch.Write(&wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "miranda", Role: "agent"}}); err != nil {
		t.Fatal(err)
	}
	const flood = 200
	for i := range flood {
		id := uint64(i + 1)
		if err := ch.Write(&wire.Message{ID: id, Type: wire.TypeSession, Session: &wire.Session{ID: id}}); err != nil {
			t.Fatal(err)
		}
	}
	busy, accepted, released := 0, 0, false
	for busy+accepted < flood {
		if busy == flood-maxRequestHandlers && !released {
			close(release) // the rest were answered busy: let the handlers finish
			released = true
		}
		st.SetReadDeadline(time.Now().Add(10 * time.Second))
		m, err := wire.ReadMessage(st)
		if err != nil {
			t.Fatalf("after %d busy and %d accepted replies: %v", busy, accepted, err)
		}
		switch {
		case m.Type == wire.TypeError && m.Error.Code == wire.CodeUnavailable:
			busy++
		case m.Type == wire.TypeAccept:
			accepted++
		default:
			t.Fatalf("reply %+v", m)
		}
	}
	if accepted != maxRequestHandlers || peak.Load() != maxRequestHandlers {
		t.Fatalf("%d requests handled (peak %d at once), want %d", accepted, peak.Load(), maxRequestHandlers)
	}
	if got := c.RequestsBusy(); got != flood-maxRequestHandlers {
		t.Fatalf("RequestsBusy %d, want %d", got, flood-maxRequestHandlers)
	}
	select {
	case err := <-runDone:
		t.Fatalf("the node gave up its gateway connection: %v", err)
	default:
	}
	cancel()
	<-runDone
}

// fakeGateway listens on loopback as a gateway does (one incoming stream
// per node) and returns its certificate pin.
func fakeGateway(t *testing.T) (*quic.Listener, string) {
	t.Helper()
	cert := gatewayCert(t)
	return listenAsGateway(t, cert), identity.Fingerprint(cert.Leaf)
}

// gatewayCert is a fresh gateway key's self-signed certificate.
func gatewayCert(t *testing.T) tls.Certificate {
	t.Helper()
	gkey, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := identity.SelfSigned(gkey.Signer(), "gateway")
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// listenAsGateway listens on loopback with cert as a gateway does (one
// incoming stream per node), until the test ends.
func listenAsGateway(t *testing.T, cert tls.Certificate) *quic.Listener {
	t.Helper()
	gcfg := QUICConfig()
	gcfg.MaxIncomingStreams = 1 // as the gateway: the node's control stream
	ln, err := quic.ListenAddr("127.0.0.1:0", identity.ServerTLS(cert, wire.ALPNGateway), gcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// acceptNode accepts a node's connection and reads its hello.
func acceptNode(t *testing.T, ctx context.Context, ln *quic.Listener, runDone <-chan error) *quic.Stream {
	t.Helper()
	qc, err := ln.Accept(ctx)
	if err != nil {
		t.Fatalf("accept: %v (node: %v)", err, <-runDone)
	}
	st, err := qc.AcceptStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := wire.ReadMessage(st); err != nil || m.Type != wire.TypeHello {
		t.Fatalf("first message %+v, %v", m, err)
	}
	return st
}

// A notice the gateway sends a node just before its welcome (the node was
// findable a moment earlier) does not fail the registration.
func TestNoticeBeforeWelcome(t *testing.T) {
	ln, pin := fakeGateway(t)
	c := newTestClient(t, ln.Addr().String())
	c.cfg.Pin = pin
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(ctx) }()
	st := acceptNode(t, ctx, ln, runDone)
	ch := wire.NewChannel(st)
	for _, m := range []*wire.Message{
		{Type: wire.TypeRevoked, Revoked: &wire.Revoked{List: "nlr1.x.y"}},
		{Type: wire.TypeGone, Gone: &wire.Gone{ID: 7}},
		{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "miranda", Role: "agent"}},
	} {
		if err := ch.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	w, err := c.Ready(ctx)
	if err != nil || w.Name != "miranda" {
		t.Fatalf("Ready = %+v, %v", w, err)
	}
	cancel()
	<-runDone
}

// A moved notice reaches OnMoved with its session and address, and the
// node stays registered.
func TestMovedNotice(t *testing.T) {
	ln, pin := fakeGateway(t)
	c := newTestClient(t, ln.Addr().String())
	c.cfg.Pin = pin
	type moved struct {
		id   uint64
		addr netip.AddrPort
	}
	got := make(chan moved, 1)
	c.cfg.OnMoved = func(id uint64, addr netip.AddrPort) { got <- moved{id, addr} }
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	runDone := make(chan error, 1)
	go func() { runDone <- c.Run(ctx) }()
	st := acceptNode(t, ctx, ln, runDone)
	ch := wire.NewChannel(st)
	want := moved{7, netip.MustParseAddrPort("198.18.3.9:61007")}
	for _, m := range []*wire.Message{
		{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: "miranda", Role: "agent"}},
		{Type: wire.TypeMoved, Moved: &wire.Moved{ID: want.id, Addr: want.addr}},
	} {
		if err := ch.Write(m); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case m := <-got:
		if m != want {
			t.Fatalf("OnMoved(%d, %v), want (%d, %v)", m.id, m.addr, want.id, want.addr)
		}
	case err := <-runDone:
		t.Fatalf("node stopped: %v", err)
	case <-ctx.Done():
		t.Fatal("OnMoved not called")
	}
	cancel()
	<-runDone
}
