// Package token is the gateway's bearer credential: a signed statement of a
// node's role and name, with an expiry, which agents a client may use, and
// where the gateway is and how to recognise it (address and certificate pin),
// so one string is all a new machine needs.
//
// Format: "nlv1." + base64url(JSON claims) + "." + base64url(Ed25519 signature
// over the first two parts). Only the gateway can verify the signature; nodes
// read the gateway address and pin from the claims, and the pin is what
// protects them from a fake gateway.
package token

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/identity"
)

const prefix = "nlv1."

// MaxLen bounds a token's size; anything longer is refused before parsing.
const MaxLen = 4096

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
}

// Errors a caller can tell apart.
var (
	ErrMalformed = errors.New("token is malformed")
	ErrSignature = errors.New("token signature is not valid for this gateway (forged, altered, or issued by another gateway)")
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
	return nil
}

// MayUse reports whether a client token allows the named agent.
func (c *Claims) MayUse(agent string) bool {
	return c.Role == RoleClient && (slices.Contains(c.Agents, "*") || slices.Contains(c.Agents, agent))
}

// Issue signs claims with the gateway's key, filling ID and Issued if unset.
func Issue(key *identity.Key, c Claims) (string, error) {
	if c.ID == "" {
		var b [8]byte
		rand.Read(b[:])
		c.ID = hex.EncodeToString(b[:])
	}
	if c.Issued == 0 {
		c.Issued = time.Now().Unix()
	}
	if err := c.Validate(); err != nil {
		return "", err
	}
	body, err := json.Marshal(c)
	if err != nil {
		return "", err
	}
	signed := prefix + base64.RawURLEncoding.EncodeToString(body)
	sig := key.Sign([]byte(signed))
	return signed + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// Parse decodes a token without checking its signature. Nodes use it to learn
// the gateway address and pin; the gateway must use Verify.
func Parse(s string) (*Claims, error) {
	c, _, _, err := split(s)
	return c, err
}

func split(s string) (c *Claims, signed, sig []byte, err error) {
	s = strings.TrimSpace(s)
	if len(s) > MaxLen {
		return nil, nil, nil, fmt.Errorf("%w: %d bytes, more than %d", ErrMalformed, len(s), MaxLen)
	}
	if !strings.HasPrefix(s, prefix) {
		return nil, nil, nil, fmt.Errorf("%w: it does not start with %q", ErrMalformed, prefix)
	}
	dot := strings.LastIndexByte(s, '.')
	if dot < len(prefix) {
		return nil, nil, nil, fmt.Errorf("%w: no signature part", ErrMalformed)
	}
	body, err := base64.RawURLEncoding.DecodeString(s[len(prefix):dot])
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: claims are not base64url", ErrMalformed)
	}
	sig, err = base64.RawURLEncoding.DecodeString(s[dot+1:])
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: signature is not base64url", ErrMalformed)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	c = new(Claims)
	if err := dec.Decode(c); err != nil {
		return nil, nil, nil, fmt.Errorf("%w: claims: %v", ErrMalformed, err)
	}
	if err := c.Validate(); err != nil {
		return nil, nil, nil, err
	}
	return c, []byte(s[:dot]), sig, nil
}

// Verify parses s and checks its signature against the gateway's key and its
// expiry against now.
func Verify(s string, pub identity.PublicKey, now time.Time) (*Claims, error) {
	c, signed, sig, err := split(s)
	if err != nil {
		return nil, err
	}
	if !pub.Verify(signed, sig) {
		return nil, ErrSignature
	}
	if now.Unix() >= c.Expires {
		return nil, fmt.Errorf("%w (at %s)", ErrExpired, time.Unix(c.Expires, 0).UTC().Format(time.RFC3339))
	}
	return c, nil
}
