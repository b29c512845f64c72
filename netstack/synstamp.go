package netstack

// gVisor retransmits a SYN or SYN-ACK with the TCP timestamp (TSval) of
// the first one it sent (the handshake keeps its options and resends them
// as they were). The peer echoes that TSval, and gVisor takes the echo for
// an RTT sample: a handshake that needed one retransmission starts its
// sender with srtt ~1 s (the initial RTO) and an RTO of ~3 s. gVisor moves
// srtt by only 1/8 of an RTT's worth of ACKs per RTT, so on a lossy path,
// where early losses end in timeouts, the flow sits in multi-second
// timeouts for its whole life (issue 7: a 5 s download at ~1 Mbit/s where
// ~270 was usual). Linux stamps each retransmitted SYN-ACK afresh; we do
// it for gVisor on the way out: a repeated SYN (same addresses, ports and
// sequence number) gets the TSval gVisor's clock would give it now, which
// is the first one's plus the milliseconds since. gVisor's TSval is its
// stack clock in milliseconds plus a per-flow offset, and we read the same
// clock: since we see a SYN after gVisor stamped it, the offset we infer is
// at most the true one and our stamp never runs ahead of gVisor's clock
// (gVisor takes an echo from the future for an RTT of ~49 days).

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// synStampsMax bounds the SYNs remembered per stack. Each handshake needs
// its entry only until it completes (a few retransmissions at most), so
// when full the oldest is forgotten: a retransmission of a forgotten SYN
// keeps gVisor's stale TSval, as without this fix, and is counted.
const synStampsMax = 1024

// synKey names one SYN: the IP addresses (IPv4 in the first 8 bytes),
// ports and initial sequence number.
type synKey struct {
	addrs [32]byte
	ports uint32
	seq   uint32
}

// synStamps remembers the TSval and send time of the SYNs a stack sent and
// restamps their retransmissions. Not safe for concurrent use: the pump's
// outWriter owns it.
type synStamps struct {
	clock tcpip.Clock       // the stack's, whose milliseconds gVisor's TSvals count
	first map[synKey]uint32 // TSval minus the clock's ms when we saw the first send
	ring  []synKey          // insertion order, for forgetting the oldest (made at the first SYN)
	next  int               // ring slot of the next insertion
	// restamped counts retransmitted SYNs given a fresh TSval; forgotten
	// counts SYNs dropped from a full table (their retransmissions, if
	// any, go out stale).
	restamped, forgotten uint64
}

func newSynStamps(clock tcpip.Clock) *synStamps {
	return &synStamps{clock: clock, first: make(map[synKey]uint32)}
}

// nowMs is the stack clock's milliseconds as gVisor's TSval counts them.
func (s *synStamps) nowMs() uint32 {
	return uint32(s.clock.NowMonotonic().Sub(tcpip.MonotonicTime{}).Milliseconds())
}

// restamp looks at one outbound IP packet; if it is a TCP SYN with a
// timestamp option it is remembered, or, if it repeats one remembered, its
// TSval is set to now on the first one's clock and its checksum redone.
func (s *synStamps) restamp(pkt []byte) {
	var k synKey
	var tcp []byte
	var pseudo uint16
	switch {
	case len(pkt) >= header.IPv4MinimumSize && pkt[0]>>4 == 4:
		ihl := int(pkt[0]&0x0f) * 4
		if pkt[9] != uint8(header.TCPProtocolNumber) || ihl < header.IPv4MinimumSize || len(pkt) < ihl+header.TCPMinimumSize {
			return
		}
		if pkt[header.TCPFlagsOffset+ihl]&uint8(header.TCPFlagSyn) == 0 {
			return
		}
		copy(k.addrs[:], pkt[12:20])
		tcp = pkt[ihl:]
		pseudo = checksum.Checksum(pkt[12:20], 0)
	case len(pkt) >= header.IPv6MinimumSize+header.TCPMinimumSize && pkt[0]>>4 == 6:
		// gVisor puts no extension headers before its TCP.
		if pkt[6] != uint8(header.TCPProtocolNumber) {
			return
		}
		if pkt[header.IPv6MinimumSize+header.TCPFlagsOffset]&uint8(header.TCPFlagSyn) == 0 {
			return
		}
		copy(k.addrs[:], pkt[8:40])
		tcp = pkt[header.IPv6MinimumSize:]
		pseudo = checksum.Checksum(pkt[8:40], 0)
	default:
		return
	}
	ts := synTSval(tcp)
	if ts < 0 {
		return
	}
	k.ports = binary.BigEndian.Uint32(tcp[0:4])
	k.seq = binary.BigEndian.Uint32(tcp[4:8])
	now := s.nowMs()
	off, seen := s.first[k]
	if !seen {
		if s.ring == nil {
			s.ring = make([]synKey, synStampsMax)
		}
		if old := s.ring[s.next]; len(s.first) == synStampsMax {
			delete(s.first, old)
			s.forgotten++
		}
		s.first[k] = binary.BigEndian.Uint32(tcp[ts:]) - now
		s.ring[s.next] = k
		s.next = (s.next + 1) % synStampsMax
		return
	}
	binary.BigEndian.PutUint32(tcp[ts:], off+now)
	tcp[16], tcp[17] = 0, 0
	sum := checksum.Combine(pseudo, uint16(header.TCPProtocolNumber))
	sum = checksum.Combine(sum, uint16(len(tcp)))
	binary.BigEndian.PutUint16(tcp[16:18], ^checksum.Checksum(tcp, sum))
	s.restamped++
}

// synTSval returns the offset in the TCP segment of its timestamp option's
// TSval, or -1 if it has none (or its options are malformed).
func synTSval(tcp []byte) int {
	end := int(tcp[12]>>4) * 4
	if end < header.TCPMinimumSize || end > len(tcp) {
		return -1
	}
	for i := header.TCPMinimumSize; i < end; {
		switch tcp[i] {
		case header.TCPOptionEOL:
			return -1
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+1 >= end || tcp[i+1] < 2 || i+int(tcp[i+1]) > end {
			return -1
		}
		if tcp[i] == header.TCPOptionTS && tcp[i+1] == header.TCPOptionTSLength {
			return i + 2
		}
		i += int(tcp[i+1])
	}
	return -1
}
