package packet

import "net/netip"

// Sum returns the ones'-complement sum of b added to initial, folded to 16
// bits and not inverted: a region that carries a valid Internet checksum
// sums to 0xffff, and the checksum to write is ^Sum.
func Sum(b []byte, initial uint32) uint16 {
	sum := initial
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// PseudoSum6 is the unfolded sum of the IPv6 pseudo-header (RFC 8200
// section 8.1) for an upper-layer packet of length bytes and protocol proto.
func PseudoSum6(src, dst netip.Addr, length int, proto uint8) uint32 {
	var sum uint32
	s, d := src.As16(), dst.As16()
	for i := 0; i < 16; i += 2 {
		sum += uint32(s[i])<<8 | uint32(s[i+1])
		sum += uint32(d[i])<<8 | uint32(d[i+1])
	}
	return sum + uint32(length>>16) + uint32(length&0xffff) + uint32(proto)
}

// checksum is the Internet checksum of b, starting from a partial sum.
func checksum(b []byte, initial uint32) uint16 { return ^Sum(b, initial) }
