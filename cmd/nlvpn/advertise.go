package main

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/nlvpn/nlvpn/wire"
)

// parsePrefixes reads the values of a repeatable prefix flag, each a
// prefix or several joined by commas, masked.
func parsePrefixes(flag string, values []string) ([]netip.Prefix, error) {
	var ps []netip.Prefix
	for _, v := range values {
		for _, s := range strings.Split(v, ",") {
			s = strings.TrimSpace(s)
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("%s %q: %w", flag, s, err)
			}
			ps = append(ps, p.Masked())
		}
	}
	return ps, nil
}

// parseAdvertise reads --advertise values (repeatable, or comma-separated).
// A default route makes the agent an exit for everything a client sends,
// and a loopback prefix opens this host's own services: each needs its flag
// (exitNode, allowLoopback), so that neither happens by a typo.
func parseAdvertise(values []string, exitNode, allowLoopback bool) ([]netip.Prefix, error) {
	adv, err := parsePrefixes("--advertise", values)
	if err != nil {
		return nil, err
	}
	for _, p := range adv {
		switch {
		case p.Bits() == 0 && !exitNode:
			return nil, fmt.Errorf("--advertise %s would let clients send everything out through this host; add --exit-node if that is meant", p)
		case p.Addr().IsLoopback() && !allowLoopback:
			return nil, fmt.Errorf("--advertise %s is this host's loopback; add --allow-loopback if clients should reach its local services", p)
		}
	}
	if len(adv) == 0 {
		return nil, errors.New("--advertise CIDR is required (the subnets clients may reach)")
	}
	return adv, nil
}

// parseDomains reads --dns-domain values: case and one trailing dot do
// not matter; anything that is not a plain DNS name is refused.
func parseDomains(values []string) ([]string, error) {
	if len(values) > wire.MaxDNSDomains {
		return nil, fmt.Errorf("--dns-domain: %d domains, at most %d", len(values), wire.MaxDNSDomains)
	}
	out := make([]string, 0, len(values))
	for _, v := range values {
		d := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(v)), ".")
		if !wire.ValidDomain(d) {
			return nil, fmt.Errorf("--dns-domain %q is not a domain name (e.g. office.lan)", v)
		}
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out, nil
}
