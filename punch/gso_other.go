//go:build !linux

package punch

import (
	"errors"
	"net"
	"net/netip"
)

func sendSegments(*net.UDPConn, []byte, int, netip.AddrPort) error { return errNoGSO }

var errNoGSO = errors.New("no UDP GSO on this OS")

func gsoUnsupported(error) bool { return true }
