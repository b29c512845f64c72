package punch

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"

	"golang.org/x/sys/unix"
)

// sendSegments writes several equal-size datagrams (the last may be
// shorter) to one address in one system call with UDP GSO: the kernel
// cuts buf into segments of size seg.
func sendSegments(c *net.UDPConn, buf []byte, seg int, to netip.AddrPort) error {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafePointer(&oob[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(seg))
	_, _, err := c.WriteMsgUDPAddrPort(buf, oob, to)
	return err
}

// gsoUnsupported tells a kernel or route that cannot do UDP GSO from an
// ordinary send error (a network change, a full buffer), which must not
// turn GSO off for good.
func gsoUnsupported(err error) bool {
	return errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOPROTOOPT)
}
