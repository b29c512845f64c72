package gateway

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/identity"
)

// maxEnrollments bounds the tokens the gateway remembers keys for. Only a
// token the gateway signed can add one, and entries leave when their token
// expires; the bound is for a gateway that issued a very large number.
const maxEnrollments = 100000

// enrollments remembers which node keys have used each token, so that a
// token enrolls the machines it was issued for (Claims.Uses, default one)
// and no other: a copied token is refused on a second machine, and with it
// the agent name or client address it carries, also while the first
// machine is offline. Kept in enrollments.json, across restarts.
type enrollments struct {
	path string
	mu   sync.Mutex
	m    map[string]*enrollment // by token ID
}

type enrollment struct {
	Expires int64    `json:"expires"` // the token's, for pruning
	Keys    []string `json:"keys"`
}

// errTokenUsed is the refusal of a token that enrolled its machines already.
var errTokenUsed = errors.New("token used up")

func openEnrollments(dir string) (*enrollments, error) {
	e := &enrollments{path: filepath.Join(dir, "enrollments.json"), m: make(map[string]*enrollment)}
	if err := readJSON(e.path, &e.m); err != nil {
		return nil, err
	}
	return e, nil
}

// use records that key used token id (valid until expires, allowing uses
// machines). It reports errTokenUsed if the token already enrolled as many
// other keys as it may.
func (e *enrollments) use(id string, expires int64, uses int, key identity.PublicKey) error {
	if uses < 1 {
		uses = 1
	}
	k := key.String()
	e.mu.Lock()
	defer e.mu.Unlock()
	en := e.m[id]
	if en != nil {
		for _, have := range en.Keys {
			if have == k {
				return nil
			}
		}
		if len(en.Keys) >= uses {
			return errTokenUsed
		}
	}
	e.prune(time.Now())
	if en == nil {
		if len(e.m) >= maxEnrollments {
			return fmt.Errorf("the gateway remembers %d tokens already; refusing new ones until some expire", maxEnrollments)
		}
		en = &enrollment{Expires: expires}
		e.m[id] = en
	}
	en.Keys = append(en.Keys, k)
	if err := e.save(); err != nil {
		// Not remembered: refuse rather than let the token enroll again
		// after a restart.
		en.Keys = en.Keys[:len(en.Keys)-1]
		return fmt.Errorf("cannot record the token's use: %w", err)
	}
	return nil
}

// prune forgets tokens that have expired (they are refused anyway).
func (e *enrollments) prune(now time.Time) {
	for id, en := range e.m {
		if en.Expires < now.Unix() {
			delete(e.m, id)
		}
	}
}

func (e *enrollments) save() error { return writeJSON(e.path, e.m) }
