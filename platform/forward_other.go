//go:build !linux

package platform

import (
	"errors"
	"net/netip"
	"runtime"
)

// Forwarding is not yet written for this OS.
type Forwarding struct{}

// ForwardingConfig configures NewForwarding.
type ForwardingConfig struct {
	Device         string
	IPv6           bool
	PerPeer, Total int
}

// ForwardingDrops are the packets the forwarding's rules dropped.
type ForwardingDrops struct{ LANStarted, Invalid, ToHost, PeerLimit, TotalLimit uint64 }

// NewForwarding is not yet written for this OS.
func NewForwarding(ForwardingConfig) (*Forwarding, error) {
	return nil, errors.New("routed egress is not supported on " + runtime.GOOS + " yet")
}

// Drops is always zero here.
func (f *Forwarding) Drops() (ForwardingDrops, error) { return ForwardingDrops{}, nil }

// Route does nothing here.
func (f *Forwarding) Route(netip.Addr) error { return nil }

// Unroute does nothing here.
func (f *Forwarding) Unroute(netip.Addr) error { return nil }

// Close does nothing here.
func (f *Forwarding) Close() error { return nil }
