package underlay

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// sendRaw queues one datagram, head followed by body, to to from the
// node's port. With wait it waits (bounded) for room in a full queue, which
// is how a peer session's packets go, so that the session is held back as
// by a blocking socket; without, it is a control datagram that may use the
// queue's small reserve. Beyond that it is dropped and counted.
func (u *Underlay) sendRaw(head, body []byte, to netip.AddrPort, wait bool) error {
	if u.w != nil {
		ok := false
		if wait {
			ok = u.w.Write2Wait(to, head, body)
		} else {
			// Probes and relay checks: never wait (pongs are sent from
			// the receive loop), but do not lose them to a queue that a
			// bulk transfer keeps full.
			ok = u.w.Write2Control(to, head, body)
		}
		if !ok {
			u.c.sendFull.Add(1)
			return errQueueFull
		}
		return nil
	}
	// No frame socket: through quic-go's transport, one write each.
	u.tmu.Lock()
	defer u.tmu.Unlock()
	u.tbuf = append(append(u.tbuf[:0], head...), body...)
	_, err := u.tr.WriteTo(u.tbuf, net.UDPAddrFromAddrPort(to))
	return err
}

// SendFrame writes a complete frame (a probe) to addr from the node's port.
func (u *Underlay) SendFrame(b []byte, to netip.AddrPort) error { return u.sendRaw(nil, b, to, false) }

// directPath is a confirmed direct path, as a session.Path.
type directPath struct {
	u      *Underlay
	remote netip.AddrPort
	via    *wideSock // the hard side's socket a wide round found, or nil: the port
}

// Send implements session.Path.
func (d *directPath) Send(id uint64, pkt []byte) error {
	hdr := wire.FrameHeader(wire.FrameDirect, id)
	if d.via != nil {
		return d.via.write(hdr[:], pkt, d.remote)
	}
	return d.u.sendRaw(hdr[:], pkt, d.remote, true)
}

// DirectConfig is one session's direct-path attempt.
type DirectConfig struct {
	ID   uint64
	Mode string // wire.ModeAuto, ModeDirect or ModeRelay
	Key  []byte // the probe key (punch.Offer.Key)
	Peer []netip.AddrPort
	Log  *slog.Logger
	// OnDirect runs after the session moved onto a confirmed direct path.
	OnDirect func(remote netip.AddrPort, took time.Duration)
	// OnLost runs after the session moved back to its fallback (the relay,
	// or nothing for a direct-only session) because the path went quiet.
	OnLost func(remote netip.AddrPort)
	// Gate and Accept are punch.Config's: the node's rules for where and
	// how often its discovery probes may go. Nil: no limit.
	Gate   func(to netip.AddrPort) bool
	Accept func(from netip.AddrPort) bool

	// The wide round (wide.go), for when the normal probing fails:
	// PeerObserved is the peer's address as the gateway saw it and
	// PeerCandidates what it announced, unscreened (only their ports are
	// read, to guess whether the peer's NAT is symmetric). Role, if set,
	// is this node's part instead of that guess. Wide, if set, is asked
	// before a round: n is the burst's pings (easy) or the extra sockets
	// (hard); false: no round. Nil: allowed (one a punch.WideEvery).
	PeerObserved   netip.AddrPort
	PeerCandidates []netip.AddrPort
	Role           punch.Role
	Wide           func(role punch.Role, n int) bool
}

// Direct is one session's direct-path lifecycle: punching, moving the
// session onto the path once confirmed and back when it is lost, and
// punching again. Written once for agent and client.
type Direct struct {
	u      *Underlay
	id     uint64
	mode   string
	p      *punch.Punch // nil in relay mode
	cancel context.CancelFunc
	cfg    DirectConfig
	log    *slog.Logger
	w      wideState

	// mu orders path changes: a confirmation (or loss) the reader was
	// already delivering when Stop ran must not set a path after it.
	mu      sync.Mutex
	stopped bool

	done   chan struct{}  // closed when punching and its wide rounds have returned (at once in relay mode)
	rounds sync.WaitGroup // the wide rounds' goroutines (started from within punching)
}

// StartDirect puts session cfg.ID on its fallback path and, unless it is
// relay-only, starts punching towards cfg.Peer until ctx ends or Stop.
func (u *Underlay) StartDirect(ctx context.Context, cfg DirectConfig) *Direct {
	u.Conn.SetPath(cfg.ID, fallback(cfg.Mode))
	log := cfg.Log
	if log == nil {
		log = u.log
	}
	d := &Direct{u: u, id: cfg.ID, mode: cfg.Mode, cancel: func() {}, cfg: cfg, log: log, done: make(chan struct{})}
	if cfg.Mode == wire.ModeRelay {
		close(d.done)
		return d
	}
	ctx, d.cancel = context.WithCancel(ctx)
	d.p = punch.New(punch.Config{
		ID: cfg.ID, Key: cfg.Key, Peer: cfg.Peer, Send: d.sendFrame, Log: log, Gate: cfg.Gate, Accept: cfg.Accept,
		Stuck:  func() { d.stuck(ctx) },
		Pinged: d.pinged,
		OnDirect: func(remote netip.AddrPort, took time.Duration) {
			if !d.setPath(&directPath{u: u, remote: remote, via: d.via(remote)}) {
				return
			}
			log.Info("The direct channel has just been established", "remote", remote, "took", took.Round(time.Millisecond))
			if cfg.OnDirect != nil {
				cfg.OnDirect(remote, took)
			}
		},
		OnLost: func(remote netip.AddrPort) {
			if !d.setPath(fallback(cfg.Mode)) {
				return
			}
			if cfg.OnLost != nil {
				cfg.OnLost(remote)
			}
		},
	})
	u.addPunch(cfg.ID, d.p)
	log.Info("Trying to create a direct (peer-to-peer) channel", "candidates", cfg.Peer)
	go func() {
		defer close(d.done)
		d.p.Run(ctx)
		d.rounds.Wait() // they end with ctx too
	}()
	return d
}

// Done is closed once punching and its wide rounds have returned after
// Stop or Close (or the end of StartDirect's ctx): from then on nothing of
// it runs.
func (d *Direct) Done() <-chan struct{} { return d.done }

// ID is the session's ID.
func (d *Direct) ID() uint64 { return d.id }

// Punch is the session's punching state; nil for a relay-only session.
func (d *Direct) Punch() *punch.Punch { return d.p }

// Remote returns the confirmed direct address and its RTT.
func (d *Direct) Remote() (netip.AddrPort, time.Duration, bool) {
	if d == nil || d.p == nil {
		return netip.AddrPort{}, 0, false
	}
	return d.p.Remote()
}

// AddPeer probes a, the peer's new address (its NAT rebound, as the
// gateway saw), at once (punch.AddPeer). It reports false for a session
// that does not punch (relay only).
func (d *Direct) AddPeer(a netip.AddrPort) bool {
	if d == nil || d.p == nil {
		return false
	}
	d.p.AddPeer(a)
	return true
}

// setPath moves the session onto p unless Stop ran; it reports whether
// it did.
func (d *Direct) setPath(p session.Path) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		return false
	}
	d.u.Conn.SetPath(d.id, p)
	return true
}

// Stop ends punching and forgets the session's probes and direct frames;
// the session stays on its fallback path (the relay, or nothing for a
// direct-only session) until punching starts again.
func (d *Direct) Stop() {
	d.stop(fallback(d.mode))
}

// Close is Stop for a session that has ended: its entry in the path table
// goes too.
func (d *Direct) Close() {
	d.stop(nil)
}

func (d *Direct) stop(p session.Path) {
	d.cancel()
	d.mu.Lock()
	d.stopped = true
	d.u.Conn.SetPath(d.id, p)
	d.mu.Unlock()
	if d.p != nil {
		d.u.removePunch(d.id, d.p)
		d.closePool(true)
	}
}

var _ session.Path = (*directPath)(nil)

// fallback is the path a session takes while it has no direct path: the
// relay (nil: session.Conn's default), or, for a direct-only session, none.
func fallback(mode string) session.Path {
	if mode == wire.ModeDirect {
		return blackhole{}
	}
	return nil
}

// blackhole is the path of a direct-only session before it has a direct
// path: nothing may go through the relay, so packets wait for QUIC to
// retransmit them once the direct path exists.
type blackhole struct{}

// Send implements session.Path.
func (blackhole) Send(uint64, []byte) error { return nil }
