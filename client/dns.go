package client

import (
	"errors"
	"slices"
	"strings"

	"golang.org/x/net/publicsuffix"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/wire"
)

// splitDNS sends the system's lookups of names under the agent's domains
// (and the user's --dns-domain ones) to the agent's DNS on its overlay
// address, through the TUN, leaving every other name alone. It returns
// undo extended by the reversal. Where the system cannot do it, the user
// hears once how to resolve those names by hand, and nothing changes.
func (c *Client) splitDNS(iface string, info *wire.PeerInfo, undo platform.Undo) platform.Undo {
	agent := info.DNSDomains[:0:0]
	for _, d := range info.DNSDomains {
		if why := tooBroadDomain(d); why != "" && !slices.Contains(c.cfg.DNSDomains, d) {
			c.log.Warn("not resolving a domain the agent names through it", "domain", d, "why", why, "to_accept", "--dns-domain "+d)
			continue
		}
		agent = append(agent, d)
	}
	domains := dnsDomains(agent, c.cfg.DNSDomains)
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

// tooBroadDomain says why an agent may not have the system's lookups
// under d sent to it without the user asking (--dns-domain d), or "":
// a top-level or other public suffix ("com", "co.uk") would hand it most
// of the machine's names, and the reverse zones every address's, which it
// could answer with addresses in its own subnets. As routes broader than
// a /8 need --accept-routes.
func tooBroadDomain(d string) string {
	switch {
	case d == "arpa" || strings.HasSuffix(d, ".arpa"):
		return "a reverse-lookup zone"
	case !strings.Contains(d, "."):
		return "a top-level domain"
	}
	if ps, _ := publicsuffix.PublicSuffix(d); ps == d {
		return "a public suffix"
	}
	return ""
}
