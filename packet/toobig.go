package packet

import (
	"encoding/binary"
)

// TooBig builds the ICMP error that tells the sender of pkt to use packets
// of at most mtu bytes: "fragmentation needed" for IPv4 (only when pkt has
// Don't Fragment set; without it the sender allowed fragmenting, and nil is
// returned), "packet too big" for IPv6. The error claims to come from pkt's
// destination, as a router on the path would. nil means pkt is not a packet
// we can answer (malformed, or itself an ICMP error).
func TooBig(pkt []byte, mtu int) []byte {
	src, dst, ok := Addrs(pkt)
	if !ok {
		return nil
	}
	if src.Is4() {
		ihl := int(pkt[0]&0x0f) * 4
		flags := binary.BigEndian.Uint16(pkt[6:8])
		if flags&0x4000 == 0 || isICMPError4(pkt, ihl) {
			return nil
		}
		// Original header and 8 bytes of its payload (RFC 792).
		quote := pkt[:min(len(pkt), ihl+8)]
		b := make([]byte, 20+8+len(quote))
		b[0] = 0x45
		binary.BigEndian.PutUint16(b[2:4], uint16(len(b)))
		b[8] = 64 // TTL
		b[9] = 1  // ICMP
		d, s := dst.As4(), src.As4()
		copy(b[12:16], d[:])
		copy(b[16:20], s[:])
		binary.BigEndian.PutUint16(b[10:12], checksum(b[:20], 0))
		icmp := b[20:]
		icmp[0], icmp[1] = 3, 4 // destination unreachable, fragmentation needed
		binary.BigEndian.PutUint16(icmp[6:8], uint16(mtu))
		copy(icmp[8:], quote)
		binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp, 0))
		return b
	}
	if len(pkt) > 40 && pkt[6] == 58 && pkt[40] < 128 {
		return nil // never answer an ICMPv6 error with another
	}
	// As much of the original as fits the IPv6 minimum MTU (RFC 4443).
	quote := pkt[:min(len(pkt), 1280-40-8)]
	b := make([]byte, 40+8+len(quote))
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:6], uint16(8+len(quote)))
	b[6] = 58 // ICMPv6
	b[7] = 64 // hop limit
	d, s := dst.As16(), src.As16()
	copy(b[8:24], d[:])
	copy(b[24:40], s[:])
	icmp := b[40:]
	icmp[0] = 2 // packet too big
	binary.BigEndian.PutUint32(icmp[4:8], uint32(mtu))
	copy(icmp[8:], quote)
	binary.BigEndian.PutUint16(icmp[2:4], checksum(icmp, PseudoSum6(dst, src, len(icmp), 58)))
	return b
}

func isICMPError4(pkt []byte, ihl int) bool {
	if pkt[9] != 1 || len(pkt) <= ihl {
		return false
	}
	switch pkt[ihl] {
	case 3, 4, 5, 11, 12:
		return true
	}
	return false
}
