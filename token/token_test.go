package token

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/identity"
)

func mustKey(t testing.TB) *identity.Key {
	k, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustIssue(t testing.TB, auth *identity.Key, c Claims) *Token {
	t.Helper()
	s, err := Issue(auth, c)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ParseToken(s)
	if err != nil {
		t.Fatalf("ParseToken of a fresh token: %v", err)
	}
	return tok
}

// flip changes one character of part i (0: claims) of a dotted string.
func flip(s string, part int) string {
	idx := 0
	for range part + 1 {
		idx = strings.IndexByte(s[idx:], '.') + idx + 1
	}
	b := []byte(s)
	if b[idx+2] == 'A' {
		b[idx+2] = 'B'
	} else {
		b[idx+2] = 'A'
	}
	return string(b)
}

func TestEnrollVerify(t *testing.T) {
	auth, other := mustKey(t), mustKey(t)
	node, thief := mustKey(t), mustKey(t)
	now := time.Now()
	good := mustIssue(t, auth, Claims{Role: RoleClient, Name: "alice", Agents: []string{"miranda"}, Expires: now.Add(time.Hour).Unix(), Gateway: "198.18.1.2:4433", Pin: "sha256:00"})
	cred := good.Enroll(node.Public())
	expired := mustIssue(t, auth, Claims{Role: RoleAgent, Name: "miranda", Expires: now.Add(-time.Second).Unix()}).Enroll(node.Public())
	foreign := mustIssue(t, other, Claims{Role: RoleClient, Name: "alice", Agents: []string{"miranda"}, Expires: now.Add(time.Hour).Unix()}).Enroll(node.Public())
	// The thief has the credential (the gateway sees it) but not the
	// enrollment key: swapping in its own key breaks the binding.
	stolen := strings.Replace(cred, b64(node.Public()), b64(thief.Public()), 1)

	tests := []struct {
		name string
		cred string
		node identity.PublicKey
		want error
	}{
		{"valid", cred, node.Public(), nil},
		{"valid with spaces", "  " + cred + "\n", node.Public(), nil},
		{"presented by another key", cred, thief.Public(), ErrBinding},
		{"node key swapped", stolen, thief.Public(), ErrBinding},
		{"expired", expired, node.Public(), ErrExpired},
		{"other authority", foreign, node.Public(), ErrSignature},
		{"claims altered", flip(cred, 0), node.Public(), nil}, // malformed or bad signature
		{"binding altered", flip(cred, 3), node.Public(), ErrBinding},
		{"a token, not a credential", strings.Replace(cred, credentialPrefix, tokenPrefix, 1), node.Public(), ErrMalformed},
		{"garbage", "hello", node.Public(), ErrMalformed},
		{"old format", "nlv1.e30.AA", node.Public(), ErrMalformed},
		{"empty", "", node.Public(), ErrMalformed},
		{"huge", credentialPrefix + strings.Repeat("A", MaxLen), node.Public(), ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Verify(tt.cred, auth.Public(), tt.node, now)
			if tt.name == "claims altered" {
				if err == nil {
					t.Fatal("altered credential accepted")
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Verify error = %v, want %v", err, tt.want)
			}
			if err == nil {
				if c.Name != "alice" || !c.MayUse("miranda") || c.MayUse("bob") || c.Gateway != "198.18.1.2:4433" {
					t.Fatalf("claims = %+v", c)
				}
			}
		})
	}
}

func TestParseToken(t *testing.T) {
	auth := mustKey(t)
	s, err := Issue(auth, Claims{Role: RoleAgent, Name: "miranda", Expires: time.Now().Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := ParseToken(s)
	if err != nil {
		t.Fatal(err)
	}
	if !tok.Claims.Authority.Equal(auth.Public()) || tok.Claims.ID == "" || tok.Claims.Issued == 0 {
		t.Fatalf("claims = %+v", tok.Claims)
	}
	// Another token's enrollment key does not fit these claims.
	s2, _ := Issue(auth, Claims{Role: RoleAgent, Name: "miranda", Expires: time.Now().Add(time.Hour).Unix()})
	mixed := s[:strings.LastIndexByte(s, '.')] + s2[strings.LastIndexByte(s2, '.'):]
	if _, err := ParseToken(mixed); !errors.Is(err, ErrMalformed) {
		t.Errorf("token with another token's enrollment key: %v, want %v", err, ErrMalformed)
	}
	if _, err := ParseToken(flip(s, 1)); err == nil {
		t.Error("token with an altered signature parsed")
	}
	// Parse reads both forms; IsCredential tells them apart.
	cred := tok.Enroll(mustKey(t).Public())
	for _, f := range []string{s, cred} {
		c, err := Parse(f)
		if err != nil || c.Name != "miranda" {
			t.Errorf("Parse(%.10s…) = %+v, %v", f, c, err)
		}
	}
	if IsCredential(s) || !IsCredential(cred) {
		t.Error("IsCredential cannot tell a token from a credential")
	}
	// The credential does not carry the enrollment secret.
	if strings.Contains(cred, b64(tok.enroll.Seed())) {
		t.Error("the credential contains the enrollment key")
	}
}

func TestIssueRejectsBadClaims(t *testing.T) {
	auth := mustKey(t)
	for _, c := range []Claims{
		{Role: "admin", Name: "x", Expires: 1},
		{Role: RoleAgent, Name: "Bad Name", Expires: 1},
		{Role: RoleAgent, Name: "ok"},
		{Role: RoleClient, Name: "ok", Agents: []string{"no/slash"}, Expires: 1},
		{Role: RoleAgent, Name: "ok", Expires: 1, Gateway: "a:1", Gateways: []string{"no-port"}},
		{Role: RoleAgent, Name: "ok", Expires: 1, Gateway: "a:1", Gateways: []string{"b:1", "c:1", "d:1", "e:1", "f:1", "g:1", "h:1", "i:1"}},
	} {
		if _, err := Issue(auth, c); err == nil {
			t.Errorf("Issue(%+v) succeeded", c)
		}
	}
}

// A cluster's token names every gateway, and the enrolled credential,
// which the node keeps instead of the token, still does.
func TestGatewaysSurviveEnrollment(t *testing.T) {
	auth, node := mustKey(t), mustKey(t)
	gws := []string{"198.18.2.2:4433", "gw-us.example.com:443"}
	tok := mustIssue(t, auth, Claims{Role: RoleAgent, Name: "miranda", Expires: time.Now().Add(time.Hour).Unix(), Gateway: "198.18.1.2:4433", Gateways: gws})
	c, err := Verify(tok.Enroll(node.Public()), auth.Public(), node.Public(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if c.Gateway != "198.18.1.2:4433" || strings.Join(c.Gateways, ",") != strings.Join(gws, ",") {
		t.Fatalf("credential names gateways %q and %q, want 198.18.1.2:4433 and %q", c.Gateway, c.Gateways, gws)
	}
}

func FuzzParseCredential(f *testing.F) {
	auth, node := mustKey(f), mustKey(f)
	tok := mustIssue(f, auth, Claims{Role: RoleClient, Name: "alice", Agents: []string{"*"}, Expires: 1 << 40})
	f.Add(tok.Enroll(node.Public()))
	f.Add("nlc2....")
	f.Add("nlc2.e30.AA.AA.AA")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Verify(s, auth.Public(), node.Public(), time.Unix(0, 0))
		if err == nil && (c.Validate() != nil || !c.Authority.Equal(auth.Public())) {
			t.Fatalf("verified invalid claims %+v", c)
		}
		_, _ = Parse(s)
	})
}

func FuzzParseToken(f *testing.F) {
	auth := mustKey(f)
	s, _ := Issue(auth, Claims{Role: RoleAgent, Name: "miranda", Expires: 1 << 40})
	f.Add(s)
	f.Add("nlv2...")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseToken(s)
		if err != nil {
			return
		}
		// Whatever parses enrolls into a credential that verifies.
		node := identity.PublicKey(make([]byte, 32))
		if cred := tok.Enroll(node); len(cred) > MaxLen {
			return // a token near the size bound makes a credential beyond it
		}
		if _, err := ParseCredential(tok.Enroll(node)); err != nil {
			t.Fatalf("credential from a parsed token does not parse: %v", err)
		}
	})
}
