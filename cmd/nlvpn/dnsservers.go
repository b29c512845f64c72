package main

import (
	"fmt"
	"net/netip"

	"github.com/nlvpn/nlvpn/dnsfwd"
)

// parseDNSServers parses the agent's --dns-server values.
func parseDNSServers(ss []string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, s := range ss {
		ap, err := dnsfwd.ParseServer(s)
		if err != nil {
			return nil, fmt.Errorf("--dns-server: %w", err)
		}
		out = append(out, ap)
	}
	return out, nil
}
