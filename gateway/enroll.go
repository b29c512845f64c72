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
	file    *stateFile
	mu      sync.Mutex
	m       map[string]*enrollment // by token ID
	changes uint64                 // changes to m, for file
}

type enrollment struct {
	Expires int64    `json:"expires"` // the token's, for pruning
	Keys    []string `json:"keys"`
}

// errTokenUsed is the refusal of a token that enrolled its machines already.
var errTokenUsed = errors.New("token used up")

func openEnrollments(dir string) (*enrollments, error) {
	e := &enrollments{m: make(map[string]*enrollment)}
	e.file = &stateFile{path: filepath.Join(dir, "enrollments.json"), snapshot: func() ([]byte, uint64, error) {
		e.mu.Lock()
		defer e.mu.Unlock()
		b, err := marshalState(e.m)
		return b, e.changes, err
	}}
	if err := readJSON(e.file.path, &e.m); err != nil {
		return nil, err
	}
	return e, nil
}

// use records that key used token id (valid until expires, allowing uses
// machines), and returns once that is on disk. It reports errTokenUsed if
// the token already enrolled as many other keys as it may.
func (e *enrollments) use(id string, expires int64, uses int, key identity.PublicKey) error {
	if uses < 1 {
		uses = 1
	}
	k := key.String()
	e.mu.Lock()
	en := e.m[id]
	if en != nil {
		for _, have := range en.Keys {
			if have == k {
				// Enrolled, or being enrolled by a connection of the same
				// machine: on disk before either goes on.
				seq := e.changes
				e.mu.Unlock()
				return e.saved(seq)
			}
		}
		if len(en.Keys) >= uses {
			e.mu.Unlock()
			return errTokenUsed
		}
	}
	e.prune(time.Now())
	if en == nil {
		if len(e.m) >= maxEnrollments {
			e.mu.Unlock()
			return fmt.Errorf("the gateway remembers %d tokens already; refusing new ones until some expire", maxEnrollments)
		}
		en = &enrollment{Expires: expires}
		e.m[id] = en
	}
	en.Keys = append(en.Keys, k)
	e.changes++
	seq := e.changes
	e.mu.Unlock()
	// Not remembered, the key is refused, and stays in memory only as the
	// token's: a retry waits for a write that succeeds (saved), so the
	// token cannot enroll another machine after a restart.
	return e.saved(seq)
}

func (e *enrollments) saved(seq uint64) error {
	if err := e.file.save(seq); err != nil {
		return fmt.Errorf("cannot record the token's use: %w", err)
	}
	return nil
}

// prune forgets tokens that have expired (they are refused anyway).
func (e *enrollments) prune(now time.Time) {
	for id, en := range e.m {
		if en.Expires < now.Unix() {
			delete(e.m, id)
			e.changes++
		}
	}
}
