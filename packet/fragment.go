package packet

import "encoding/binary"

// FragmentIPv4 splits the IPv4 packet pkt into fragments of at most mtu
// bytes, as a host's own stack does for a packet bigger than its link: the
// agent's netstack builds packets for a link of wire.TunMTU, and a
// session whose path is smaller carries only smaller ones. Each fragment is
// written into buf (which must hold mtu bytes; it is reused, so emit must
// copy or finish with it) and passed to emit. pkt may itself be a fragment
// (offsets and More Fragments carry over); Don't Fragment is cleared in the
// pieces. It returns false, emitting nothing, for a packet it will not
// split: not IPv4, malformed, with IP options, not over mtu, or mtu too
// small for 8 bytes of payload.
func FragmentIPv4(pkt []byte, mtu int, buf []byte, emit func(frag []byte)) bool {
	if len(pkt) < 20 || pkt[0] != 0x45 || len(pkt) <= mtu || len(buf) < mtu {
		return false
	}
	total := int(binary.BigEndian.Uint16(pkt[2:4]))
	if total != len(pkt) {
		return false
	}
	chunk := (mtu - 20) &^ 7
	if chunk < 8 {
		return false
	}
	flags := binary.BigEndian.Uint16(pkt[6:8])
	const mf, offMask = 0x2000, 0x1fff
	off0 := int(flags&offMask) * 8
	payload := pkt[20:]
	if off0+len(payload) > 0xffff {
		return false
	}
	for pos := 0; pos < len(payload); pos += chunk {
		n := min(chunk, len(payload)-pos)
		f := buf[:20+n]
		copy(f, pkt[:20])
		copy(f[20:], payload[pos:pos+n])
		binary.BigEndian.PutUint16(f[2:4], uint16(len(f)))
		fl := uint16((off0 + pos) / 8)
		if pos+n < len(payload) || flags&mf != 0 {
			fl |= mf
		}
		binary.BigEndian.PutUint16(f[6:8], fl)
		f[10], f[11] = 0, 0
		binary.BigEndian.PutUint16(f[10:12], checksum(f[:20], 0))
		emit(f)
	}
	return true
}
