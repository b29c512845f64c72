//go:build !unix

package netstack

import "net"

// copyDownRaw: elsewhere copyDown reads with a buffer of its own.
func (f *udpFlow) copyDownRaw(net.Conn) bool { return false }
