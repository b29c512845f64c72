//go:build !unix

package netstack

import (
	"net"
	"net/netip"

	"golang.org/x/net/icmp"
)

// egEchoWriter sends with WriteTo where there is no non-blocking sendto.
type egEchoWriter struct {
	c   *icmp.PacketConn
	raw bool
}

func egNewEchoSender(c *icmp.PacketConn, _, raw bool) (egEchoSender, error) {
	return egEchoWriter{c: c, raw: raw}, nil
}

func (w egEchoWriter) send(msg []byte, dst netip.Addr) error {
	var to net.Addr = &net.IPAddr{IP: dst.AsSlice()}
	if !w.raw {
		to = &net.UDPAddr{IP: dst.AsSlice()}
	}
	_, err := w.c.WriteTo(msg, to)
	return err
}
