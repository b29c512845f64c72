package underlay

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// The wide round (punch/wide.go says what and why) as the underlay runs it:
// the easy side's burst goes out of the node's one port like any probe; the
// hard side's extra sockets are opened here, and the one the easy side's
// burst reaches becomes the session's socket for that peer address (its
// probes and direct frames go out through it and what it receives is
// handled as the port's frames are). The others close at once, and all of
// them after wideTTL without a hit.

// maxWideSockets bounds the extra sockets open at once on one port, over
// all its sessions: at most four rounds at a time.
const maxWideSockets = 4 * punch.HardSockets

// Timing of a round: the easy side waits wideDelay before its burst so the
// hard side's mappings are open when it arrives (both start WideAfter into
// attempts that began within a round trip of each other); the hard side
// opens its sockets one every wideOpenEvery and keeps them wideTTL.
var (
	wideDelay     = 500 * time.Millisecond
	wideOpenEvery = time.Millisecond
	wideTTL       = 9 * time.Second
)

// wideSock is an extra socket of the hard side.
type wideSock struct {
	c   *net.UDPConn
	mu  sync.Mutex
	buf []byte
}

func (w *wideSock) write(head, body []byte, to netip.AddrPort) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(append(w.buf[:0], head...), body...)
	_, err := w.c.WriteToUDPAddrPort(w.buf, to)
	return err
}

// wideState is one Direct's wide rounds.
type wideState struct {
	mu      sync.Mutex
	last    time.Time // when the last round started
	pool    []*wideSock
	adopted *wideSock // the hard side's socket for adoptedTo, once hit
	to      netip.AddrPort
	closed  bool

	// The last round's part and the peer's IP it aimed at, and the pings
	// the easy side sent in it to confirm a hit that came its way (pinged).
	role     punch.Role
	peerIP   netip.Addr
	confirms int

	rounds, probes, sockets atomic.Uint64
}

// WideStats counts a session's wide rounds, the pings sent (easy side:
// the burst's and those confirming a hit, pinged) and the extra sockets
// opened (hard side).
type WideStats struct{ Rounds, Probes, Sockets uint64 }

// Wide returns the session's wide-round counts.
func (d *Direct) Wide() WideStats {
	if d == nil {
		return WideStats{}
	}
	return WideStats{Rounds: d.w.rounds.Load(), Probes: d.w.probes.Load(), Sockets: d.w.sockets.Load()}
}

// sendFrame is the session's punch.Config.Send: through the adopted
// socket to its peer address, the node's port otherwise.
func (d *Direct) sendFrame(b []byte, to netip.AddrPort) error {
	if s := d.via(to); s != nil {
		return s.write(nil, b, to)
	}
	return d.u.SendFrame(b, to)
}

// via is the adopted socket if to is its peer address.
func (d *Direct) via(to netip.AddrPort) *wideSock {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	if d.w.adopted != nil && d.w.to == to {
		return d.w.adopted
	}
	return nil
}

// role is this node's part in a round.
func (d *Direct) role() punch.Role {
	if d.cfg.Role != punch.RoleNone {
		return d.cfg.Role
	}
	w := d.u.Ctrl.Welcome()
	if w == nil {
		return punch.RoleNone
	}
	return punch.WideRole(w.Observed, d.u.Port, d.cfg.PeerObserved, d.cfg.PeerCandidates)
}

// stuck is the punch's Stuck: the normal probing failed this attempt.
// A round starts if this node has a part in one, none ran for this
// session in the last punch.WideEvery, and the budget (cfg.Wide) allows.
func (d *Direct) stuck(ctx context.Context) {
	role := d.role()
	peer := d.cfg.PeerObserved
	if role == punch.RoleNone || !peer.IsValid() {
		return
	}
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	d.w.mu.Lock()
	if d.w.closed || d.w.adopted != nil || (!d.w.last.IsZero() && time.Since(d.w.last) < punch.WideEvery) {
		d.w.mu.Unlock()
		return
	}
	d.w.last = time.Now()
	d.w.mu.Unlock()
	n := punch.BurstProbes
	if role == punch.RoleHard {
		n = punch.HardSockets
	}
	if d.cfg.Wide != nil && !d.cfg.Wide(role, n) {
		d.log.Info("no wide round for now (its budget is spent)", "role", role)
		return
	}
	d.w.rounds.Add(1)
	d.w.mu.Lock()
	d.w.role, d.w.peerIP, d.w.confirms = role, peer.Addr(), 0
	d.w.mu.Unlock()
	d.rounds.Add(1) // stuck runs inside punching, so before Done's Wait
	go func() {
		defer d.rounds.Done()
		if role == punch.RoleEasy {
			d.burst(ctx, peer.Addr(), n)
		} else {
			d.openWide(ctx, peer, n)
		}
	}()
}

// burst is the easy side's part: n pings to random ports of ip.
func (d *Direct) burst(ctx context.Context, ip netip.Addr, n int) {
	start := time.Now()
	d.log.Info("the direct channel needs more: probing many ports of the peer (its NAT looks symmetric)", "role", "easy", "ip", ip, "probes", n, "rate", punch.BurstRate)
	select {
	case <-ctx.Done():
		return
	case <-time.After(wideDelay):
	}
	direct := func() bool { _, _, ok := d.p.Remote(); return ok }
	sent := punch.Burst(ctx, punch.RandomPorts(ip, n), punch.BurstRate, func(a netip.AddrPort) {
		d.w.probes.Add(1)
		d.p.PingVia(a, d.u.SendFrame)
	}, direct)
	d.log.Info("wide round over", "role", "easy", "probes_sent", sent, "direct", direct(), "took", time.Since(start).Round(time.Millisecond))
}

// openWide is the hard side's part: up to n extra sockets, each pinging
// peer once to open a mapping its way, kept until one is hit or wideTTL.
func (d *Direct) openWide(ctx context.Context, peer netip.AddrPort, n int) {
	start := time.Now()
	// Take the sockets from the port's bound first.
	for {
		open := d.u.wideOpen.Load()
		n = min(n, maxWideSockets-int(open))
		if n <= 0 {
			d.log.Info("no wide round: the port's extra sockets are all in use", "max", maxWideSockets)
			return
		}
		if d.u.wideOpen.CompareAndSwap(open, open+int32(n)) {
			break
		}
	}
	d.log.Info("the direct channel needs more: opening many ports toward the peer (our NAT looks symmetric)", "role", "hard", "peer", peer, "sockets", n)
	ctx, cancel := context.WithTimeout(ctx, wideTTL)
	defer cancel()
	opened := 0
	for ; opened < n && ctx.Err() == nil && !d.hit(); opened++ {
		c, err := net.ListenUDP("udp", &net.UDPAddr{})
		if err != nil {
			d.log.Info("wide round: could not open a socket", "err", err)
			break
		}
		if d.u.marked.Load() {
			if err := platform.MarkSocket(c); err != nil {
				c.Close()
				break
			}
		}
		s := &wideSock{c: c}
		d.w.mu.Lock()
		if d.w.closed {
			d.w.mu.Unlock()
			c.Close()
			break
		}
		d.w.pool = append(d.w.pool, s)
		d.w.mu.Unlock()
		d.w.sockets.Add(1)
		go d.readWide(s)
		d.p.PingVia(peer, func(b []byte, to netip.AddrPort) error { return s.write(nil, b, to) })
		select {
		case <-ctx.Done():
		case <-time.After(wideOpenEvery):
		}
	}
	d.u.wideOpen.Add(int32(opened - n)) // what was reserved and not opened
	<-ctx.Done()
	d.closePool(false)
	d.log.Info("wide round over", "role", "hard", "sockets_opened", opened, "hit", d.hit(), "took", time.Since(start).Round(time.Millisecond))
}

// hit reports whether a round found the path (a socket was adopted).
func (d *Direct) hit() bool {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	return d.w.adopted != nil
}

// closePool closes the round's sockets but the adopted one (all of them,
// with all: the session ended).
func (d *Direct) closePool(all bool) {
	d.w.mu.Lock()
	pool := d.w.pool
	d.w.pool = nil
	keep := d.w.adopted
	if all {
		d.w.closed = true
		d.w.adopted = nil
	}
	d.w.mu.Unlock()
	n := 0
	for _, s := range pool {
		if s != keep {
			s.c.Close()
			n++
		}
	}
	if all && keep != nil {
		keep.c.Close()
		n++
	}
	d.u.wideOpen.Add(-int32(n))
}

// adopt makes s the session's socket for to, the first time an authentic
// probe from the peer reaches one of the round's sockets; it reports
// whether s is (now or already) that socket.
func (d *Direct) adopt(s *wideSock, to netip.AddrPort) (is, first bool) {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	if d.w.closed {
		return false, false
	}
	if d.w.adopted == nil {
		d.w.adopted, d.w.to = s, to
		return true, true
	}
	return d.w.adopted == s, false
}

// confirmPings bounds the pings the hard side sends through the socket a
// round found, to confirm the path its own way (the peer confirmed it
// already, by our pong). They are the round's, outside Config.Gate: the
// agent's discovery budget may be spent by then, and a direct-only session
// can send nothing until its path is confirmed.
const confirmPings = 8

// confirm pings to through the adopted socket, punch.ProbeInterval apart,
// until the path is confirmed (at most confirmPings).
func (d *Direct) confirm(to netip.AddrPort) {
	for range confirmPings {
		if _, _, ok := d.p.Remote(); ok || d.via(to) == nil {
			return
		}
		d.p.PingVia(to, d.sendFrame)
		time.Sleep(punch.ProbeInterval)
	}
}

// pinged is the punch's Pinged: an authentic ping came from from and was
// answered, and no path is confirmed. On the easy side of a wide round, a
// ping from the peer's IP comes from one of the hard side's extra sockets,
// through a mapping of our NAT that our burst opened. The burst's own ping
// to that port may have been lost: it reached the hard side's NAT before
// that socket had its mapping there, and so the socket's first ping
// crossed it. Then our pong confirms the path at the hard side (whose
// confirming pings stop) but nothing confirms it here: our discovery pings
// may be out of budget by now (Config.Gate: the agent's, before its session
// is live), and a direct-only session would wait on nothing until its
// end-to-end handshake timed out. So a ping back, through the node's port
// as the burst's went: at most confirmPings a round, outside Gate, as the
// hard side's confirming pings are.
func (d *Direct) pinged(from netip.AddrPort) {
	d.w.mu.Lock()
	ok := !d.w.closed && d.w.role == punch.RoleEasy && from.Addr() == d.w.peerIP && d.w.confirms < confirmPings
	if ok {
		d.w.confirms++
	}
	first := d.w.confirms == 1
	d.w.mu.Unlock()
	if !ok {
		return
	}
	if first {
		d.log.Info("wide round: the peer pinged us from its IP before our path was confirmed; pinging it back to confirm the path our way", "role", "easy", "peer", from)
	}
	d.w.probes.Add(1)
	d.p.PingVia(from, d.u.SendFrame)
}

// readWide reads an extra socket until it closes. Until a socket is
// adopted only the peer's authentic probes count (one adopts this
// socket); the adopted socket's datagrams are then the port's frames.
func (d *Direct) readWide(s *wideSock) {
	buf := make([]byte, 2048)
	var out []session.Inbound
	for {
		n, from, err := s.c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		b := buf[:n]
		kind, id, payload, err := wire.ParseFrame(b)
		if err != nil || id != d.id || (kind != wire.FrameProbe && kind != wire.FrameDirect) {
			continue
		}
		if kind == wire.FrameProbe {
			if !d.p.Authentic(b[:wire.FrameHeaderLen], payload) || (d.cfg.Accept != nil && !d.cfg.Accept(from)) {
				continue
			}
			is, first := d.adopt(s, from)
			if !is {
				continue
			}
			if first {
				d.log.Info("wide round: the peer's probe found one of our ports; the direct channel goes through it", "peer", from, "local", s.c.LocalAddr(), "probe", punch.ProbeKind(payload))
				d.closePool(false)
				d.p.AddPeer(from) // the peer's address first among the candidates
				go d.confirm(from)
			}
		} else if d.via(from) != s {
			continue
		}
		out = out[:0]
		if d.u.handleFrame(b, from, &out) {
			out[0].Data = append([]byte(nil), out[0].Data...)
			d.u.Conn.DeliverBatch(out)
		}
	}
}
