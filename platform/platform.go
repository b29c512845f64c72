// Package platform configures the operating system around a TUN device:
// its address and the routes that send the overlay and the agent's subnets
// into it. Each OS has its own file behind Configure.
package platform

import "net/netip"

// Config is what one tunnel needs from the OS.
type Config struct {
	Interface string         // TUN device name
	Addr      netip.Prefix   // the node's overlay address, e.g. 100.64.0.3/32
	Routes    []netip.Prefix // sent into the device, with Addr as source
}

// The underlay must never enter the tunnel. On Linux the tunnel's routes
// live in their own table, consulted before the main one, and the node's
// UDP sockets carry a firewall mark that sends them to the main table
// first: routing the agent's subnets (one day a default route) into the
// TUN can then never capture the tunnel's own packets.
const (
	// Table holds the tunnel's routes ("ip route show table 5228").
	Table = 5228
	// Mark is set on the node's UDP sockets (SO_MARK).
	Mark = 0x4e4c
	// RulePriority is the rule "not fwmark Mark lookup Table".
	RulePriority = 5228
)

// Undo reverses a Configure. It is safe to call more than once.
type Undo func() error
