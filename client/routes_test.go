package client

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestAcceptRoutes(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var ps []netip.Prefix
		for _, s := range ss {
			ps = append(ps, netip.MustParsePrefix(s))
		}
		return ps
	}
	gws := []netip.Addr{netip.MustParseAddr("198.18.1.2")}
	own := pp("10.0.1.0/24", "2001:db8:1::/64")
	for _, tc := range []struct {
		name       string
		advertised []netip.Prefix
		pol        RoutePolicy
		want       []netip.Prefix
		refusedFix []string // what each refusal tells the user to type
	}{
		{"office subnets", pp("192.168.77.0/24", "172.16.0.0/12", "2001:db8:77::/48"), RoutePolicy{}, pp("192.168.77.0/24", "172.16.0.0/12", "2001:db8:77::/48"), nil},
		{"not masked", pp("192.168.77.9/24"), RoutePolicy{}, pp("192.168.77.0/24"), nil},
		{"default route", pp("0.0.0.0/0", "::/0", "192.168.77.0/24"), RoutePolicy{}, pp("192.168.77.0/24"), []string{"--exit-node", "--exit-node"}},
		{"default route as exit node", pp("0.0.0.0/0", "::/0"), RoutePolicy{ExitNode: true}, pp("0.0.0.0/0", "::/0"), nil},
		{"accept-routes does not make an exit node", pp("0.0.0.0/0"), RoutePolicy{Accept: pp("0.0.0.0/0")}, nil, []string{"--exit-node"}},
		{"over-broad", pp("0.0.0.0/1", "2000::/3", "10.0.0.0/8"), RoutePolicy{}, nil, []string{"--accept-routes 0.0.0.0/1", "--accept-routes 2000::/3", "--accept-routes 10.0.0.0/8"}},
		{"contains the gateway", pp("198.18.0.0/15", "198.18.1.2/32"), RoutePolicy{}, nil, []string{"--accept-routes 198.18.0.0/15", "--accept-routes 198.18.1.2/32"}},
		{"overlaps own LAN", pp("10.0.0.0/16", "10.0.1.128/25", "2001:db8::/32"), RoutePolicy{}, nil, []string{"--accept-routes 10.0.0.0/16", "--accept-routes 10.0.1.128/25", "--accept-routes 2001:db8::/32"}},
		{"overlay range", pp("100.64.0.0/16", "100.127.255.0/24"), RoutePolicy{}, nil, []string{"--accept-routes 100.64.0.0/16", "--accept-routes 100.127.255.0/24"}},
		{"next to the overlay range", pp("100.128.0.0/16"), RoutePolicy{}, pp("100.128.0.0/16"), nil},
		{"accepted by the user", pp("198.18.0.0/15", "10.0.0.0/8", "0.0.0.0/1"), RoutePolicy{Accept: pp("198.18.0.0/15", "10.0.0.0/8", "0.0.0.0/1")}, pp("198.18.0.0/15", "10.0.0.0/8", "0.0.0.0/1"), nil},
		{"accepted covers narrower only", pp("10.0.0.0/8", "10.0.0.0/16"), RoutePolicy{Accept: pp("10.0.0.0/12")}, pp("10.0.0.0/16"), []string{"--accept-routes 10.0.0.0/8"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, refused := acceptRoutes(tc.advertised, tc.pol, gws, own)
			if !slices.Equal(got, tc.want) {
				t.Errorf("routed %v, want %v", got, tc.want)
			}
			var fixes []string
			for _, r := range refused {
				if r.Why == "" || !strings.Contains(r.Accept, "--") {
					t.Errorf("refusal of %s does not say why and what to type: %+v", r.Prefix, r)
				}
				fixes = append(fixes, r.Accept)
			}
			if !slices.Equal(fixes, tc.refusedFix) {
				t.Errorf("refusals tell the user %q, want %q", fixes, tc.refusedFix)
			}
		})
	}
}

func TestDNSDomains(t *testing.T) {
	got := dnsDomains([]string{"office.lan", "bad domain", "corp.example"}, []string{"office.lan", "extra.lan"})
	if strings.Join(got, ",") != "corp.example,extra.lan,office.lan" {
		t.Fatalf("dnsDomains = %q: want each valid domain once, sorted", got)
	}
	if dnsDomains(nil, nil) != nil {
		t.Fatal("no domains should mean no split DNS")
	}
}

func TestTooBroadDomain(t *testing.T) {
	for d, broad := range map[string]bool{
		"office.lan": false, "corp.example.com": false, "example.co.uk": false, "ad.internal": false,
		"com": true, "lan": true, "co.uk": true, "github.io": true, "in-addr.arpa": true, "168.192.in-addr.arpa": true, "arpa": true,
	} {
		if got := tooBroadDomain(d) != ""; got != broad {
			t.Errorf("tooBroadDomain(%q) = %q, want broad %v", d, tooBroadDomain(d), broad)
		}
	}
}
