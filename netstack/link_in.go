package netstack

// The inbound half of the link: the checksum check that lets the stack skip
// its own (and so lets GRO merge segments), and the GRO engines.

import (
	"encoding/binary"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack/gro"
)

const (
	rxProtoTCP = 6
	rxProtoUDP = 17
	// rxMaxExtHeaders bounds the IPv6 extension headers walked to find TCP
	// or UDP; a packet with more is not one a client sends.
	rxMaxExtHeaders = 8
)

// groPool holds GRO engines: one per Inject call in progress, so that
// concurrent callers never share one and the steady state allocates none.
var groPool = sync.Pool{New: func() any {
	g := new(gro.GRO)
	g.Init(true)
	return g
}}

// rxTransportValid checks the TCP or UDP checksum of p, an IP packet already
// checked (and trimmed) by egParseIP. The link declares receive checksum
// offload, so the stack trusts this answer instead of checking again; that
// is what allows GRO, whose merged segments keep their first segment's
// checksum. Other protocols are left to the stack, which checks ICMP
// itself. A fragment's transport checksum covers the reassembled datagram,
// which only exists inside the stack, so fragments pass unchecked: they are
// rare, come only through the authenticated tunnel, and a bad one can only
// spoil its own sender's flow.
func rxTransportValid(p []byte) bool {
	var (
		proto uint8
		l4    []byte
		addrs []byte
	)
	switch p[0] >> 4 {
	case 4:
		if binary.BigEndian.Uint16(p[6:8])&0x3fff != 0 { // MF or an offset
			return true
		}
		proto = p[9]
		l4 = p[int(p[0]&0x0f)*4:]
		addrs = p[12:20]
	case 6:
		proto = p[6]
		off := header.IPv6MinimumSize
	walk:
		for i := 0; ; i++ {
			if i == rxMaxExtHeaders {
				return false
			}
			switch proto {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if off+8 > len(p) {
					return false
				}
				proto = p[off]
				off += (int(p[off+1]) + 1) * 8
				if off > len(p) {
					return false
				}
				continue
			case egIPv6FragmentHdr:
				if off+8 > len(p) {
					return false
				}
				if binary.BigEndian.Uint16(p[off+2:off+4]) != 0 { // offset or M set: a real fragment
					return true
				}
				proto = p[off]
				off += 8
				continue
			}
			break walk
		}
		l4 = p[off:]
		addrs = p[8:40]
	default:
		return false
	}

	switch proto {
	case rxProtoTCP:
		if len(l4) < header.TCPMinimumSize {
			return false
		}
	case rxProtoUDP:
		if len(l4) < header.UDPMinimumSize {
			return false
		}
		if p[0]>>4 == 4 && l4[6] == 0 && l4[7] == 0 {
			return true // IPv4 UDP without a checksum
		}
		// The checksum covers the datagram as its length field states;
		// the stack trims anything after it and refuses a longer claim.
		ulen := int(binary.BigEndian.Uint16(l4[4:6]))
		if ulen < header.UDPMinimumSize || ulen > len(l4) {
			return false
		}
		l4 = l4[:ulen]
	default:
		return true
	}
	sum := checksum.Combine(checksum.Checksum(addrs, 0), uint16(proto))
	sum = checksum.Combine(sum, uint16(len(l4)))
	return checksum.Checksum(l4, sum) == 0xffff
}
