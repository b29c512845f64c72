package agent

import (
	"net/netip"
	"testing"
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
		{"100.64.0.2:53", "udp", false, allowed},        // the agent's DNS service
		{"100.64.0.2:53", "tcp", false, deniedLoopback}, // the overlay address is this host
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
	} {
		got := verdict(netip.MustParseAddrPort(tc.dst), tc.proto, overlay, adv, tc.loopback, isHost)
		if got != tc.want {
			t.Errorf("verdict(%s %s, loopback %v) = %d, want %d", tc.dst, tc.proto, tc.loopback, got, tc.want)
		}
	}
}
