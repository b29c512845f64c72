package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// Revocation ends a token, or every token of a name issued up to a time.
// Written by `nlvpn token revoke` into revoked.json in the gateway's state;
// a running gateway reads it within revokeCheckEvery and acts on it.
type Revocation struct {
	ID   string `json:"id,omitempty"`   // one token (its jti)
	Role string `json:"role,omitempty"` // with Name: every token of that
	Name string `json:"name,omitempty"` // node issued at or before At
	At   int64  `json:"at"`             // Unix seconds
}

// revokeCheckEvery is how often a running gateway looks at revoked.json:
// a revocation must end live sessions within 2 s.
const revokeCheckEvery = 500 * time.Millisecond

// maxRevocations bounds the file a gateway reads.
const maxRevocations = 100000

func revokedPath(dir string) string { return filepath.Join(dir, "revoked.json") }

// Matches reports whether r revokes the token with claims c.
func (r Revocation) Matches(c *token.Claims) bool {
	if r.ID != "" {
		return c.ID == r.ID
	}
	return r.Name == c.Name && r.Role == c.Role && c.Issued <= r.At
}

// LoadRevocations reads the gateway state's revocations (none without the
// file).
func LoadRevocations(dir string) ([]Revocation, error) {
	b, err := os.ReadFile(revokedPath(dir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	rs, err := ParseRevocations(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", revokedPath(dir), err)
	}
	return rs, nil
}

// ParseRevocations reads the revocations file's text: a JSON list, at most
// maxRevocations long, each entry naming a token ID or a role and name.
func ParseRevocations(b []byte) ([]Revocation, error) {
	var rs []Revocation
	if err := json.Unmarshal(b, &rs); err != nil {
		return nil, err
	}
	if len(rs) > maxRevocations {
		return nil, fmt.Errorf("more than %d revocations", maxRevocations)
	}
	for i, r := range rs {
		if r.ID == "" && (r.Name == "" || (r.Role != token.RoleClient && r.Role != token.RoleAgent)) {
			return nil, fmt.Errorf("revocation %d names neither a token ID nor a client or agent", i+1)
		}
	}
	return rs, nil
}

// AddRevocation appends r to the gateway state's revocations.
func AddRevocation(dir string, r Revocation) error {
	rs, err := LoadRevocations(dir)
	if err != nil {
		return err
	}
	if len(rs) >= maxRevocations {
		return fmt.Errorf("%d revocations already; issue a new authority key instead", maxRevocations)
	}
	return writeJSON(revokedPath(dir), append(rs, r))
}

// revokedBy returns the revocation that ends claims, if any.
func (g *Gateway) revokedBy(c *token.Claims) (Revocation, bool) {
	rs := g.revoked.Load()
	if rs == nil {
		return Revocation{}, false
	}
	for _, r := range *rs {
		if r.Matches(c) {
			return r, true
		}
	}
	return Revocation{}, false
}

// watchRevocations reloads revoked.json when it changes and ends what it
// revokes, until ctx ends.
func (g *Gateway) watchRevocations(ctx context.Context) {
	var last os.FileInfo
	t := time.NewTicker(revokeCheckEvery)
	defer t.Stop()
	for {
		fi, err := os.Stat(revokedPath(g.cfg.State.Dir))
		if err == nil && (last == nil || !fi.ModTime().Equal(last.ModTime()) || fi.Size() != last.Size()) {
			if rs, err := LoadRevocations(g.cfg.State.Dir); err != nil {
				g.log.Error("revocations not read; the last ones stay in force", "err", err)
			} else {
				g.revoked.Store(&rs)
				g.enforceRevocations()
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

func revokedMessage(c *token.Claims, r Revocation) string {
	return fmt.Sprintf("the token for %s %q was revoked at %s; ask for a new one", c.Role, c.Name, time.Unix(r.At, 0).UTC().Format(time.RFC3339))
}
