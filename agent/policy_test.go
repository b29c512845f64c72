package agent

import (
	"log/slog"
	"net/netip"
	"testing"

	"github.com/nlvpn/nlvpn/policy"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func TestVerdict(t *testing.T) {
	overlay := netip.MustParseAddr("100.64.0.2")
	adv := []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24"), netip.MustParsePrefix("169.254.0.0/16"), netip.MustParsePrefix("fd00::/8")}
	host := map[netip.Addr]bool{netip.MustParseAddr("192.168.77.2"): true, netip.MustParseAddr("fd00::2"): true}
	isHost := func(ip netip.Addr) bool { return host[ip] }
	for _, tc := range []struct {
		dst      string
		proto    string
		loopback bool
		want     decision
	}{
		{"192.168.77.10:80", "tcp", false, allowed},
		{"[::ffff:192.168.77.10]:80", "tcp", false, allowed},
		{"192.168.78.10:80", "tcp", false, deniedNotAdvertised},
		{"100.64.0.2:53", "udp", false, allowedService}, // the agent's DNS service
		{"100.64.0.2:53", "tcp", false, allowedService}, // DNS over TCP
		{"100.64.0.2:54", "tcp", false, deniedLoopback}, // the overlay address is this host
		{"100.64.0.2:22", "tcp", true, allowed},         // ... with --allow-loopback
		{"127.0.0.1:22", "tcp", false, deniedLoopback},
		{"[::1]:22", "tcp", true, allowed},
		{"192.168.77.2:22", "tcp", false, deniedHostAddr}, // this host's LAN address, although advertised
		{"192.168.77.2:22", "tcp", true, deniedHostAddr},  // --allow-loopback is about loopback only
		{"[fd00::2]:22", "tcp", false, deniedHostAddr},
		{"169.254.169.254:80", "tcp", false, deniedLinkLocal}, // cloud metadata, although advertised
		{"169.254.1.1:80", "udp", false, deniedLinkLocal},
		{"[fe80::1]:80", "tcp", false, deniedLinkLocal},
		{"[fd00:ec2::254]:80", "tcp", false, deniedLinkLocal}, // AWS metadata over IPv6
		{"[fd00::10]:80", "tcp", false, allowed},
		{"224.0.0.251:5353", "udp", false, deniedLinkLocal},
		{"239.1.2.3:5000", "udp", false, deniedNotAdvertised}, // multicast is no one host
		{"[ff02::fb]:5353", "udp", true, deniedLinkLocal},
		{"[ff05::2]:5353", "udp", false, deniedNotAdvertised},
		{"255.255.255.255:67", "udp", false, deniedNotAdvertised},
	} {
		got := verdict(netip.MustParseAddrPort(tc.dst), tc.proto, overlay, adv, tc.loopback, isHost)
		if got != tc.want {
			t.Errorf("verdict(%s %s, loopback %v) = %d, want %d", tc.dst, tc.proto, tc.loopback, got, tc.want)
		}
	}
}

// TestAllowWithPolicy: with a policy, the built-in rules still hold and
// the client's first matching rule decides; this host's own addresses and
// link-local ones open only to a rule that names them, and every refusal
// is counted by reason.
func TestAllowWithPolicy(t *testing.T) {
	pol, err := policy.Parse([]byte(`
allow client:alice 192.168.77.10 80 tcp
allow group:ops    *
allow client:alice 192.168.77.2 22 tcp          # names the agent host's address
allow client:alice 169.254.169.254 80 tcp       # names the metadata address
allow *            192.168.77.0/24 * icmp
`))
	if err != nil {
		t.Fatal(err)
	}
	cur := &policy.Current{}
	cur.Store(pol)
	a := &Agent{cfg: Config{
		Advertise: []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24"), netip.MustParsePrefix("169.254.0.0/16")},
		Policy:    cur,
	}, log: slog.New(slog.DiscardHandler)}
	m := map[netip.Addr]bool{netip.MustParseAddr("192.168.77.2"): true}
	a.host.set.Store(&m)
	alice, olga, stranger := netip.MustParseAddr("100.64.0.5"), netip.MustParseAddr("100.64.0.6"), netip.MustParseAddr("100.64.0.7")
	a.clients.Store(alice, &clientState{offer: &offer{Session: &wire.Session{PeerName: "alice"}, client: &token.Claims{Name: "alice"}}})
	a.clients.Store(olga, &clientState{offer: &offer{Session: &wire.Session{PeerName: "olga"}, client: &token.Claims{Name: "olga", Groups: []string{"staff", "ops"}}}})
	for _, tc := range []struct {
		src   netip.Addr
		dst   string
		proto string
		want  bool
	}{
		{alice, "192.168.77.10:80", "tcp", true},
		{alice, "192.168.77.10:443", "tcp", false}, // policy
		{alice, "192.168.77.11:80", "tcp", false},  // policy
		{alice, "192.168.77.11:0", "icmp", true},
		{olga, "192.168.77.11:443", "tcp", true},
		{olga, "192.168.78.1:443", "tcp", false},   // not advertised: the policy cannot widen that
		{olga, "192.168.77.2:22", "tcp", false},    // "*" does not name the host's address
		{alice, "192.168.77.2:22", "tcp", true},    // her rule does
		{alice, "192.168.77.2:23", "tcp", false},   // not that port
		{olga, "169.254.169.254:80", "tcp", false}, // "*" does not name metadata
		{alice, "169.254.169.254:80", "tcp", true},
		{stranger, "192.168.77.10:80", "tcp", false}, // no session, no name: only "*" rules
		{stranger, "192.168.77.10:0", "icmp", true},
	} {
		if got := a.allow(tc.src, netip.MustParseAddrPort(tc.dst), tc.proto); got != tc.want {
			t.Errorf("allow(%s -> %s %s) = %v, want %v", tc.src, tc.dst, tc.proto, got, tc.want)
		}
	}
	got := a.denied.snapshot()
	want := map[string]uint64{"policy": 3, "not_advertised": 1, "host_address": 2, "link_local": 1, "loopback": 0}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("denied[%q] = %d, want %d (all: %v)", k, got[k], v, got)
		}
	}
	// Without a policy, every client reaches everything advertised.
	cur.Store(nil)
	if !a.allow(alice, netip.MustParseAddrPort("192.168.77.10:443"), "tcp") {
		t.Error("with the policy removed, an advertised destination is refused")
	}
}
