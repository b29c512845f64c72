package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
)

// AddRevocation signs each new list under the next serial, and the list
// reads back only under its authority.
func TestAddRevocationSigns(t *testing.T) {
	dir := t.TempDir()
	auth, _ := identity.Generate()
	for i, r := range []Revocation{{ID: "a1", At: 1}, {Role: token.RoleAgent, Name: "miranda", At: 2}} {
		if err := AddRevocation(dir, auth, r); err != nil {
			t.Fatal(err)
		}
		rs, signed, err := LoadRevocations(dir, auth.Public())
		if err != nil || rs.Serial != uint64(i+1) || len(rs.List) != i+1 || !strings.HasPrefix(signed, "nlr1.") {
			t.Fatalf("after %d revocations: %+v, %v", i+1, rs, err)
		}
	}
	other, _ := identity.Generate()
	if _, _, err := LoadRevocations(dir, other.Public()); err == nil {
		t.Fatal("the list was accepted under another authority")
	}
	if err := AddRevocation(dir, other, Revocation{ID: "x", At: 3}); err == nil {
		t.Fatal("another authority added to the list")
	}
}

// The unsigned revoked.json of earlier builds is not silently ignored
// (that would bring its revoked tokens back).
func TestLegacyRevocationsRefused(t *testing.T) {
	dir := t.TempDir()
	auth, _ := identity.Generate()
	if err := os.WriteFile(filepath.Join(dir, legacyRevocationsFile), []byte(`[{"id":"a1","at":1}]`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadRevocations(dir, auth.Public()); err == nil || !strings.Contains(err.Error(), "unsigned") {
		t.Fatalf("legacy list: %v", err)
	}
}
