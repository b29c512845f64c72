package control

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/wire"
)

// A dial that times out at full size (a path that drops big packets and
// says nothing) is tried next at the smallest size; a failure there too
// means the gateway is away, and the size goes back to full. Errors that
// say nothing about sizes, a success, or a size fixed by --mtu change
// nothing. (The kernel's path MTU, which e2e TestSmallPathMTU exercises,
// says nothing here: loopback's MTU is large.)
func TestDialLearnsUDPSize(t *testing.T) {
	gw := netip.MustParseAddrPort("127.0.0.1:4433")
	var tried []int
	dialer := func(err error) func(context.Context, *quic.Config) (*quic.Conn, error) {
		return func(_ context.Context, qc *quic.Config) (*quic.Conn, error) {
			tried = append(tried, int(qc.InitialPacketSize))
			return nil, err
		}
	}
	timeout := &quic.IdleTimeoutError{}
	c := New(Config{Gateway: gw.String()})
	if c.UDPSize() != wire.GatewayPacketSize {
		t.Fatalf("starts at %d, want %d", c.UDPSize(), wire.GatewayPacketSize)
	}
	steps := []struct {
		err  error
		want int // UDPSize after the dial
	}{
		{errors.New("connection refused"), wire.GatewayPacketSize},
		{timeout, minUDPSize},
		{timeout, wire.GatewayPacketSize},
		{timeout, minUDPSize},
		{nil, minUDPSize}, // a success keeps what worked
	}
	for i, s := range steps {
		c.dialQUIC(context.Background(), gw, dialer(s.err))
		if c.UDPSize() != s.want {
			t.Fatalf("step %d (%v): size %d, want %d", i, s.err, c.UDPSize(), s.want)
		}
	}
	if want := []int{1452, 1452, 1252, 1452, 1252}; !slices.Equal(tried, want) {
		t.Fatalf("dialed with %v, want %v", tried, want)
	}

	fixed := New(Config{Gateway: gw.String(), UDPSize: 1300})
	tried = nil
	fixed.dialQUIC(context.Background(), gw, dialer(timeout))
	fixed.dialQUIC(context.Background(), gw, dialer(timeout))
	if fixed.UDPSize() != 1300 || !slices.Equal(tried, []int{1300, 1300}) {
		t.Fatalf("--mtu: size %d, dialed with %v; want 1300 always", fixed.UDPSize(), tried)
	}
}
