package client

import (
	"errors"
	"slices"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/wire"
)

// splitDNS sends the system's lookups of names under the agent's domains
// (and the user's --dns-domain ones) to the agent's DNS on its overlay
// address, through the TUN, leaving every other name alone. It returns
// undo extended by the reversal. Where the system cannot do it, the user
// hears once how to resolve those names by hand, and nothing changes.
func (c *Client) splitDNS(iface string, info *wire.PeerInfo, undo platform.Undo) platform.Undo {
	domains := dnsDomains(info.DNSDomains, c.cfg.DNSDomains)
	if len(domains) == 0 {
		return undo
	}
	revert, err := platform.ConfigureDNS(platform.SplitDNS{Interface: iface, Server: info.Overlay, Domains: domains})
	if err != nil {
		how := "dig @" + info.Overlay.String() + " host." + domains[0]
		if errors.Is(err, platform.ErrNoSplitDNS) {
			c.log.Warn("split DNS not set up; the system resolver is unchanged", "why", err, "domains", domains, "agent_dns", info.Overlay, "e.g.", how)
		} else {
			c.log.Warn("split DNS failed; the system resolver is unchanged", "err", err, "domains", domains, "agent_dns", info.Overlay, "e.g.", how)
		}
		return undo
	}
	c.log.Info("split DNS: names under these domains resolve through the agent", "domains", domains, "agent_dns", info.Overlay, "link", iface)
	return func() error { return errors.Join(revert(), undo()) }
}

// dnsDomains is the agent's domains and the user's, each once, sorted.
func dnsDomains(agent, user []string) []string {
	var out []string
	for _, d := range append(slices.Clone(agent), user...) {
		if wire.ValidDomain(d) && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}
