package token

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/nlvpn/nlvpn/identity"
)

// Revocations are signed by the authority, like credentials, so that the
// gateway can pass them on to agents but cannot forge or alter them: an
// agent ends a revoked client's sessions itself, on the direct path too,
// on the authority's word, not the gateway's. A gateway can still withhold
// a newer list (it can drop traffic anyway); it cannot roll an agent back
// to an older one, because agents keep the highest serial they have seen.

const (
	revocationsPrefix  = "nlr1."
	revocationsContext = "nlvpn revocations v1\x00"
)

// MaxRevocations bounds one list: the signed list must fit one control
// message (wire.MaxMessageSize) with room to spare. An authority that
// needs more has revoked so much that a new authority key is the cleaner
// cut.
const MaxRevocations = 400

// MaxRevocationsLen bounds the signed form; longer input is refused before
// it is decoded.
const MaxRevocationsLen = 60 << 10

// Revocation ends one credential (by its token ID), or every credential of
// a role and name issued at or before At.
type Revocation struct {
	ID   string `json:"id,omitempty"`   // one token (its jti)
	Role string `json:"role,omitempty"` // with Name: every token of that
	Name string `json:"name,omitempty"` // node issued at or before At
	At   int64  `json:"at"`             // Unix seconds
}

// Matches reports whether r revokes the credential with claims c.
func (r Revocation) Matches(c *Claims) bool {
	if r.ID != "" {
		return c.ID == r.ID
	}
	return r.Name == c.Name && r.Role == c.Role && c.Issued <= r.At
}

// Revocations is the authority's whole list. Each new list has a higher
// Serial than the one before.
type Revocations struct {
	Serial    uint64             `json:"serial"`
	Authority identity.PublicKey `json:"auth"`
	List      []Revocation       `json:"revoked"`
}

// Match returns the revocation that ends c, if any.
func (rs *Revocations) Match(c *Claims) (Revocation, bool) {
	if rs == nil {
		return Revocation{}, false
	}
	for _, r := range rs.List {
		if r.Matches(c) {
			return r, true
		}
	}
	return Revocation{}, false
}

func (rs *Revocations) validate() error {
	if len(rs.List) > MaxRevocations {
		return fmt.Errorf("%d revocations, more than %d (issue a new authority key instead)", len(rs.List), MaxRevocations)
	}
	for i, r := range rs.List {
		if r.ID == "" && (!ValidName(r.Name) || (r.Role != RoleClient && r.Role != RoleAgent)) {
			return fmt.Errorf("revocation %d names neither a token ID nor a client or agent", i+1)
		}
	}
	return nil
}

// Sign returns the list signed by authority (its Authority is set to it).
func (rs Revocations) Sign(authority *identity.Key) (string, error) {
	rs.Authority = authority.Public()
	if err := rs.validate(); err != nil {
		return "", err
	}
	body, err := json.Marshal(rs)
	if err != nil {
		return "", err
	}
	part := b64(body)
	s := revocationsPrefix + part + "." + b64(authority.Sign([]byte(revocationsContext+part)))
	if len(s) > MaxRevocationsLen {
		return "", fmt.Errorf("the signed revocation list is %d bytes, more than %d", len(s), MaxRevocationsLen)
	}
	return s, nil
}

// ErrNotAuthority says a revocation list was not signed by the authority
// the reader trusts.
var ErrNotAuthority = errors.New("revocation list is not signed by this network's authority (forged, altered, or from another authority)")

// ParseRevocations checks that authority signed the list s and returns it.
func ParseRevocations(s string, authority identity.PublicKey) (*Revocations, error) {
	s = strings.TrimSpace(s)
	if len(s) > MaxRevocationsLen {
		return nil, fmt.Errorf("%w: revocation list of %d bytes, more than %d", ErrMalformed, len(s), MaxRevocationsLen)
	}
	rest, ok := strings.CutPrefix(s, revocationsPrefix)
	if !ok {
		return nil, fmt.Errorf("%w: a revocation list starts with %q", ErrMalformed, revocationsPrefix)
	}
	part, sig, ok := strings.Cut(rest, ".")
	if !ok || strings.Contains(sig, ".") {
		return nil, fmt.Errorf("%w: a revocation list has two parts", ErrMalformed)
	}
	rawSig, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		return nil, fmt.Errorf("%w: signature is not base64url", ErrMalformed)
	}
	if len(authority) == 0 || !authority.Verify([]byte(revocationsContext+part), rawSig) {
		return nil, ErrNotAuthority
	}
	body, err := base64.RawURLEncoding.DecodeString(part)
	if err != nil {
		return nil, fmt.Errorf("%w: list is not base64url", ErrMalformed)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	rs := new(Revocations)
	if err := dec.Decode(rs); err != nil {
		return nil, fmt.Errorf("%w: revocation list: %v", ErrMalformed, err)
	}
	if !rs.Authority.Equal(authority) {
		return nil, ErrNotAuthority
	}
	if err := rs.validate(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	return rs, nil
}
