package packet

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// udp4 is an IPv4 UDP packet of total bytes with DF set and a counting
// payload.
func udp4(total int) []byte {
	p := make([]byte, total)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:4], uint16(total))
	binary.BigEndian.PutUint16(p[4:6], 0x1234)
	p[6] = 0x40 // DF
	p[8], p[9] = 64, 17
	copy(p[12:16], []byte{100, 64, 0, 2})
	copy(p[16:20], []byte{100, 64, 0, 3})
	for i := 20; i < total; i++ {
		p[i] = byte(i)
	}
	binary.BigEndian.PutUint16(p[10:12], checksum(p[:20], 0))
	return p
}

// reassemble puts fragments back together by offset, checking each header.
func reassemble(t *testing.T, frags [][]byte) (payload []byte, lastMF bool) {
	t.Helper()
	for i, f := range frags {
		if Sum(f[:20], 0) != 0xffff {
			t.Fatalf("fragment %d: bad header checksum", i)
		}
		if int(binary.BigEndian.Uint16(f[2:4])) != len(f) {
			t.Fatalf("fragment %d: total length %d, is %d", i, binary.BigEndian.Uint16(f[2:4]), len(f))
		}
		fl := binary.BigEndian.Uint16(f[6:8])
		if fl&0x4000 != 0 {
			t.Fatalf("fragment %d keeps DF", i)
		}
		if off := int(fl&0x1fff) * 8; off != len(payload) {
			t.Fatalf("fragment %d at offset %d, want %d", i, off, len(payload))
		}
		if i < len(frags)-1 && fl&0x2000 == 0 {
			t.Fatalf("fragment %d of %d without More Fragments", i, len(frags))
		}
		lastMF = fl&0x2000 != 0
		payload = append(payload, f[20:]...)
	}
	return payload, lastMF
}

func TestFragmentIPv4(t *testing.T) {
	for _, c := range []struct{ total, mtu, want int }{
		{1368, 1168, 2},
		{1169, 1168, 2},
		{1428, 1168, 2},
		{3000, 1168, 3},
		{65535, 1168, 58},
	} {
		pkt := udp4(c.total)
		buf := make([]byte, c.mtu)
		var frags [][]byte
		ok := FragmentIPv4(pkt, c.mtu, buf, func(f []byte) {
			if len(f) > c.mtu {
				t.Fatalf("a %d-byte fragment over the MTU %d", len(f), c.mtu)
			}
			frags = append(frags, bytes.Clone(f))
		})
		if !ok || len(frags) != c.want {
			t.Fatalf("%d bytes at MTU %d: ok %v, %d fragments, want %d", c.total, c.mtu, ok, len(frags), c.want)
		}
		got, lastMF := reassemble(t, frags)
		if lastMF || !bytes.Equal(got, pkt[20:]) {
			t.Fatalf("%d bytes at MTU %d: reassembled payload differs (last MF %v)", c.total, c.mtu, lastMF)
		}
	}
	// A fragment split again keeps its offset and its More Fragments.
	pkt := udp4(1368)
	binary.BigEndian.PutUint16(pkt[6:8], 0x2000|100) // MF, offset 800
	pkt[10], pkt[11] = 0, 0
	binary.BigEndian.PutUint16(pkt[10:12], checksum(pkt[:20], 0))
	var frags [][]byte
	FragmentIPv4(pkt, 1168, make([]byte, 1168), func(f []byte) { frags = append(frags, bytes.Clone(f)) })
	if len(frags) != 2 || binary.BigEndian.Uint16(frags[0][6:8])&0x1fff != 100 || binary.BigEndian.Uint16(frags[1][6:8]) != 0x2000|(100+1144/8) {
		t.Fatalf("re-fragmenting a fragment: %d pieces, flags %x", len(frags), binary.BigEndian.Uint16(frags[len(frags)-1][6:8]))
	}
	// Not split: fits, not IPv4, options, bad length, tiny MTU.
	opt := udp4(1400)
	opt[0] = 0x46
	short := udp4(1400)
	binary.BigEndian.PutUint16(short[2:4], 1300)
	v6 := udp4(1400)
	v6[0] = 0x60
	for name, c := range map[string]struct {
		pkt []byte
		mtu int
	}{"fits": {udp4(1168), 1168}, "options": {opt, 1168}, "length": {short, 1168}, "ipv6": {v6, 1168}, "tiny mtu": {udp4(100), 27}} {
		if FragmentIPv4(c.pkt, c.mtu, make([]byte, 2000), func([]byte) { t.Fatalf("%s: emitted", name) }) {
			t.Fatalf("%s: split", name)
		}
	}
}

func FuzzFragmentIPv4(f *testing.F) {
	f.Add(udp4(1400), 1168)
	f.Add(udp4(60), 40)
	f.Fuzz(func(t *testing.T, pkt []byte, mtu int) {
		if mtu < 0 || mtu > 70000 {
			return
		}
		buf := make([]byte, mtu)
		var frags [][]byte
		ok := FragmentIPv4(pkt, mtu, buf, func(fr []byte) {
			if len(fr) > mtu {
				t.Fatalf("fragment of %d over MTU %d", len(fr), mtu)
			}
			frags = append(frags, bytes.Clone(fr))
		})
		if !ok {
			if len(frags) != 0 {
				t.Fatal("emitted but returned false")
			}
			return
		}
		got, _ := reassemble(t, frags)
		if !bytes.Equal(got, pkt[20:]) {
			t.Fatal("reassembled payload differs")
		}
	})
}
