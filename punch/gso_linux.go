package punch

import (
	"encoding/binary"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// sendSegments writes several equal-size datagrams (the last may be
// shorter) to one address in one system call with UDP GSO: the kernel
// cuts buf into segments of size seg. It reports false if the kernel
// refused, so the caller can fall back to one write per datagram.
func sendSegments(c *net.UDPConn, buf []byte, seg int, to netip.AddrPort) bool {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafePointer(&oob[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(seg))
	_, _, err := c.WriteMsgUDPAddrPort(buf, oob, to)
	return err == nil
}
