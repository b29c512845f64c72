package netstack

import (
	"encoding/binary"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/faketime"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// synTestPacket builds an IPv4 or IPv6 TCP segment with flags and, if ts,
// a timestamp option (TSval tsval) after two NOPs, as gVisor lays it out.
func synTestPacket(v6 bool, sport uint16, seq uint32, flags header.TCPFlags, ts bool, tsval uint32) []byte {
	opts := []byte{header.TCPOptionMSS, 4, 0x05, 0x00}
	if ts {
		o := []byte{header.TCPOptionNOP, header.TCPOptionNOP, header.TCPOptionTS, header.TCPOptionTSLength, 0, 0, 0, 0, 0, 0, 0, 7}
		binary.BigEndian.PutUint32(o[4:], tsval)
		opts = append(opts, o...)
	}
	tcpLen := header.TCPMinimumSize + len(opts)
	tcp := make([]byte, tcpLen)
	header.TCP(tcp).Encode(&header.TCPFields{SrcPort: sport, DstPort: 443, SeqNum: seq, AckNum: 9, DataOffset: uint8(tcpLen), Flags: flags, WindowSize: 65535})
	copy(tcp[header.TCPMinimumSize:], opts)
	var pkt []byte
	if v6 {
		pkt = make([]byte, header.IPv6MinimumSize+tcpLen)
		src, dst := tcpip.AddrFrom16([16]byte{0xfd, 15: 1}), tcpip.AddrFrom16([16]byte{0xfd, 15: 2})
		header.IPv6(pkt).Encode(&header.IPv6Fields{PayloadLength: uint16(tcpLen), TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		pkt = make([]byte, header.IPv4MinimumSize+tcpLen)
		src, dst := tcpip.AddrFrom4([4]byte{100, 64, 0, 1}), tcpip.AddrFrom4([4]byte{100, 64, 0, 2})
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(pkt)), TTL: 64, Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	copy(pkt[len(pkt)-tcpLen:], tcp)
	synTestChecksum(pkt)
	return pkt
}

// synTestTCP returns the packet's TCP segment and the sum of its pseudo-header.
func synTestTCP(pkt []byte) (header.TCP, uint16) {
	var tcp []byte
	var sum uint16
	if pkt[0]>>4 == 6 {
		tcp = pkt[header.IPv6MinimumSize:]
		sum = checksum.Checksum(pkt[8:40], 0)
	} else {
		tcp = pkt[header.IPv4MinimumSize:]
		sum = checksum.Checksum(pkt[12:20], 0)
	}
	sum = checksum.Combine(sum, uint16(header.TCPProtocolNumber))
	return header.TCP(tcp), checksum.Combine(sum, uint16(len(tcp)))
}

func synTestChecksum(pkt []byte) {
	tcp, sum := synTestTCP(pkt)
	tcp.SetChecksum(0)
	tcp.SetChecksum(^checksum.Checksum(tcp, sum))
}

func synTestTSval(t *testing.T, pkt []byte) uint32 {
	t.Helper()
	tcp, sum := synTestTCP(pkt)
	if checksum.Checksum(tcp, sum) != 0xffff {
		t.Fatalf("bad TCP checksum after restamp")
	}
	opts := header.ParseSynOptions(tcp.Options(), tcp.Flags().Contains(header.TCPFlagAck))
	if !opts.TS {
		t.Fatal("no timestamp option")
	}
	return opts.TSVal
}

// TestSynStampsRestamp: a repeated SYN or SYN-ACK (same flow and sequence
// number) goes out with the TSval of now on the first one's clock, and a
// valid checksum; first sends, other flows, data segments and SYNs without
// timestamps pass untouched.
func TestSynStampsRestamp(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		clock := faketime.NewManualClock()
		s := newSynStamps(clock)
		var ts0 uint32 = 0xfffffff0 // wraps during the test
		first := synTestPacket(v6, 1000, 77, header.TCPFlagSyn|header.TCPFlagAck, true, ts0)
		s.restamp(first)
		if got := synTestTSval(t, first); got != ts0 {
			t.Fatalf("v6=%v: first SYN-ACK restamped to %#x", v6, got)
		}
		clock.Advance(1500 * time.Millisecond)
		again := synTestPacket(v6, 1000, 77, header.TCPFlagSyn|header.TCPFlagAck, true, ts0)
		s.restamp(again)
		if got, want := synTestTSval(t, again), uint32(ts0)+1500; got != want {
			t.Fatalf("v6=%v: retransmitted SYN-ACK has TSval %#x, want %#x", v6, got, want)
		}
		// Another flow, another ISS, a data segment, a SYN without a
		// timestamp: none is a retransmission of the first.
		for _, p := range [][]byte{
			synTestPacket(v6, 1001, 77, header.TCPFlagSyn|header.TCPFlagAck, true, ts0),
			synTestPacket(v6, 1000, 78, header.TCPFlagSyn|header.TCPFlagAck, true, ts0),
			synTestPacket(v6, 1000, 77, header.TCPFlagAck, true, ts0),
			synTestPacket(v6, 1000, 77, header.TCPFlagSyn, false, 0),
		} {
			s.restamp(p)
			if tcp, _ := synTestTCP(p); header.ParseSynOptions(tcp.Options(), true).TS && synTestTSval(t, p) != ts0 {
				t.Fatalf("v6=%v: %v restamped", v6, tcp.Flags())
			}
		}
		if s.restamped != 1 || s.forgotten != 0 {
			t.Fatalf("v6=%v: restamped %d forgotten %d, want 1 0", v6, s.restamped, s.forgotten)
		}
	}
}

// TestSynStampsBounded: the table holds synStampsMax handshakes; beyond
// that the oldest are forgotten, counted, and their retransmissions go out
// as gVisor made them.
func TestSynStampsBounded(t *testing.T) {
	clock := faketime.NewManualClock()
	s := newSynStamps(clock)
	const n = synStampsMax + 10
	for i := range n {
		s.restamp(synTestPacket(false, uint16(i), 1, header.TCPFlagSyn, true, 100))
	}
	if len(s.first) != synStampsMax || s.forgotten != 10 {
		t.Fatalf("table %d forgotten %d, want %d 10", len(s.first), s.forgotten, synStampsMax)
	}
	clock.Advance(time.Second)
	old := synTestPacket(false, 0, 1, header.TCPFlagSyn, true, 100)
	s.restamp(old) // forgotten: remembered anew, not restamped
	recent := synTestPacket(false, n-1, 1, header.TCPFlagSyn, true, 100)
	s.restamp(recent)
	if synTestTSval(t, old) != 100 || synTestTSval(t, recent) != 1100 || s.restamped != 1 {
		t.Fatalf("old %d recent %d restamped %d, want 100 1100 1", synTestTSval(t, old), synTestTSval(t, recent), s.restamped)
	}
}

// FuzzSynStamps: any bytes, twice (the second time as a retransmission):
// no panic, nothing read or written out of bounds.
func FuzzSynStamps(f *testing.F) {
	f.Add(synTestPacket(false, 1, 2, header.TCPFlagSyn, true, 3))
	f.Add(synTestPacket(true, 1, 2, header.TCPFlagSyn|header.TCPFlagAck, true, 3))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		s := newSynStamps(faketime.NewManualClock())
		s.restamp(append([]byte(nil), pkt...))
		again := append([]byte(nil), pkt...)
		s.restamp(again)
		if len(again) != len(pkt) {
			t.Fatal("length changed")
		}
	})
}
