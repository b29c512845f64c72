// Package token is how nodes are admitted: an authority (an Ed25519 key that
// the gateway does not need to hold) signs claims about one node (role,
// name, expiry, which agents a client may use, its groups, where the gateway
// is and its certificate pin), and the node that first uses them binds them
// to its own key.
//
// Two forms, one set of signed claims:
//
//   - A token ("nlv2.") is what `nlvpn token` prints: the claims, the
//     authority's signature, and the private half of a one-time enrollment
//     key whose public half the claims name. It is a secret.
//   - A credential ("nlc2.") is what a node makes of it (Token.Enroll): the
//     claims, the authority's signature, the node's public key and the
//     enrollment key's signature over that node key. It is not a secret: it
//     only admits the holder of that node key, which TLS proves.
//
// The gateway, agents and clients all verify credentials against the
// authority key themselves (Verify). The enrollment secret never leaves the
// node, so a gateway that sees credentials cannot bind the claims to a key
// of its own: it cannot become a client of an agent or pass itself off as
// an agent, whatever it says.
package token

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/identity"
)

// Prefixes of the two forms.
const (
	tokenPrefix      = "nlv2."
	credentialPrefix = "nlc2."
)

// Domain separation: what the authority signs and what an enrollment key
// signs can never be taken for each other or for a node's other signatures.
const (
	claimsContext = "nlvpn claims v2\x00"
	bindContext   = "nlvpn enroll v2\x00"
)

// MaxLen bounds a token's size; anything longer is refused before parsing.
const MaxLen = 4096

// MaxGateways bounds the gateway addresses a token names (Gateway and
// Gateways together).
const MaxGateways = 8

// Roles.
const (
	RoleAgent  = "agent"
	RoleClient = "client"
)

// Claims is what a token says.
type Claims struct {
	ID     string   `json:"jti"`
	Role   string   `json:"role"`
	Name   string   `json:"name"`
	Agents []string `json:"agents,omitempty"` // client only; "*" allows every agent
	Groups []string `json:"groups,omitempty"` // client only; for agents' policies
	// Uses is how many machines (node keys) the token may enroll; 0 means
	// one. The gateway remembers the keys that used it.
	Uses    int    `json:"uses,omitempty"`
	Issued  int64  `json:"iat"`
	Expires int64  `json:"exp"`
	Gateway string `json:"gw,omitempty"`  // host:port
	Pin     string `json:"pin,omitempty"` // identity.Fingerprint of the gateway certificate
	// Gateways are further gateways of the same network (a cluster sharing
	// the gateway key, so Pin verifies each), HOST:PORT: the node uses the
	// nearest that answers, and the others when it goes away.
	Gateways []string `json:"gws,omitempty"`
	// Authority is the key that signed the claims. A node trusts the
	// authority of its own token and verifies its peers against it.
	Authority identity.PublicKey `json:"auth"`
	// Enroll is the public half of the token's one-time enrollment key:
	// it signs the node key the claims are bound to.
	Enroll identity.PublicKey `json:"ek"`
}

// Errors a caller can tell apart.
var (
	ErrMalformed = errors.New("token is malformed")
	ErrSignature = errors.New("credential is not signed by this authority (forged, altered, or issued by another authority)")
	ErrBinding   = errors.New("credential is not bound to this node's key (copied from another machine, or forged)")
	ErrExpired   = errors.New("token has expired")
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// ValidName reports whether s can name a node: lower-case letters, digits,
// '.', '_' and '-', 1 to 63 characters, starting with a letter or digit.
func ValidName(s string) bool { return nameRE.MatchString(s) }

// Validate checks the claims' shape (not signature or expiry).
func (c *Claims) Validate() error {
	if c.Role != RoleAgent && c.Role != RoleClient {
		return fmt.Errorf("%w: role %q", ErrMalformed, c.Role)
	}
	if !ValidName(c.Name) {
		return fmt.Errorf("%w: name %q", ErrMalformed, c.Name)
	}
	for _, a := range c.Agents {
		if a != "*" && !ValidName(a) {
			return fmt.Errorf("%w: agent %q", ErrMalformed, a)
		}
	}
	if c.Expires == 0 {
		return fmt.Errorf("%w: no expiry", ErrMalformed)
	}
	if len(c.Gateways) > 0 {
		if err := CheckGateways(append([]string{c.Gateway}, c.Gateways...)); err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
	}
	if len(c.Authority) != 32 || len(c.Enroll) != 32 {
		return fmt.Errorf("%w: no authority or enrollment key", ErrMalformed)
	}
	return nil
}

// CheckGateways checks a network's gateway addresses, as a token names
// them and as a node is given them: at most MaxGateways, each HOST:PORT.
func CheckGateways(gws []string) error {
	if len(gws) > MaxGateways {
		return fmt.Errorf("%d gateways: at most %d", len(gws), MaxGateways)
	}
	for _, g := range gws {
		if _, _, err := net.SplitHostPort(g); err != nil || len(g) > 255 {
			return fmt.Errorf("gateway address %q: want HOST:PORT", g)
		}
	}
	return nil
}

// MayUse reports whether a client token allows the named agent.
func (c *Claims) MayUse(agent string) bool {
	return c.Role == RoleClient && (slices.Contains(c.Agents, "*") || slices.Contains(c.Agents, agent))
}

// Issue signs claims with the authority key and returns a token: the claims
// with a fresh enrollment key. ID and Issued are filled if unset.
func Issue(authority *identity.Key, c Claims) (string, error) {
	if c.ID == "" {
		var b [8]byte
		rand.Read(b[:])
		c.ID = hex.EncodeToString(b[:])
	}
	if c.Issued == 0 {
		c.Issued = time.Now().Unix()
	}
	ek, err := identity.Generate()
	if err != nil {
		return "", err
	}
	c.Authority, c.Enroll = authority.Public(), ek.Public()
	if err := c.Validate(); err != nil {
		return "", err
	}
	body, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	claims := b64(body)
	sig := authority.Sign([]byte(claimsContext + claims))
	return tokenPrefix + claims + "." + b64(sig) + "." + b64(ek.Seed()), nil
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// Token is a parsed token: its claims and its enrollment key.
type Token struct {
	Claims *Claims
	signed string // claims part and authority signature, as issued
	enroll *identity.Key
}

// ParseToken parses a token and checks that the authority it names signed
// it and that its enrollment key is the one the claims name. It does not
// check expiry, nor whether that authority is one to trust.
func ParseToken(s string) (*Token, error) {
	parts, err := split(s, tokenPrefix, 3)
	if err != nil {
		return nil, err
	}
	c, err := verifyClaims(parts[0], parts[1])
	if err != nil {
		return nil, err
	}
	seed, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, fmt.Errorf("%w: enrollment key is not base64url", ErrMalformed)
	}
	ek, err := identity.FromSeed(seed)
	if err != nil || !ek.Public().Equal(c.Enroll) {
		return nil, fmt.Errorf("%w: the enrollment key does not match the claims", ErrMalformed)
	}
	return &Token{Claims: c, signed: parts[0] + "." + parts[1], enroll: ek}, nil
}

// Enroll binds the token to a node key: the credential that node presents.
func (t *Token) Enroll(node identity.PublicKey) string {
	sig := t.enroll.Sign(bindMessage(node))
	return credentialPrefix + t.signed + "." + b64(node) + "." + b64(sig)
}

func bindMessage(node identity.PublicKey) []byte {
	return append([]byte(bindContext), node...)
}

// Credential is a parsed credential: claims bound to a node key.
type Credential struct {
	Claims *Claims
	Node   identity.PublicKey
}

// ParseCredential parses a credential and checks both signatures: the
// authority's over the claims and the enrollment key's over the node key.
// It does not check expiry, nor whether that authority is one to trust:
// Verify does all of it.
func ParseCredential(s string) (*Credential, error) {
	parts, err := split(s, credentialPrefix, 4)
	if err != nil {
		return nil, err
	}
	c, err := verifyClaims(parts[0], parts[1])
	if err != nil {
		return nil, err
	}
	node, err1 := base64.RawURLEncoding.DecodeString(parts[2])
	sig, err2 := base64.RawURLEncoding.DecodeString(parts[3])
	if err1 != nil || err2 != nil || len(node) != 32 {
		return nil, fmt.Errorf("%w: node key or binding is not base64url", ErrMalformed)
	}
	if !c.Enroll.Verify(bindMessage(node), sig) {
		return nil, ErrBinding
	}
	return &Credential{Claims: c, Node: identity.PublicKey(node)}, nil
}

// Verify parses credential s and checks that authority signed it, that it
// is bound to node (the key the peer proved in TLS), and that it has not
// expired at now. The gateway, agents and clients all admit peers by it.
func Verify(s string, authority, node identity.PublicKey, now time.Time) (*Claims, error) {
	cr, err := ParseCredential(s)
	if err != nil {
		return nil, err
	}
	if !cr.Claims.Authority.Equal(authority) {
		return nil, ErrSignature
	}
	if !cr.Node.Equal(node) {
		return nil, ErrBinding
	}
	if now.Unix() >= cr.Claims.Expires {
		return nil, fmt.Errorf("%w (at %s)", ErrExpired, time.Unix(cr.Claims.Expires, 0).UTC().Format(time.RFC3339))
	}
	return cr.Claims, nil
}

// Parse reads the claims of either form, checking the signatures the form
// carries but not whom they are from. The CLI uses it to learn role, name
// and gateway; admission uses Verify.
func Parse(s string) (*Claims, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, credentialPrefix) {
		cr, err := ParseCredential(s)
		if err != nil {
			return nil, err
		}
		return cr.Claims, nil
	}
	t, err := ParseToken(s)
	if err != nil {
		return nil, err
	}
	return t.Claims, nil
}

// IsCredential reports whether s is in the credential form (not a token).
func IsCredential(s string) bool {
	return strings.HasPrefix(strings.TrimSpace(s), credentialPrefix)
}

// split checks the size and prefix of s and cuts it into n dot-separated
// parts.
func split(s, prefix string, n int) ([]string, error) {
	s = strings.TrimSpace(s)
	if len(s) > MaxLen {
		return nil, fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, len(s), MaxLen)
	}
	rest, ok := strings.CutPrefix(s, prefix)
	if !ok {
		if strings.HasPrefix(s, "nlv1.") {
			return nil, fmt.Errorf("%w: this is an old (nlv1) token, which the gateway signed itself; ask for a new one (nlvpn token)", ErrMalformed)
		}
		return nil, fmt.Errorf("%w: it does not start with %q", ErrMalformed, prefix)
	}
	parts := strings.Split(rest, ".")
	if len(parts) != n {
		return nil, fmt.Errorf("%w: %d parts, want %d", ErrMalformed, len(parts), n)
	}
	return parts, nil
}

// verifyClaims decodes the claims part and checks the authority signature
// over it against the authority the claims name.
func verifyClaims(claims, sig string) (*Claims, error) {
	body, err := base64.RawURLEncoding.DecodeString(claims)
	if err != nil {
		return nil, fmt.Errorf("%w: claims are not base64url", ErrMalformed)
	}
	rawSig, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		return nil, fmt.Errorf("%w: signature is not base64url", ErrMalformed)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	c := new(Claims)
	if err := dec.Decode(c); err != nil {
		return nil, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if !c.Authority.Verify([]byte(claimsContext+claims), rawSig) {
		return nil, ErrSignature
	}
	return c, nil
}
