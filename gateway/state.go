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
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return identity.WriteFileAtomic(path, append(b, '\n'), 0o600)
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

// overlayPool hands out overlay addresses from 100.64.0.0/10 and remembers
// them in overlay.json.
type overlayPool struct {
	path string
	mu   sync.Mutex
	m    map[string]netip.Addr
}

var overlayPrefix = wire.OverlayPrefix

func openOverlayPool(dir string) (*overlayPool, error) {
	p := &overlayPool{path: filepath.Join(dir, "overlay.json"), m: make(map[string]netip.Addr)}
	if err := readJSON(p.path, &p.m); err != nil {
		return nil, err
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

// Get returns the address for key, allocating and saving one if needed.
func (p *overlayPool) Get(key string) (netip.Addr, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if a, ok := p.m[key]; ok && overlayPrefix.Contains(a) {
		return a, nil
	}
	used := make(map[netip.Addr]bool, len(p.m))
	for _, a := range p.m {
		used[a] = true
	}
	// .0 is the network and .1 is kept for the gateway, should it ever
	// join the overlay itself.
	a := overlayPrefix.Addr().Next().Next()
	for used[a] {
		a = a.Next()
		if !overlayPrefix.Contains(a) {
			return netip.Addr{}, errors.New("overlay address pool exhausted")
		}
	}
	p.m[key] = a
	if err := writeJSON(p.path, p.m); err != nil {
		delete(p.m, key)
		return netip.Addr{}, err
	}
	return a, nil
}
