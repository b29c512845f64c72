package control

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/wire"
)

// The node's UDP size (wire.UDPSize: the largest UDP payload its port
// sends and receives) is the gateway connection's fixed packet size, and
// what the node's sessions are sized from. It starts at the full
// wire.GatewayPacketSize, or at the size --mtu gives (Config.UDPSize,
// then fixed). A dial that gets nowhere learns a smaller one:
//
//   - the kernel's path MTU to the gateway (platform.PathMTU), lowered by
//     an ICMP "fragmentation needed" that came back for our too-big QUIC
//     Initial: checked every pmtuCheckEvery while the dial waits, so a
//     path that says so need not wait out the handshake timeout;
//   - failing that (a path that drops big packets and says nothing, a
//     black hole), the next attempt goes at the smallest size; if that one
//     fails too the gateway is simply away, and the one after is full size
//     again.
//
// The size holds for the node's lifetime once a connection registered
// with it (a reconnect starts from it).

// pmtuCheckEvery is how often, while a dial waits, the kernel's path MTU
// is looked at (a syscall; a dial lasts 10 s at most). The kernel learns it
// from an ICMP error for one of the Initial's retransmissions, not always
// the first (the error must find our socket).
const pmtuCheckEvery = 250 * time.Millisecond

// errSmallerPath ends a dial whose packets the path cannot carry.
var errSmallerPath = errors.New("the path to the gateway has a smaller MTU")

// minUDPSize is the UDP size of a MinPathMTU IPv4 path, where a black-holed
// dial tries next.
var minUDPSize = func() int { n, _ := wire.UDPSize(wire.MinPathMTU, false); return n }()

// UDPSize is the node's UDP size now (see above).
func (c *Client) UDPSize() int { return int(c.udpSize.Load()) }

// dialQUIC dials the gateway at the node's UDP size, watching the kernel's
// path MTU meanwhile: when the kernel learns a smaller one the dial starts
// over at once with smaller packets (twice at most; within the same
// dial, so that OverAuto does not fall back to TCP meanwhile). A dial that
// fails otherwise sets the size for the next one (see above).
func (c *Client) dialQUIC(ctx context.Context, addr netip.AddrPort, dial func(context.Context, *quic.Config) (*quic.Conn, error)) (*quic.Conn, error) {
	for try := 0; ; try++ {
		qc, err, again := c.dialQUICOnce(ctx, addr, dial)
		if !again || try == 2 {
			return qc, err
		}
	}
}

// dialQUICOnce is one dial of dialQUIC; again says the kernel learned a
// smaller path MTU while it waited.
func (c *Client) dialQUICOnce(ctx context.Context, addr netip.AddrPort, dial func(context.Context, *quic.Config) (*quic.Conn, error)) (_ *quic.Conn, _ error, again bool) {
	size := c.UDPSize()
	dctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	learned := make(chan int, 1)
	if !c.fixedSize {
		go func() {
			t := time.NewTicker(pmtuCheckEvery)
			defer t.Stop()
			for {
				select {
				case <-dctx.Done():
					return
				case <-t.C:
				}
				if n := kernelUDPSize(addr.Addr()); n > 0 && n < size {
					learned <- n
					cancel(errSmallerPath)
					return
				}
			}
		}()
	}
	qc, err := dial(dctx, QUICConfigSized(size))
	if err == nil || c.fixedSize || ctx.Err() != nil {
		return qc, err, false
	}
	next := size
	select {
	case n := <-learned:
		next = n
		again = true
		if !errors.Is(err, errSmallerPath) {
			err = fmt.Errorf("%w: %w", errSmallerPath, err)
		}
	default:
		var idle *quic.IdleTimeoutError
		var hs *quic.HandshakeTimeoutError
		switch n := kernelUDPSize(addr.Addr()); {
		case n > 0 && n < size:
			next = n
		case !errors.As(err, &idle) && !errors.As(err, &hs) && !errors.Is(err, context.DeadlineExceeded):
			// Refused, unreachable: nothing to learn about sizes.
		case size > minUDPSize:
			next = minUDPSize // maybe a black hole: try small once
		default:
			next = wire.GatewayPacketSize // small failed too: the gateway is away
		}
	}
	if next != size {
		c.udpSize.Store(int32(next))
		c.log.Info("next gateway dial with another packet size", "udp_size", next, "was", size, "path_mtu_kernel", kernelPathMTU(addr.Addr()))
	}
	return nil, err, again
}

// kernelUDPSize is the UDP size the kernel's path MTU to dst allows, or 0
// when it does not know or the path is too small for a session.
func kernelUDPSize(dst netip.Addr) int {
	mtu := kernelPathMTU(dst)
	if mtu == 0 {
		return 0
	}
	n, err := wire.UDPSize(mtu, dst.Is6() && !dst.Is4In6())
	if err != nil {
		return 0
	}
	return n
}

func kernelPathMTU(dst netip.Addr) int {
	mtu, err := platform.PathMTU(dst)
	if err != nil {
		return 0
	}
	return mtu
}
