package client

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/wire"
)

// The client probes the agent where the gateway saw it (or, without that,
// at its first candidate if public), not at addresses an agent names to
// make this machine send elsewhere.
func TestAgentScreen(t *testing.T) {
	c := &Client{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ap := netip.MustParseAddrPort
	seen := ap("198.18.3.2:41000")
	for _, tt := range []struct {
		name string
		off  wire.Session
		cand netip.AddrPort
		want punch.Reason
	}{
		{"the observed address", wire.Session{PeerObserved: seen}, ap("198.18.3.2:5000"), punch.Accepted},
		{"another public address", wire.Session{PeerObserved: seen}, ap("198.18.9.9:5000"), punch.RefusedPublic},
		{"loopback", wire.Session{PeerObserved: seen}, ap("127.0.0.1:22"), punch.RefusedLoopback},
		{"metadata", wire.Session{PeerObserved: seen}, ap("169.254.169.254:80"), punch.RefusedLinkLocal},
		{"a private network this machine is not on", wire.Session{PeerObserved: seen}, ap("10.254.253.7:5000"), punch.RefusedForeignLAN},
		{"no observed: first public candidate", wire.Session{Punch: wire.Punch{Candidates: []netip.AddrPort{seen}}}, ap("198.18.3.2:5001"), punch.Accepted},
		{"no observed: a private first candidate is not public", wire.Session{Punch: wire.Punch{Candidates: []netip.AddrPort{ap("10.254.253.7:1")}}}, ap("198.18.3.2:5001"), punch.RefusedPublic},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := c.agentScreen(&tt.off).Check(tt.cand); got != tt.want {
				t.Fatalf("%v: %v, want %v", tt.cand, got, tt.want)
			}
		})
	}
}
