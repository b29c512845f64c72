//go:build nlvpn_misbehave

package gateway

import (
	"os"
	"time"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// A compromised gateway, for the e2e tests only (never in a release
// build): NLVPN_MISBEHAVE says what it does with the keys it holds, which
// are its own (gateway.key) and whatever credentials nodes showed it.
//
//   - client-key: offers agents a client that is the gateway itself, with
//     a credential it signed for its own key.
//   - agent-key: tells clients that the agent's key is its own, with a
//     credential it signed for it, to put itself in the middle.
//   - replay-credential: offers agents its own key with the real client's
//     credential (a credential is not a secret; the binding is).
func init() {
	mode := os.Getenv("NLVPN_MISBEHAVE")
	if mode == "" {
		return
	}
	misbehave = func(g *Gateway, to string, s *wire.Session) {
		own := g.cfg.State.Key
		forge := func(role, name string) string {
			c := token.Claims{Role: role, Name: name, Agents: []string{"*"}, Expires: time.Now().Add(time.Hour).Unix()}
			if role == token.RoleAgent {
				c.Agents = nil
			}
			t, err := token.Issue(own, c)
			if err != nil {
				panic(err)
			}
			tok, _ := token.ParseToken(t)
			return tok.Enroll(own.Public())
		}
		switch {
		case mode == "client-key" && to == token.RoleAgent:
			s.PeerKey, s.PeerCredential = own.Public().String(), forge(token.RoleClient, s.PeerName)
		case mode == "replay-credential" && to == token.RoleAgent:
			s.PeerKey = own.Public().String()
		case mode == "agent-key" && to == token.RoleClient:
			s.PeerKey, s.PeerCredential = own.Public().String(), forge(token.RoleAgent, s.PeerName)
		}
		g.log.Warn("misbehaving (test build)", "mode", mode, "to", to, "peer", s.PeerName, "key", identity.PublicKey(own.Public()).String())
	}
}
