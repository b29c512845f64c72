// Package underlay is a node's one UDP port and everything that shares it:
// the QUIC transport that holds the gateway connection, the control client
// on it, the frames of the peer sessions (relayed through the gateway's
// port or sent directly to the peer), the hole-punch probes, and the
// virtual packet conn under the peer sessions with the QUIC transport that
// runs on it. Agent and client both stand on it.
//
// Frames move in batches: one reader takes them from the port's frame
// socket many at a time (recvmmsg, UDP GRO) into pooled buffers that are
// handed on to the sessions without a copy, and one writer sends what the
// sessions queue, trains of equal-size frames to one address as one GSO
// write (udpbatch).
package underlay

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/cowmap"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/udpbatch"
	"github.com/nlvpn/nlvpn/wire"
)

// Underlay is an open node port.
type Underlay struct {
	Ctrl  *control.Client
	Conn  *session.Conn   // under the peer sessions
	Peers *quic.Transport // the peer sessions' QUIC transport, on Conn
	Port  uint16

	log    *slog.Logger
	udp    *net.UDPConn // quic-go's socket of the port
	frames *net.UDPConn // the port's frame socket, or nil (then frames pass through tr)
	tr     *quic.Transport
	bio    *udpbatch.Conn   // frames, batched; nil without the frame socket
	w      *udpbatch.Writer // frames out; nil without the frame socket
	rx     *rxPool

	// tmu serializes frame writes through tr when there is no frame socket.
	tmu  sync.Mutex
	tbuf []byte

	punches cowmap.Map[uint64, *punch.Punch] // sessions punching, by ID

	marked   atomic.Bool  // Mark ran: the wide rounds' extra sockets get the mark too
	wideOpen atomic.Int32 // extra sockets of wide rounds open now (wide.go)

	relay  relayState
	gwAddr func() netip.AddrPort // the gateway's address now (Ctrl.GatewayAddr; tests replace it)

	stop context.CancelFunc
	done chan struct{}
	rxWG sync.WaitGroup

	c counters
}

// counters are the port's drops, by where.
type counters struct {
	unknown   atomic.Uint64 // frames for a session nobody punches for
	malformed atomic.Uint64 // not a frame, or a kind that has no business here
	foreign   atomic.Uint64 // relay frames not from the gateway's address
	misrouted atomic.Uint64 // QUIC packets that reached the frame socket (GRO merged them into a train of frames)
	sendFull  atomic.Uint64 // frames dropped on a full write queue
}

// Open opens the port and builds the layers on it. cfg is the control
// client's configuration; Open fills in its Transport and OnRelay.
func Open(cfg control.Config) (*Underlay, error) {
	udp, frames, err := platform.ListenUDPPair(":0")
	if err != nil {
		return nil, fmt.Errorf("open UDP socket: %w", err)
	}
	return open(cfg, udp, frames)
}

// open builds the layers on the port's sockets (frames may be nil).
func open(cfg control.Config, udp, frames *net.UDPConn) (u *Underlay, err error) {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	u = &Underlay{log: log, udp: udp, frames: frames, Port: uint16(udp.LocalAddr().(*net.UDPAddr).Port)}
	if frames != nil {
		if u.bio, err = udpbatch.New(frames, rxBatch); err != nil {
			frames.Close()
			udp.Close()
			return nil, fmt.Errorf("frame socket: %w", err)
		}
		u.w = udpbatch.NewWriter(u.bio)
		size := 2048
		if u.bio.GRO() {
			size = udpbatch.MaxTrain
		}
		u.rx = newRxPool(size, rxBuffers)
	}
	u.relay.kickCh = make(chan struct{}, 1)
	u.tr = &quic.Transport{Conn: udp}
	cfg.Transport = u.tr
	onUp := cfg.OnUp
	cfg.OnUp = func(ctx context.Context, w *wire.Welcome) {
		u.relay.kick() // a new gateway connection: check the relay frames' way at once
		if onUp != nil {
			onUp(ctx, w)
		}
	}
	cfg.OnRelay = func(id uint64, pkt []byte) {
		u.relay.in.Add(1)
		u.Conn.Deliver(id, pkt)
	}
	if cfg.DialTCP == nil {
		// The gateway over TCP bypasses the tunnel's routes as the port does.
		cfg.DialTCP = func(ctx context.Context, network, addr string) (net.Conn, error) {
			d := &net.Dialer{}
			if u.marked.Load() {
				d.Control = platform.MarkDialer
			}
			return d.DialContext(ctx, network, addr)
		}
	}
	u.Ctrl = control.New(cfg)
	u.gwAddr = u.Ctrl.GatewayAddr
	u.Conn = session.NewConn(relayPath{u})
	u.Peers = &quic.Transport{Conn: u.Conn}
	return u, nil
}

// Mark sets the bypass mark on the port's sockets, so that routes the
// client adds into its TUN can never capture the tunnel's own packets.
func (u *Underlay) Mark() error {
	if err := platform.MarkSocket(u.udp); err != nil {
		return err
	}
	u.marked.Store(true)
	if u.frames != nil {
		return platform.MarkSocket(u.frames)
	}
	return nil
}

// Start runs the gateway connection, the frame reader and writer, and the
// relay check. They do not stop with ctx's parent: at exit a node first
// says goodbye on its sessions, and those goodbyes travel on these paths;
// Stop ends them afterwards. The returned channel yields the control
// client's result (a refusal the node cannot get past).
func (u *Underlay) Start() <-chan error {
	ctx, cancel := context.WithCancel(context.Background())
	u.stop = cancel
	u.done = make(chan struct{})
	runErr := make(chan error, 1)
	u.startFrames(ctx)
	go func() {
		runErr <- u.Ctrl.Run(ctx)
		close(u.done)
	}()
	return runErr
}

// startFrames runs the frame reader and writer and the relay check until
// ctx ends.
func (u *Underlay) startFrames(ctx context.Context) {
	u.rxWG.Add(1)
	go func() { defer u.rxWG.Done(); u.readFrames(ctx) }()
	if u.bio != nil {
		// Frames also reach quic-go's socket now and then: the kernel
		// may pick a socket of the pair before the steering program runs
		// (UDP GRO's lookup does), and quic-go queues what is not QUIC.
		// Take them from there too rather than let them rot in its queue.
		u.rxWG.Add(1)
		go func() { defer u.rxWG.Done(); u.readFramesThroughQUIC(ctx) }()
	}
	if u.w != nil {
		wdone := make(chan struct{})
		go func() { u.w.Run(ctx); close(wdone) }()
		// Close the frame socket (ending the reader) once the writer has
		// sent what was queued.
		context.AfterFunc(ctx, func() { <-wdone; u.frames.Close() })
	}
	go u.checkRelay(ctx)
}

// Flush waits, at most d, until frames queued on either path are out: a
// session's goodbye must not die in a queue at exit.
func (u *Underlay) Flush(d time.Duration) {
	if u.w != nil {
		u.w.Flush(d)
	}
	u.Ctrl.Flush(d)
	time.Sleep(20 * time.Millisecond) // the frame the sender holds right now
}

// Stop ends what Start started, waiting (briefly) until the gateway
// connection has said goodbye too.
func (u *Underlay) Stop() {
	if u.stop == nil {
		return
	}
	u.stop()
	select {
	case <-u.done:
	case <-time.After(2 * time.Second):
	}
}

// Close closes the peer sessions, the gateway connection and the sockets.
func (u *Underlay) Close() {
	u.Peers.Close()
	u.tr.Close()
	if u.frames != nil {
		u.frames.Close()
	}
	u.udp.Close()
	u.rxWG.Wait()
}
