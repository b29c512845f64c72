package agent

import (
	"net/netip"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// connected makes session id of the client at overlay live, as
// serveSession does once the client's end-to-end connection is up.
func (b *offerBench) connected(t *testing.T, id uint64, overlay string) *session.Session {
	t.Helper()
	a := b.a
	s := liveSession(t)
	s.ID = id
	a.mu.Lock()
	defer a.mu.Unlock()
	o := a.offers[id]
	if o == nil {
		t.Fatalf("no offer for session %d", id)
	}
	a.live[id] = true
	a.byClient[netip.MustParseAddr(overlay)] = &clientState{offer: o, sess: s}
	return s
}

func ended(s *session.Session) bool {
	select {
	case <-s.Conn.Context().Done():
		return true
	case <-time.After(5 * time.Second):
		return false
	}
}

// A client that asks again (a gateway restart, the client's reconnect)
// resumes only a session the agent holds live; a new session of the same
// client does not cost it the live one, which it may still resume.
func TestOfferResume(t *testing.T) {
	b := newOfferBench(t)
	a := b.a
	alice, aliceCred := b.client(t, token.Claims{Name: "alice", Agents: []string{"miranda"}})

	for _, tt := range []struct {
		name    string
		id      uint64
		resumed bool
	}{
		{"a new session", 1, false},
		{"the same offer again, not connected yet", 1, false},
	} {
		r := b.offer(tt.id, alice, aliceCred, "100.64.0.3")
		wantCode(t, tt.name, r, "")
		if r.Accept.Resumed != tt.resumed || r.Accept.ID != tt.id {
			t.Fatalf("%s: accept %+v, want session %d resumed %v", tt.name, r.Accept, tt.id, tt.resumed)
		}
	}
	s1 := b.connected(t, 1, "100.64.0.3")
	resume := func(what string, id uint64, want bool) {
		t.Helper()
		r := b.offer(id, alice, aliceCred, "100.64.0.3")
		wantCode(t, what, r, "")
		if r.Accept.Resumed != want {
			t.Fatalf("%s: resumed %v, want %v", what, r.Accept.Resumed, want)
		}
	}
	resume("the live session after a gateway restart", 1, true)
	resume("another session of the same client", 2, false)
	if a.offers[1] == nil || a.offers[2] == nil {
		t.Fatalf("offers %v: the live session's and the new one's should both be kept", keys(a.offers))
	}
	resume("the live one again after that", 1, true)
	if a.offers[1] == nil || a.offers[2] != nil {
		t.Fatalf("offers %v: the live session's kept, the other pending one replaced", keys(a.offers))
	}
	if !s1.Alive() {
		t.Fatal("an offer ended the live session")
	}
}

// Revocation ends live sessions, not only offers: the gateway's word
// (Revoked.IDs) ends the sessions it names and forgets their offers so
// they cannot be resumed; the authority's signed list ends the sessions
// of the clients it revokes. Other clients' sessions go on.
func TestRevocationEndsSessions(t *testing.T) {
	b := newOfferBench(t)
	a := b.a
	alice, aliceCred := b.client(t, token.Claims{Name: "alice", Agents: []string{"miranda"}})
	bob, bobCred := b.client(t, token.Claims{Name: "bob", Agents: []string{"miranda"}})
	carol, carolCred := b.client(t, token.Claims{Name: "carol", Agents: []string{"miranda"}})
	for _, c := range []struct {
		id      uint64
		key     string
		overlay string
	}{{1, "alice", "100.64.0.3"}, {2, "bob", "100.64.0.4"}, {3, "carol", "100.64.0.5"}} {
		key, cred := alice, aliceCred
		switch c.key {
		case "bob":
			key, cred = bob, bobCred
		case "carol":
			key, cred = carol, carolCred
		}
		wantCode(t, c.key, b.offer(c.id, key, cred, c.overlay), "")
	}
	sa, sb, sc := b.connected(t, 1, "100.64.0.3"), b.connected(t, 2, "100.64.0.4"), b.connected(t, 3, "100.64.0.5")

	// The gateway's word, for alice's session.
	a.endRevoked(&wire.Revoked{IDs: []uint64{1}})
	if !ended(sa) {
		t.Fatal("the revoked client's live session goes on")
	}
	if a.offers[1] != nil {
		t.Fatal("the revoked session's offer is kept: it could be resumed")
	}

	// The authority's list, carried by the gateway, revokes bob.
	list, err := token.Revocations{Serial: 1, List: []token.Revocation{{Role: token.RoleClient, Name: "bob", At: time.Now().Unix()}}}.Sign(b.authority)
	if err != nil {
		t.Fatal(err)
	}
	a.endRevoked(&wire.Revoked{List: list})
	if !ended(sb) {
		t.Fatal("the live session of a client the authority revoked goes on")
	}
	if !sc.Alive() || a.offers[3] == nil {
		t.Fatal("another client's session was ended")
	}
	// And bob cannot come back through a new offer.
	wantCode(t, "bob again", b.offer(4, bob, bobCred, "100.64.0.4"), wire.CodeRevoked)
}
