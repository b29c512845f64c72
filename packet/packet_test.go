package packet

import (
	"net/netip"
	"testing"
)

func v4(src, dst string, total int, extra int) []byte {
	b := make([]byte, total+extra)
	b[0] = 0x45
	b[2], b[3] = byte(total>>8), byte(total)
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	return b
}

func TestAddrs(t *testing.T) {
	v6 := make([]byte, 48)
	v6[0] = 0x60
	v6[5] = 8
	s6, d6 := netip.MustParseAddr("fd00::1").As16(), netip.MustParseAddr("fd00::2").As16()
	copy(v6[8:], s6[:])
	copy(v6[24:], d6[:])
	tests := []struct {
		name     string
		pkt      []byte
		src, dst string
		ok       bool
	}{
		{"v4", v4("100.64.0.3", "192.168.77.10", 28, 0), "100.64.0.3", "192.168.77.10", true},
		{"v4 padded", v4("1.2.3.4", "5.6.7.8", 20, 10), "1.2.3.4", "5.6.7.8", true},
		{"v4 total beyond buffer", v4("1.2.3.4", "5.6.7.8", 20, 0)[:19], "", "", false},
		{"v4 length lies", func() []byte { b := v4("1.2.3.4", "5.6.7.8", 20, 0); b[3] = 200; return b }(), "", "", false},
		{"v4 short ihl", func() []byte { b := v4("1.2.3.4", "5.6.7.8", 20, 0); b[0] = 0x44; return b }(), "", "", false},
		{"v6", v6, "fd00::1", "fd00::2", true},
		{"v6 truncated", v6[:44], "", "", false},
		{"empty", nil, "", "", false},
		{"version 5", []byte{0x50, 0, 0, 0}, "", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src, dst, ok := Addrs(tt.pkt)
			if ok != tt.ok {
				t.Fatalf("ok = %v", ok)
			}
			if ok && (src.String() != tt.src || dst.String() != tt.dst) {
				t.Fatalf("got %v → %v", src, dst)
			}
		})
	}
}

func FuzzAddrs(f *testing.F) {
	f.Add(v4("1.2.3.4", "5.6.7.8", 20, 0))
	f.Fuzz(func(t *testing.T, b []byte) {
		src, dst, ok := Addrs(b)
		if ok && (!src.IsValid() || !dst.IsValid()) {
			t.Fatal("ok with invalid addresses")
		}
	})
}
