package main

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
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
