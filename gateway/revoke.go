package gateway

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// Revocation ends a token, or every token of a name issued up to a time.
type Revocation = token.Revocation

// The authority's signed revocation list (token.Revocations), written by
// `nlvpn token revoke` into the gateway's state, or copied there from the
// authority's machine; a running gateway reads it within revokeCheckEvery,
// acts on it and passes it to the agents, which check the signature and
// enforce it themselves.
const revocationsFile = "revocations"

// legacyRevocationsFile is the unsigned list of earlier development builds.
const legacyRevocationsFile = "revoked.json"

// revokeCheckEvery is how often a running gateway looks at the list: a
// revocation must end live sessions within 2 s.
const revokeCheckEvery = 500 * time.Millisecond

// RevocationsPath is where the signed list lies in a state (or authority)
// directory.
func RevocationsPath(dir string) string { return filepath.Join(dir, revocationsFile) }

// revocations is the list in force and its signed form.
type revocations struct {
	list   *token.Revocations // nil: none
	signed string
}

// LoadRevocations reads the signed revocation list in dir and checks that
// authority signed it (none without the file).
func LoadRevocations(dir string, authority identity.PublicKey) (*token.Revocations, string, error) {
	if _, err := os.Stat(filepath.Join(dir, legacyRevocationsFile)); err == nil {
		return nil, "", fmt.Errorf("%s is an unsigned revocation list from an earlier build; revoke its entries again with nlvpn token revoke (the list is signed by the authority now), then delete it", filepath.Join(dir, legacyRevocationsFile))
	}
	b, err := os.ReadFile(RevocationsPath(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", nil
	}
	if err != nil {
		return nil, "", err
	}
	rs, err := token.ParseRevocations(string(b), authority)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", RevocationsPath(dir), err)
	}
	return rs, strings.TrimSpace(string(b)), nil
}

// AddRevocation adds r to the signed list in dir (the authority's
// directory, or a gateway state that holds the authority key), signing the
// new list with authority under the next serial.
func AddRevocation(dir string, authority *identity.Key, r Revocation) error {
	rs, _, err := LoadRevocations(dir, authority.Public())
	if err != nil {
		return err
	}
	next := token.Revocations{}
	if rs != nil {
		next = *rs
	}
	next.Serial++
	next.List = append(next.List, r)
	signed, err := next.Sign(authority)
	if err != nil {
		return err
	}
	return identity.WriteFileAtomic(RevocationsPath(dir), []byte(signed+"\n"), 0o644)
}

// revokedBy returns the revocation that ends claims, if any.
func (g *Gateway) revokedBy(c *token.Claims) (Revocation, bool) {
	return g.revoked.Load().list.Match(c)
}

// watchRevocations reloads the revocation list when it changes, ends what
// it revokes and passes it to the agents, until ctx ends. A list that does
// not verify, or is older than the one in force, is refused and the one in
// force stays.
func (g *Gateway) watchRevocations(ctx context.Context) {
	var last os.FileInfo
	t := time.NewTicker(revokeCheckEvery)
	defer t.Stop()
	for {
		fi, err := os.Stat(RevocationsPath(g.cfg.State.Dir))
		if err == nil && (last == nil || !fi.ModTime().Equal(last.ModTime()) || fi.Size() != last.Size()) {
			rs, signed, err := LoadRevocations(g.cfg.State.Dir, g.cfg.Authority)
			switch {
			case err != nil:
				g.log.Error("revocations not read; the last ones stay in force", "err", err)
			case rs != nil && g.applyRevocations(rs, signed, "file"):
				if c := g.clusterNow(); c != nil {
					if err := c.PublishRevocations(ctx, signed); err != nil {
						g.log.Warn("revocation list not put into the cluster", "err", err)
					}
				}
			}
			last = fi
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// applyRevocations puts the verified list rs (signed) in force if it is
// newer than the one in force: ends what it revokes and passes it to the
// agents. It reports whether it did. from says where the list came from
// (file, cluster): for the log, and a list from the cluster is saved.
func (g *Gateway) applyRevocations(rs *token.Revocations, signed, from string) bool {
	g.revMu.Lock()
	defer g.revMu.Unlock()
	cur := g.revoked.Load()
	if cur.list != nil && rs.Serial <= cur.list.Serial {
		if rs.Serial < cur.list.Serial && from == "file" {
			g.log.Error("revocation list older than the one in force; ignored", "serial", rs.Serial, "in_force", cur.list.Serial)
		}
		return false
	}
	g.revoked.Store(&revocations{list: rs, signed: signed})
	g.log.Info("revocation list in force", "serial", rs.Serial, "entries", len(rs.List), "from", from)
	if from == "cluster" {
		// Saved before it is enforced: what this gateway acts on is in its
		// state directory should it restart (a list from the file is there).
		if err := identity.WriteFileAtomic(RevocationsPath(g.cfg.State.Dir), []byte(signed+"\n"), 0o600); err != nil {
			g.log.Error("revocation list from the cluster not saved", "err", err)
		}
	}
	g.enforceRevocations()
	g.sendRevocations(signed)
	return true
}

// enforceRevocations disconnects every connected node whose token is
// revoked; for a client it first tells the agents of its sessions to end
// them (on the direct path they do not pass the gateway).
func (g *Gateway) enforceRevocations() {
	g.mu.Lock()
	hit := map[*node]Revocation{} // a node may hold several addresses
	for _, n := range g.live {
		if r, ok := g.revokedBy(n.claims); ok && n.qc.Context().Err() == nil {
			hit[n] = r
		}
	}
	g.mu.Unlock()
	for n, r := range hit {
		g.log.Info("token revoked; disconnecting the node", "role", n.role, "name", n.name)
		if n.role == token.RoleClient {
			n.rmu.Lock()
			routes := make(map[string]uint64, len(n.routes))
			for a, id := range n.routes {
				routes[a] = id
			}
			n.rmu.Unlock()
			for agentName, id := range routes {
				g.mu.Lock()
				a := g.agents[agentName]
				g.mu.Unlock()
				if a != nil {
					a.write(&wire.Message{Type: wire.TypeRevoked, Revoked: &wire.Revoked{IDs: []uint64{id}}})
				}
			}
		}
		n.write(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeRevoked, Message: revokedMessage(n.claims, r)}})
		n.qc.CloseWithError(0, "token revoked")
	}
}

// revocations is the signed list for n's welcome: agents get it.
func (n *node) revocations(g *Gateway) string {
	if n.role != token.RoleAgent {
		return ""
	}
	return g.revoked.Load().signed
}

// sendRevocations passes the signed list to every agent: they check and
// enforce it themselves, on the direct path too.
func (g *Gateway) sendRevocations(signed string) {
	g.mu.Lock()
	agents := make([]*node, 0, len(g.agents))
	for _, a := range g.agents {
		agents = append(agents, a)
	}
	g.mu.Unlock()
	for _, a := range agents {
		a.write(&wire.Message{Type: wire.TypeRevoked, Revoked: &wire.Revoked{List: signed}})
	}
}

func revokedMessage(c *token.Claims, r Revocation) string {
	return fmt.Sprintf("the token for %s %q was revoked at %s; ask for a new one", c.Role, c.Name, time.Unix(r.At, 0).UTC().Format(time.RFC3339))
}
