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

// Undo reverses a Configure. It is safe to call more than once.
type Undo func() error
