//go:build !linux

package punch

import (
	"net"
	"net/netip"
)

func sendSegments(*net.UDPConn, []byte, int, netip.AddrPort) bool { return false }
