package gateway

import (
	"testing"

	"github.com/nlvpn/nlvpn/token"
)

func TestRevocationMatches(t *testing.T) {
	alice := &token.Claims{ID: "a1", Role: token.RoleClient, Name: "alice", Issued: 100}
	for _, tc := range []struct {
		r    Revocation
		want bool
	}{
		{Revocation{ID: "a1", At: 50}, true}, // by ID, whenever issued
		{Revocation{ID: "b2", At: 200}, false},
		{Revocation{Role: token.RoleClient, Name: "alice", At: 100}, true}, // issued that second
		{Revocation{Role: token.RoleClient, Name: "alice", At: 99}, false}, // issued after
		{Revocation{Role: token.RoleAgent, Name: "alice", At: 200}, false}, // an agent of that name
		{Revocation{Role: token.RoleClient, Name: "bob", At: 200}, false},
	} {
		if got := tc.r.Matches(alice); got != tc.want {
			t.Errorf("%+v matches alice: %v, want %v", tc.r, got, tc.want)
		}
	}
}

func TestParseRevocations(t *testing.T) {
	if rs, err := ParseRevocations([]byte(`[{"id":"a1","at":1},{"role":"agent","name":"miranda","at":2}]`)); err != nil || len(rs) != 2 {
		t.Fatalf("ParseRevocations = %v, %v", rs, err)
	}
	for _, bad := range []string{``, `{}`, `[{"at":1}]`, `[{"role":"admin","name":"x","at":1}]`, `[{"role":"client","at":1}]`, `[1]`} {
		if _, err := ParseRevocations([]byte(bad)); err == nil {
			t.Errorf("ParseRevocations(%q) accepted", bad)
		}
	}
}

// FuzzParseRevocations: no input crashes the parser, and what it accepts
// can be matched.
func FuzzParseRevocations(f *testing.F) {
	f.Add([]byte(`[{"id":"a1","at":1},{"role":"agent","name":"miranda","at":2}]`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		rs, err := ParseRevocations(b)
		if err != nil {
			return
		}
		c := &token.Claims{ID: "a1", Role: token.RoleClient, Name: "alice", Issued: 1}
		for _, r := range rs {
			r.Matches(c)
		}
	})
}
