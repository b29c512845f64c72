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

func TestIssueVerify(t *testing.T) {
	gw := mustKey(t)
	other := mustKey(t)
	now := time.Now()
	good, err := Issue(gw, Claims{Role: RoleClient, Name: "alice", Agents: []string{"miranda"}, Expires: now.Add(time.Hour).Unix(), Gateway: "198.18.1.2:4433", Pin: "sha256:00"})
	if err != nil {
		t.Fatal(err)
	}
	expired, err := Issue(gw, Claims{Role: RoleAgent, Name: "miranda", Expires: now.Add(-time.Second).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := Issue(other, Claims{Role: RoleAgent, Name: "miranda", Expires: now.Add(time.Hour).Unix()})
	if err != nil {
		t.Fatal(err)
	}
	// Flip one character of the claims: the signature must no longer match.
	b := []byte(good)
	b[len(prefix)+3] ^= 1
	tampered := string(b)

	tests := []struct {
		name  string
		tok   string
		want  error
		agent string
	}{
		{"valid", good, nil, "miranda"},
		{"valid with spaces", "  " + good + "\n", nil, "miranda"},
		{"expired", expired, ErrExpired, ""},
		{"other gateway", foreign, ErrSignature, ""},
		{"tampered", tampered, nil, ""}, // either malformed or bad signature
		{"garbage", "hello", ErrMalformed, ""},
		{"empty", "", ErrMalformed, ""},
		{"no sig", prefix + "eyJ9", ErrMalformed, ""},
		{"huge", prefix + strings.Repeat("A", MaxLen), ErrMalformed, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Verify(tt.tok, gw.Public(), now)
			if tt.name == "tampered" {
				if err == nil {
					t.Fatal("tampered token accepted")
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("Verify error = %v, want %v", err, tt.want)
			}
			if err == nil {
				if c.Name != "alice" || !c.MayUse(tt.agent) || c.MayUse("bob") || c.Gateway != "198.18.1.2:4433" {
					t.Fatalf("claims = %+v", c)
				}
			}
		})
	}
}

func TestIssueRejectsBadClaims(t *testing.T) {
	gw := mustKey(t)
	for _, c := range []Claims{
		{Role: "admin", Name: "x", Expires: 1},
		{Role: RoleAgent, Name: "Bad Name", Expires: 1},
		{Role: RoleAgent, Name: "ok"},
		{Role: RoleClient, Name: "ok", Agents: []string{"no/slash"}, Expires: 1},
	} {
		if _, err := Issue(gw, c); err == nil {
			t.Errorf("Issue(%+v) succeeded", c)
		}
	}
}

func FuzzParse(f *testing.F) {
	gw := mustKey(f)
	tok, _ := Issue(gw, Claims{Role: RoleClient, Name: "alice", Agents: []string{"*"}, Expires: 1 << 40})
	f.Add(tok)
	f.Add("nlv1..")
	f.Add("nlv1.e30.AA")
	f.Fuzz(func(t *testing.T, s string) {
		c, err := Verify(s, gw.Public(), time.Unix(0, 0))
		if err == nil && c.Validate() != nil {
			t.Fatalf("verified invalid claims %+v", c)
		}
		_, _ = Parse(s)
	})
}
