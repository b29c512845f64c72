package client

import (
	"net/netip"
	"testing"
)

func ipv4Packet(src, dst string) []byte {
	b := make([]byte, 28)
	b[0] = 0x45
	b[3] = 28
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:16], s[:])
	copy(b[16:20], d[:])
	return b
}

// Only what the agent may send reaches this machine: packets to our
// overlay address from the agent's overlay address, its subnets, or its
// loopback. A compromised agent cannot inject packets claiming to come
// from the internet or from our own LAN.
func TestReceiveAcceptsOnlyTheAgentsAddresses(t *testing.T) {
	var got int
	c := &Client{
		overlay: netip.MustParseAddr("100.64.0.3"),
		agentPrefixes: []netip.Prefix{
			netip.MustParsePrefix("100.64.0.2/32"), netip.MustParsePrefix("127.0.0.0/8"),
			netip.MustParsePrefix("192.168.77.0/24"),
		},
		deliver: func([]byte) { got++ },
	}
	tests := []struct {
		name     string
		pkt      []byte
		accepted bool
	}{
		{"from the LAN host", ipv4Packet("192.168.77.10", "100.64.0.3"), true},
		{"from the agent", ipv4Packet("100.64.0.2", "100.64.0.3"), true},
		{"from the agent's loopback", ipv4Packet("127.0.0.1", "100.64.0.3"), true},
		{"spoofed internet source", ipv4Packet("8.8.8.8", "100.64.0.3"), false},
		{"spoofed local LAN source", ipv4Packet("10.0.1.1", "100.64.0.3"), false},
		{"another client's address", ipv4Packet("192.168.77.10", "100.64.0.9"), false},
		{"garbage", []byte{0x45, 1, 2}, false},
	}
	for _, tt := range tests {
		before := got
		c.receive(tt.pkt)
		if accepted := got > before; accepted != tt.accepted {
			t.Errorf("%s: accepted %v, want %v", tt.name, accepted, tt.accepted)
		}
	}
	if d := c.dropForeign.Load(); d != 4 {
		t.Errorf("dropped %d, want 4 counted", d)
	}
}
