package agent

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func mustKey(t *testing.T) *identity.Key {
	t.Helper()
	k, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// clientCredential issues a client credential bound to a fresh key.
func clientCredential(t *testing.T, auth *identity.Key, name string) (string, *identity.Key, *token.Claims) {
	t.Helper()
	s, err := token.Issue(auth, token.Claims{Role: token.RoleClient, Name: name, Agents: []string{"miranda"}, Expires: time.Now().Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := token.ParseToken(s)
	if err != nil {
		t.Fatal(err)
	}
	key := mustKey(t)
	return tok.Enroll(key.Public()), key, tok.Claims
}

// The agent puts in force only a revocation list its authority signed and
// newer than the one it holds, drops the revoked clients' pending offers,
// and refuses their new offers itself, whatever the gateway says.
func TestAgentEnforcesSignedRevocations(t *testing.T) {
	auth := mustKey(t)
	a := &Agent{authority: auth.Public(), name: "miranda", log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		offers: map[uint64]*offer{}, byClient: map[netip.Addr]*clientState{}, live: map[uint64]bool{}}
	aliceCred, aliceKey, alice := clientCredential(t, auth, "alice")
	_, _, bob := clientCredential(t, auth, "bob")
	a.offers[1] = &offer{Session: &wire.Session{ID: 1}, client: alice}
	a.offers[2] = &offer{Session: &wire.Session{ID: 2}, client: bob}

	sign := func(k *identity.Key, serial uint64, list ...token.Revocation) string {
		s, err := token.Revocations{Serial: serial, List: list}.Sign(k)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	revokeAlice := token.Revocation{Role: token.RoleClient, Name: "alice", At: time.Now().Unix()}
	a.takeRevocations(sign(mustKey(t), 5, revokeAlice)) // forged: another key
	if a.revoked.Load() != nil || a.revocationsRefused.Load() != 1 || a.offers[1] == nil {
		t.Fatal("a list signed by another key was taken")
	}
	a.takeRevocations(sign(auth, 2, revokeAlice))
	if rs := a.revoked.Load(); rs == nil || rs.Serial != 2 {
		t.Fatalf("list in force: %+v", rs)
	}
	if a.offers[1] != nil || a.offers[2] == nil {
		t.Fatal("alice's pending offer kept, or bob's dropped")
	}
	a.takeRevocations(sign(auth, 1)) // older: a gateway bringing alice back
	if rs := a.revoked.Load(); rs.Serial != 2 {
		t.Fatalf("an older list replaced the one in force: %+v", rs)
	}

	r := a.onRequest(t.Context(), &wire.Message{Type: wire.TypeSession, Session: &wire.Session{
		ID: 3, PeerName: "alice", PeerKey: aliceKey.Public().String(), PeerCredential: aliceCred,
		PeerAddr: netip.MustParseAddr("100.64.0.9"), Mode: wire.ModeRelay}})
	if r.Type != wire.TypeError || r.Error.Code != wire.CodeRevoked {
		t.Fatalf("offer for revoked alice answered %+v", r)
	}
	if a.offers[3] != nil {
		t.Fatal("the revoked client's offer was recorded")
	}
}
