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
