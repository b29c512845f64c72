//go:build !linux

package platform

import (
	"errors"
	"runtime"
)

// InboundFilter is not yet written for this OS (nor is the TUN mode).
type InboundFilter struct{}

// NewInboundFilter is not yet written for this OS.
func NewInboundFilter(dev string) (*InboundFilter, error) {
	return nil, errors.New("the inbound filter is not supported on " + runtime.GOOS + " yet")
}

// Refused is always 0 here.
func (f *InboundFilter) Refused() (uint64, error) { return 0, nil }

// Remove does nothing here.
func (f *InboundFilter) Remove() error { return nil }
