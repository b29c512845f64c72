//go:build !linux

package platform

import (
	"errors"
	"net"
	"net/netip"
	"runtime"
	"syscall"
)

// Configure is not yet written for this OS.
func Configure(cfg Config) (Undo, []netip.Prefix, error) {
	return nil, nil, errors.New("TUN mode is not supported on " + runtime.GOOS + " yet; use the netstack (SOCKS5) mode")
}

// MarkSocket is not needed without the TUN mode.
func MarkSocket(c *net.UDPConn) error { return nil }

// MarkDialer does nothing here.
func MarkDialer(_, _ string, _ syscall.RawConn) error { return nil }

// IPv6Enabled reports whether a TUN device can take an IPv6 address here;
// Configure does nothing on this OS yet.
func IPv6Enabled() bool { return false }

// KernelStackID is only needed by the TUN mode.
func KernelStackID() (string, error) {
	return "", errors.New("no kernel stack ID on " + runtime.GOOS)
}
