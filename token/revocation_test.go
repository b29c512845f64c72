package token

import (
	"encoding/base64"
	"errors"
	"strings"
	"testing"
)

// A signed list reads back as written under its authority and under no
// other; any change to it, or a list signed by another key that names our
// authority, is refused.
func TestRevocationsSignParse(t *testing.T) {
	auth, other := mustKey(t), mustKey(t)
	rs := Revocations{Serial: 3, List: []Revocation{{ID: "a1", At: 1}, {Role: RoleClient, Name: "alice", At: 100}}}
	s, err := rs.Sign(auth)
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseRevocations(s, auth.Public())
	if err != nil || got.Serial != 3 || len(got.List) != 2 || got.List[1].Name != "alice" {
		t.Fatalf("ParseRevocations = %+v, %v", got, err)
	}
	forged, _ := Revocations{Serial: 4}.Sign(other) // an empty list from the gateway's own key
	part, sig, _ := strings.Cut(strings.TrimPrefix(s, revocationsPrefix), ".")
	body, _ := base64.RawURLEncoding.DecodeString(part)
	altered := revocationsPrefix + b64([]byte(strings.Replace(string(body), `"serial":3`, `"serial":9`, 1))) + "." + sig
	for _, tt := range []struct {
		name string
		s    string
		want error
	}{
		{"another authority's list", forged, ErrNotAuthority},
		{"serial altered", altered, ErrNotAuthority},
		{"signature cut", s[:len(s)-4], ErrNotAuthority},
		{"no prefix", strings.TrimPrefix(s, revocationsPrefix), ErrMalformed},
		{"three parts", s + ".x", ErrMalformed},
		{"too long", revocationsPrefix + strings.Repeat("A", MaxRevocationsLen), ErrMalformed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ParseRevocations(tt.s, auth.Public()); !errors.Is(err, tt.want) {
				t.Fatalf("err %v, want %v", err, tt.want)
			}
		})
	}
}

// Match covers one token by ID, or a name's tokens issued until the
// revocation; not later ones, not another role's.
func TestRevocationMatch(t *testing.T) {
	rs := &Revocations{List: []Revocation{{ID: "t1", At: 50}, {Role: RoleClient, Name: "alice", At: 100}}}
	for _, tt := range []struct {
		c    Claims
		want bool
	}{
		{Claims{ID: "t1", Role: RoleAgent, Name: "miranda", Issued: 500}, true},
		{Claims{ID: "t2", Role: RoleClient, Name: "alice", Issued: 100}, true},
		{Claims{ID: "t3", Role: RoleClient, Name: "alice", Issued: 101}, false}, // issued after
		{Claims{ID: "t4", Role: RoleAgent, Name: "alice", Issued: 1}, false},    // another role
		{Claims{ID: "t5", Role: RoleClient, Name: "bob", Issued: 1}, false},
	} {
		if _, got := rs.Match(&tt.c); got != tt.want {
			t.Errorf("%+v: revoked %v, want %v", tt.c, got, tt.want)
		}
	}
	if _, ok := (*Revocations)(nil).Match(&Claims{ID: "t1"}); ok {
		t.Error("no list revokes nothing")
	}
}

// The list is bounded so that it fits a control message.
func TestRevocationsBounded(t *testing.T) {
	auth := mustKey(t)
	rs := Revocations{}
	for range MaxRevocations {
		rs.List = append(rs.List, Revocation{Role: RoleClient, Name: strings.Repeat("n", 63), At: 1 << 40})
	}
	s, err := rs.Sign(auth)
	if err != nil {
		t.Fatalf("a full list of the longest names: %v", err)
	}
	if len(s) > MaxRevocationsLen {
		t.Fatalf("%d bytes", len(s))
	}
	rs.List = append(rs.List, Revocation{ID: "one-more"})
	if _, err := rs.Sign(auth); err == nil {
		t.Fatal("a list over MaxRevocations was signed")
	}
}

// FuzzParseRevocations: no input crashes the parser, and what it accepts
// is signed by the authority and within bounds.
func FuzzParseRevocations(f *testing.F) {
	auth := mustKey(f)
	good, _ := Revocations{Serial: 1, List: []Revocation{{ID: "x", At: 1}}}.Sign(auth)
	f.Add(good)
	f.Add("nlr1.e30.AAAA")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		rs, err := ParseRevocations(s, auth.Public())
		if err != nil {
			return
		}
		if !rs.Authority.Equal(auth.Public()) || len(rs.List) > MaxRevocations {
			t.Fatalf("accepted %+v", rs)
		}
	})
}
