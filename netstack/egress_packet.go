package netstack

import (
	"encoding/binary"
	"github.com/nlvpn/nlvpn/packet"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const (
	egProtoICMPv4     = 1
	egProtoICMPv6     = 58
	egIPv6FragmentHdr = 44

	egICMPv4EchoRequest = 8
	egICMPv4EchoReply   = 0
	egICMPv6EchoRequest = 128
	egICMPv6EchoReply   = 129

	egReplyTTL = 64
)

// egParseIP checks that pkt is a well-formed IPv4 or IPv6 packet as far as the
// fixed header goes and returns it trimmed to its stated length (link padding
// removed) with its network protocol number.
func egParseIP(pkt []byte) ([]byte, tcpip.NetworkProtocolNumber, bool) {
	if len(pkt) == 0 || len(pkt) > egMaxIPPacket {
		return nil, 0, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < header.IPv4MinimumSize {
			return nil, 0, false
		}
		ihl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		if ihl < header.IPv4MinimumSize || ihl > len(pkt) || total < ihl || total > len(pkt) {
			return nil, 0, false
		}
		if packet.Sum(pkt[:ihl], 0) != 0xffff {
			return nil, 0, false
		}
		return pkt[:total], header.IPv4ProtocolNumber, true
	case 6:
		if len(pkt) < header.IPv6MinimumSize {
			return nil, 0, false
		}
		total := header.IPv6MinimumSize + int(binary.BigEndian.Uint16(pkt[4:6]))
		if total > len(pkt) {
			return nil, 0, false
		}
		return pkt[:total], header.IPv6ProtocolNumber, true
	}
	return nil, 0, false
}

// echoRequest is a client's ICMP echo request, pulled out of its packet.
type egEchoRequest struct {
	v6       bool
	src, dst netip.Addr
	id, seq  uint16
	data     []byte // aliases the injected packet: copy before keeping
}

type egEchoVerdict int

const (
	egEchoNot       egEchoVerdict = iota // not an echo request: give it to the stack
	egEchoIsRequest                      // a well-formed echo request
	egEchoMalformed                      // an ICMP echo request that is broken
	egEchoFragment                       // fragmented ICMP: cannot inspect, drop
)

// egParseEcho recognizes ICMP echo requests in a packet already checked by
// egParseIP. IPv6 echo is recognized only when ICMPv6 directly follows the
// fixed header (no extension headers).
func egParseEcho(p []byte) (egEchoRequest, egEchoVerdict) {
	var r egEchoRequest
	var icmp []byte
	switch p[0] >> 4 {
	case 4:
		if p[9] != egProtoICMPv4 {
			return r, egEchoNot
		}
		flagsFrag := binary.BigEndian.Uint16(p[6:8])
		if flagsFrag&0x3fff != 0 { // MF set or non-zero offset
			return r, egEchoFragment
		}
		icmp = p[int(p[0]&0x0f)*4:]
		if len(icmp) < 8 || icmp[0] != egICMPv4EchoRequest {
			return r, egEchoNot
		}
		if icmp[1] != 0 || packet.Sum(icmp, 0) != 0xffff {
			return r, egEchoMalformed
		}
		r.src = netip.AddrFrom4([4]byte(p[12:16]))
		r.dst = netip.AddrFrom4([4]byte(p[16:20]))
	case 6:
		switch p[6] {
		case egProtoICMPv6:
		case egIPv6FragmentHdr:
			if len(p) >= 41 && p[40] == egProtoICMPv6 {
				return r, egEchoFragment
			}
			return r, egEchoNot
		default:
			return r, egEchoNot
		}
		icmp = p[header.IPv6MinimumSize:]
		if len(icmp) < 8 || icmp[0] != egICMPv6EchoRequest {
			return r, egEchoNot
		}
		r.v6 = true
		r.src = netip.AddrFrom16([16]byte(p[8:24]))
		r.dst = netip.AddrFrom16([16]byte(p[24:40]))
		if icmp[1] != 0 || packet.Sum(icmp, packet.PseudoSum6(r.src, r.dst, len(icmp), egProtoICMPv6)) != 0xffff {
			return r, egEchoMalformed
		}
	default:
		return r, egEchoNot
	}
	r.id = binary.BigEndian.Uint16(icmp[4:6])
	r.seq = binary.BigEndian.Uint16(icmp[6:8])
	r.data = icmp[8:]
	return r, egEchoIsRequest
}

// egBuildEchoReply synthesizes the IP packet answering r: from r.dst to r.src,
// with r's id, seq and data, and valid checksums.
func egBuildEchoReply(r egEchoRequest, data []byte) []byte {
	if r.v6 {
		b := make([]byte, header.IPv6MinimumSize+8+len(data))
		icmpLen := 8 + len(data)
		b[0] = 0x60
		binary.BigEndian.PutUint16(b[4:6], uint16(icmpLen))
		b[6] = egProtoICMPv6
		b[7] = egReplyTTL
		src, dst := r.dst.As16(), r.src.As16()
		copy(b[8:24], src[:])
		copy(b[24:40], dst[:])
		m := b[40:]
		m[0] = egICMPv6EchoReply
		binary.BigEndian.PutUint16(m[4:6], r.id)
		binary.BigEndian.PutUint16(m[6:8], r.seq)
		copy(m[8:], data)
		binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, packet.PseudoSum6(r.dst, r.src, icmpLen, egProtoICMPv6)))
		return b
	}
	b := make([]byte, header.IPv4MinimumSize+8+len(data))
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:4], uint16(len(b)))
	b[6] = 0x40 // DF
	b[8] = egReplyTTL
	b[9] = egProtoICMPv4
	src, dst := r.dst.As4(), r.src.As4()
	copy(b[12:16], src[:])
	copy(b[16:20], dst[:])
	binary.BigEndian.PutUint16(b[10:12], ^packet.Sum(b[:20], 0))
	m := b[20:]
	m[0] = egICMPv4EchoReply
	binary.BigEndian.PutUint16(m[4:6], r.id)
	binary.BigEndian.PutUint16(m[6:8], r.seq)
	copy(m[8:], data)
	binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, 0))
	return b
}
