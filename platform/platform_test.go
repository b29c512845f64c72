package platform

import (
	"net/netip"
	"slices"
	"testing"
)

// Every machine has its loopback address, with the prefix length it was
// configured with, in plain IPv4 form.
func TestInterfacePrefixes(t *testing.T) {
	ps, err := InterfacePrefixes()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(ps, netip.MustParsePrefix("127.0.0.1/8")) {
		t.Fatalf("InterfacePrefixes = %v: no 127.0.0.1/8", ps)
	}
	for _, p := range ps {
		if !p.IsValid() || p.Addr().Is4In6() {
			t.Errorf("prefix %v: want a valid prefix, IPv4 unmapped", p)
		}
	}
}
