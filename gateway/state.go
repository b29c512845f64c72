package gateway

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// AuthorityFile is the authority key's file name: in the gateway's state
// directory for a quick start, or in a directory on an admin machine.
const AuthorityFile = "authority.key"

// LoadAuthority loads the authority key in dir, or makes one (0600) when
// there is none yet.
func LoadAuthority(dir string) (*identity.Key, error) {
	return identity.LoadOrCreate(filepath.Join(dir, AuthorityFile))
}

// ReadInfoFile reads the gateway.json in dir that a gateway wrote at its
// start; ok is false when there is none (the gateway never ran there, or
// dir is an admin machine's authority directory).
func ReadInfoFile(dir string) (i Info, ok bool, err error) {
	path := filepath.Join(dir, "gateway.json")
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return Info{}, false, nil
	}
	if err := readJSON(path, &i); err != nil {
		return Info{}, false, err
	}
	return i, true, nil
}

// State is what a gateway keeps in its state directory: its key (for its
// TLS certificate, by default), its public identity
// (pin and address, for `nlvpn token`), and the overlay addresses it gave
// out, so a node keeps its address across restarts.
type State struct {
	Dir string
	Key *identity.Key
}

// Info is the public part, written at every gateway start.
type Info struct {
	Pin        string `json:"pin"`
	PublicAddr string `json:"public_addr,omitempty"`
	// ACMEDomain says the certificate comes from an ACME CA for this
	// name: tokens carry no pin (Pin is empty).
	ACMEDomain string `json:"acme_domain,omitempty"`
}

// OpenState loads or creates the state in dir.
func OpenState(dir string) (*State, error) {
	if dir == "" {
		return nil, errors.New("no state directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	key, err := identity.LoadOrCreate(filepath.Join(dir, "gateway.key"))
	if err != nil {
		return nil, err
	}
	return &State{Dir: dir, Key: key}, nil
}

// SelfSignedCert is the gateway's default certificate. It is made anew from
// the key at each start; the pin covers the key, so it stays the same.
func (s *State) SelfSignedCert() (tls.Certificate, error) {
	return identity.SelfSigned(s.Key.Signer(), "nlvpn-gateway")
}

// WriteInfo records the gateway's pin and public address.
func (s *State) WriteInfo(i Info) error {
	return writeJSON(filepath.Join(s.Dir, "gateway.json"), i)
}

// writeJSON writes v to path as indented JSON, atomically, readable only by
// the gateway's user: every file of the gateway's state.
func writeJSON(path string, v any) error {
	b, err := marshalState(v)
	if err != nil {
		return err
	}
	return identity.WriteFileAtomic(path, b, 0o600)
}

// readJSON reads path into v; without the file v stays as it is.
func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// ReadInfo reads what WriteInfo wrote. Without it (the gateway never ran),
// the pin of the default self-signed certificate is returned.
func (s *State) ReadInfo() (Info, error) {
	i, ok, err := ReadInfoFile(s.Dir)
	if err != nil || ok {
		return i, err
	}
	cert, err := s.SelfSignedCert()
	if err != nil {
		return Info{}, err
	}
	return Info{Pin: identity.Fingerprint(cert.Leaf)}, nil
}

// stateFile is one JSON file of the gateway's state, written whole
// (writeJSON) for a store whose callers change it under the store's lock and
// may not go on until their change is on disk. Overlapping saves share
// writes (group commit): while one write runs the others wait, and the next
// write, of a snapshot taken after all their changes, serves them all. Nodes
// enrolling at once so cost a few writes of the file, not one each: the
// file grows with the nodes, and a write per change made a ramp of first
// registrations quadratic (BenchmarkGatewayIdleNodes fell to 10 a second at
// 4,500 nodes).
type stateFile struct {
	path string
	// snapshot marshals the store, taking its lock, and returns the
	// store's change count that the bytes hold.
	snapshot func() ([]byte, uint64, error)

	mu      sync.Mutex // held while writing
	written uint64     // the change count on disk
}

// save returns once the file holds change seq of the store (or a later
// one), writing it if no write did yet.
func (f *stateFile) save(seq uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.written >= seq {
		return nil
	}
	b, v, err := f.snapshot()
	if err != nil {
		return err
	}
	if err := identity.WriteFileAtomic(f.path, b, 0o600); err != nil {
		return err
	}
	f.written = v
	return nil
}

// marshalState is how writeJSON lays out a state file.
func marshalState(v any) ([]byte, error) {
	b, err := json.MarshalIndent(v, "", "  ")
	return append(b, '\n'), err
}

// overlayPool hands out overlay addresses from 100.64.0.0/10 and remembers
// them in overlay.json.
type overlayPool struct {
	file    *stateFile
	mu      sync.Mutex
	m       map[string]netip.Addr
	used    map[netip.Addr]bool // the values of m
	changes uint64              // changes to m, for file
}

var overlayPrefix = wire.OverlayPrefix

func openOverlayPool(dir string) (*overlayPool, error) {
	p := &overlayPool{m: make(map[string]netip.Addr), used: make(map[netip.Addr]bool)}
	p.file = &stateFile{path: filepath.Join(dir, "overlay.json"), snapshot: func() ([]byte, uint64, error) {
		p.mu.Lock()
		defer p.mu.Unlock()
		b, err := marshalState(p.m)
		return b, p.changes, err
	}}
	if err := readJSON(p.file.path, &p.m); err != nil {
		return nil, err
	}
	for _, a := range p.m {
		p.used[a] = true
	}
	return p, nil
}

// Peek returns the address recorded for key, without allocating.
func (p *overlayPool) Peek(key string) (netip.Addr, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	a, ok := p.m[key]
	return a, ok && overlayPrefix.Contains(a)
}

// Get returns the address for key, allocating one if needed, once the
// pool holding it is on disk, so that a restarted gateway cannot give it
// to another name. Nodes that get addresses at once share the writes
// (stateFile). An address whose write failed stays the key's in memory,
// unused: the next Get of it waits for a write that succeeds.
func (p *overlayPool) Get(key string) (netip.Addr, error) {
	a, seq, err := p.reserve(key)
	if err != nil {
		return netip.Addr{}, err
	}
	if err := p.file.save(seq); err != nil {
		return netip.Addr{}, err
	}
	return a, nil
}

// reserve returns key's address, allocating one in memory if needed, and
// the change to save before handing it out.
func (p *overlayPool) reserve(key string) (netip.Addr, uint64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a, ok := p.m[key]; ok && overlayPrefix.Contains(a) {
		return a, p.changes, nil
	}
	// .0 is the network and .1 is kept for the gateway, should it ever
	// join the overlay itself.
	a := overlayPrefix.Addr().Next().Next()
	for p.used[a] {
		a = a.Next()
		if !overlayPrefix.Contains(a) {
			return netip.Addr{}, 0, errors.New("overlay address pool exhausted")
		}
	}
	if old, ok := p.m[key]; ok {
		delete(p.used, old) // outside the prefix: replaced
	}
	p.m[key] = a
	p.used[a] = true
	p.changes++
	return a, p.changes, nil
}
