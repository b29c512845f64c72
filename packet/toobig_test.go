package packet

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

func TestTooBigIPv4(t *testing.T) {
	pkt := v4("100.64.0.3", "192.168.77.10", 1500, 0)
	pkt[9] = 6                                   // TCP
	binary.BigEndian.PutUint16(pkt[6:8], 0x4000) // DF
	copy(pkt[20:28], "TCPHDR!!")
	b := TooBig(pkt, 1360)
	if b == nil {
		t.Fatal("no ICMP for a DF packet")
	}
	src, dst, ok := Addrs(b)
	if !ok || src.String() != "192.168.77.10" || dst.String() != "100.64.0.3" {
		t.Fatalf("ICMP goes %v → %v", src, dst)
	}
	if checksum(b[:20], 0) != 0 {
		t.Fatal("bad IPv4 header checksum")
	}
	m, err := icmp.ParseMessage(1, b[20:])
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != ipv4.ICMPTypeDestinationUnreachable || m.Code != 4 {
		t.Fatalf("type %v code %d", m.Type, m.Code)
	}
	if checksum(b[20:], 0) != 0 {
		t.Fatal("bad ICMP checksum")
	}
	if mtu := binary.BigEndian.Uint16(b[26:28]); mtu != 1360 {
		t.Fatalf("MTU %d", mtu)
	}
	if string(b[len(b)-8:]) != "TCPHDR!!" {
		t.Fatal("the quote lacks the first 8 bytes of the payload")
	}

	binary.BigEndian.PutUint16(pkt[6:8], 0) // no DF: the sender allows fragments
	if TooBig(pkt, 1360) != nil {
		t.Fatal("ICMP for a packet without DF")
	}
	icmpErr := v4("1.2.3.4", "5.6.7.8", 60, 0)
	icmpErr[9], icmpErr[20] = 1, 3
	binary.BigEndian.PutUint16(icmpErr[6:8], 0x4000)
	if TooBig(icmpErr, 1360) != nil {
		t.Fatal("ICMP error answered with an ICMP error")
	}
}

func TestTooBigIPv6(t *testing.T) {
	pkt := make([]byte, 1500)
	pkt[0] = 0x60
	binary.BigEndian.PutUint16(pkt[4:6], 1460)
	pkt[6] = 17
	s, d := netip.MustParseAddr("fd00::3").As16(), netip.MustParseAddr("fd77::10").As16()
	copy(pkt[8:], s[:])
	copy(pkt[24:], d[:])
	b := TooBig(pkt, 1360)
	if b == nil || len(b) > 1280 {
		t.Fatalf("got %d bytes", len(b))
	}
	src, dst, ok := Addrs(b)
	if !ok || src.String() != "fd77::10" || dst.String() != "fd00::3" {
		t.Fatalf("ICMPv6 goes %v → %v (ok %v)", src, dst, ok)
	}
	m, err := icmp.ParseMessage(58, b[40:])
	if err != nil || m.Type != ipv6.ICMPTypePacketTooBig {
		t.Fatalf("%v %v", m, err)
	}
	if mtu := m.Body.(*icmp.PacketTooBig).MTU; mtu != 1360 {
		t.Fatalf("MTU %d", mtu)
	}
	// Verify the checksum with the pseudo-header.
	if checksum(b[40:], PseudoSum6(src, dst, len(b)-40, 58)) != 0 {
		t.Fatal("bad ICMPv6 checksum")
	}
}

func FuzzTooBig(f *testing.F) {
	f.Add(v4("1.2.3.4", "5.6.7.8", 40, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r := TooBig(b, 1360); r != nil {
			if _, _, ok := Addrs(r); !ok {
				t.Fatal("built an unparseable packet")
			}
		}
	})
}
