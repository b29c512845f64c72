package agent

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/netip"
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

// offerBench is an agent as far as session offers go: its authority, its
// own key and name, and an underlay that is open but never connects.
type offerBench struct {
	a         *Agent
	authority *identity.Key
}

func newOfferBench(t *testing.T) *offerBench {
	t.Helper()
	authority, _ := identity.Generate()
	key, _ := identity.Generate()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	u, err := underlay.Open(control.Config{Gateway: "127.0.0.1:9", Key: key, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a := &Agent{cfg: Config{Key: key}, log: log, authority: authority.Public(), name: "miranda", u: u, ctx: ctx,
		offers: make(map[uint64]*offer), byClient: make(map[netip.Addr]*clientState),
		punches: make(map[uint64]*underlay.Direct), live: make(map[uint64]bool)}
	return &offerBench{a: a, authority: authority}
}

// client makes a client key and its credential from the bench's authority.
func (b *offerBench) client(t *testing.T, c token.Claims) (*identity.Key, string) {
	t.Helper()
	key, _ := identity.Generate()
	c.Role = token.RoleClient
	if c.Expires == 0 {
		c.Expires = time.Now().Add(time.Hour).Unix()
	}
	tok, err := token.Issue(b.authority, c)
	if err != nil {
		t.Fatal(err)
	}
	pt, err := token.ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	return key, pt.Enroll(key.Public())
}

func (b *offerBench) offer(id uint64, key *identity.Key, cred string, overlay string) *wire.Message {
	return b.a.onRequest(context.Background(), &wire.Message{Type: wire.TypeSession, Session: &wire.Session{
		ID: id, PeerName: "whatever the gateway says", PeerCredential: cred, PeerKey: key.Public().String(),
		PeerAddr: netip.MustParseAddr(overlay), Mode: wire.ModeRelay}})
}

func wantCode(t *testing.T, what string, m *wire.Message, code string) {
	t.Helper()
	switch {
	case code == "" && m.Type != wire.TypeAccept:
		t.Fatalf("%s: %s %+v, want an accept", what, m.Type, m.Error)
	case code != "" && (m.Type != wire.TypeError || m.Error.Code != code):
		t.Fatalf("%s: %s %+v, want error %s", what, m.Type, m.Error, code)
	}
}

// The agent's offer state machine: who is admitted, one pending offer per
// client key, session IDs and overlay addresses that cannot be taken over,
// resumption, and the bound on pending offers.
func TestSessionOffers(t *testing.T) {
	b := newOfferBench(t)
	a := b.a
	alice, aliceCred := b.client(t, token.Claims{Name: "alice", Agents: []string{"miranda"}})

	wantCode(t, "a valid offer", b.offer(1, alice, aliceCred, "100.64.0.3"), "")
	if a.offers[1] == nil || a.offers[1].client.Name != "alice" || a.offers[1].PeerName != "alice" {
		t.Fatalf("offer 1 = %+v: the name must come from the credential, not the gateway", a.offers[1])
	}

	// Credentials the agent does not take, whatever the gateway says.
	other, _ := identity.Generate()
	otherCred := func() string {
		k, _ := identity.Generate()
		tok, _ := token.Issue(other, token.Claims{Role: token.RoleClient, Name: "eve", Agents: []string{"*"}, Expires: time.Now().Add(time.Hour).Unix()})
		pt, _ := token.ParseToken(tok)
		return pt.Enroll(k.Public())
	}()
	bob, bobCred := b.client(t, token.Claims{Name: "bob", Agents: []string{"prospero"}})
	for _, tt := range []struct {
		what string
		key  *identity.Key
		cred string
	}{
		{"another authority's client", alice, otherCred},
		{"a client not allowed this agent", bob, bobCred},
		{"alice's credential offered with another key (the gateway's)", bob, aliceCred},
	} {
		wantCode(t, tt.what, b.offer(100, tt.key, tt.cred, "100.64.0.9"), wire.CodeForbidden)
	}
	if a.offers[100] != nil {
		t.Fatal("a refused offer was kept")
	}

	// The gateway cannot name an alias of a client's address (its IPv6
	// overlay address, an IPv4-mapped form) or one outside the overlay.
	mallory, malloryCred := b.client(t, token.Claims{Name: "mallory", Agents: []string{"*"}})
	for _, addr := range []string{"fd6e:6c76:706e::6440:3", "::ffff:100.64.0.3", "192.168.77.10", "fd00::1"} {
		wantCode(t, "mallory offered as "+addr, b.offer(200, mallory, malloryCred, addr), wire.CodeBadRequest)
	}
	if a.offers[200] != nil || a.denied.credential.Load() < 4 {
		t.Fatalf("alias offers kept or not counted (denied %d)", a.denied.credential.Load())
	}

	// A session ID is one client key's: bob (allowed now) cannot take 1.
	bob, bobCred = b.client(t, token.Claims{Name: "bob", Agents: []string{"*"}})
	wantCode(t, "bob naming alice's session ID", b.offer(1, bob, bobCred, "100.64.0.4"), wire.CodeBadRequest)

	// One pending offer per client key: alice's next offer replaces 1.
	wantCode(t, "alice again", b.offer(2, alice, aliceCred, "100.64.0.3"), "")
	if a.offers[1] != nil || a.offers[2] == nil {
		t.Fatalf("pending offers %v: alice's older one should be gone", keys(a.offers))
	}

	// A live session keeps its overlay address from other keys, and an
	// offer for a live session says it resumes.
	a.live[2] = true
	a.byClient[netip.MustParseAddr("100.64.0.3")] = &clientState{offer: a.offers[2], sess: liveSession(t)}
	wantCode(t, "bob on alice's live address", b.offer(3, bob, bobCred, "100.64.0.3"), wire.CodeUnavailable)
	r := b.offer(2, alice, aliceCred, "100.64.0.3")
	wantCode(t, "alice resuming", r, "")
	if !r.Accept.Resumed {
		t.Fatal("an offer for a live session should say it resumes")
	}

	// Pending offers are bounded in total, and a hit bound is counted.
	for i := range maxPendingOffers + 5 {
		k, cred := b.client(t, token.Claims{Name: "c", Agents: []string{"*"}})
		r := b.offer(uint64(1000+i), k, cred, "100.64.1.1")
		if i < maxPendingOffers-1 && r.Type != wire.TypeAccept {
			t.Fatalf("offer %d refused early: %+v", i, r.Error)
		}
	}
	if n := a.pendingOffers(); n > maxPendingOffers {
		t.Fatalf("%d pending offers, bound %d", n, maxPendingOffers)
	}
	if got := a.denied.offersFull.Load(); got == 0 {
		t.Fatal("offers over the bound were not counted")
	}

	// A stopping agent takes nothing new.
	a.stopping.Store(true)
	wantCode(t, "an offer while stopping", b.offer(4, alice, aliceCred, "100.64.0.3"), wire.CodeUnavailable)
}

func keys[V any](m map[uint64]V) []uint64 {
	var ks []uint64
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

// liveSession is a session on a real QUIC connection over loopback, alive
// until the test ends.
func liveSession(t *testing.T) *session.Session {
	t.Helper()
	k, _ := identity.Generate()
	cert, err := k.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := quic.ListenAddr("127.0.0.1:0", identity.ServerTLS(cert, "test"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			if _, err := ln.Accept(context.Background()); err != nil {
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qc, err := quic.DialAddr(ctx, ln.Addr().String(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"test"}, Certificates: []tls.Certificate{cert}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qc.CloseWithError(0, "") })
	return session.New(1, qc, slog.New(slog.NewTextHandler(io.Discard, nil)))
}
