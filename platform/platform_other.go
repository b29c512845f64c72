//go:build !linux

package platform

import (
	"errors"
	"net/netip"
	"runtime"
)

// Configure is not yet written for this OS.
func Configure(cfg Config) (Undo, []netip.Prefix, error) {
	return nil, nil, errors.New("TUN mode is not supported on " + runtime.GOOS + " yet; use the netstack (SOCKS5) mode")
}
