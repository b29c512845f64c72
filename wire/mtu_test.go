package wire

import "testing"

func TestUDPSize(t *testing.T) {
	for _, c := range []struct {
		mtu  int
		ipv6 bool
		want int // 0: an error
	}{
		{1500, false, GatewayPacketSize}, // 1472 capped: quic-go's largest packet
		{1500, true, GatewayPacketSize},  // exactly, as the budget was made for
		{1492, false, GatewayPacketSize}, // PPPoE over IPv4 loses nothing
		{1492, true, 1444},
		{1400, false, 1372},
		{1280, false, 1252},
		{1280, true, 0}, // 1232 < 1246: a peer Initial would not fit the carrier
		{1294, true, MinUDPSize},
		{1279, false, 0},
		{576, false, 0},
		{0, false, 0},
		{-1, false, 0},
		{9000, false, GatewayPacketSize},
	} {
		got, err := UDPSize(c.mtu, c.ipv6)
		if (err != nil) != (c.want == 0) || got != c.want {
			t.Errorf("UDPSize(%d, ipv6 %v) = %d, %v; want %d", c.mtu, c.ipv6, got, err, c.want)
		}
	}
}

func TestSizesFor(t *testing.T) {
	for _, c := range []struct {
		a, b int
		want Sizes
	}{
		// Two full-size ends, or ends that did not say: today's sizes.
		{0, 0, Sizes{1452, PeerPacketSize, TunMTU}},
		{1452, 0, Sizes{1452, 1406, 1368}},
		// A 1280 path on either side decides for both.
		{1252, 0, Sizes{1252, 1206, 1168}},
		{0, 1252, Sizes{1252, 1206, 1168}},
		{1252, 1372, Sizes{1252, 1206, 1168}},
		// Clamped: a lying or broken peer (or gateway) can neither push
		// a session under QUIC's minimum nor over what this side can do.
		{100, 0, Sizes{MinUDPSize, 1200, 1162}},
		{-5, 1452, Sizes{MinUDPSize, 1200, 1162}},
		{1452, 65000, Sizes{1452, 1406, 1368}},
	} {
		got := SizesFor(c.a, c.b)
		if got != c.want {
			t.Errorf("SizesFor(%d, %d) = %+v, want %+v", c.a, c.b, got, c.want)
		}
		// The budget holds on every path for what was chosen.
		if got.Peer < 1200 {
			t.Errorf("SizesFor(%d, %d): peer packets of %d < QUIC's 1200", c.a, c.b, got.Peer)
		}
		if carrier := got.UDP - quicDatagramReserve; got.Peer+FrameHeaderLen > carrier {
			t.Errorf("SizesFor(%d, %d): a frame of %d does not fit a DATAGRAM of %d", c.a, c.b, got.Peer+FrameHeaderLen, carrier)
		}
		if got.TUN+quicDatagramReserve > got.Peer {
			t.Errorf("SizesFor(%d, %d): a %d-byte IP packet does not fit a %d-byte peer packet", c.a, c.b, got.TUN, got.Peer)
		}
	}
}

func TestWireUDPSize(t *testing.T) {
	if WireUDPSize(GatewayPacketSize) != 0 {
		t.Error("a full-size node must say nothing (messages as before the field)")
	}
	if WireUDPSize(1252) != 1252 {
		t.Error("a small path must be said")
	}
}
