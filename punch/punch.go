// Package punch makes and keeps a direct UDP path between two NATed nodes:
// it probes the peer's candidate addresses from the node's one shared
// socket (the one whose NAT mapping the gateway observed), confirms the
// first pair that answers, holds the NAT mapping open with keepalives,
// and reports when the path stops answering so the session falls back to
// the relay. Probes carry a MAC under a key only the two nodes hold.
package punch

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// Probe message, after the wire frame header: type, nonce, MAC.
const (
	probePing = 1
	probePong = 2
	macLen    = 16
	probeLen  = 1 + 8 + macLen
)

// ProbeFrameLen is the UDP payload of one probe (ping, pong or keepalive):
// 34 bytes. Budgets of probes are budgets of these.
const ProbeFrameLen = wire.FrameHeaderLen + probeLen

// Timing. Probes go out fast while punching (NAT mappings are made by the
// first packets each way); once direct, a keepalive a second holds the
// mapping and notices loss within LossAfter.
var (
	ProbeInterval     = 200 * time.Millisecond
	AttemptDuration   = 8 * time.Second
	KeepaliveInterval = 1 * time.Second
	LossAfter         = 3500 * time.Millisecond
	MaxBackoff        = 60 * time.Second
	// WideAfter is how long an attempt probes the candidates alone before
	// it calls Config.Stuck: a cone NAT opens in a round trip, so a path
	// not confirmed by then will not be by these probes.
	WideAfter = 3 * time.Second
)

// MaxCandidates bounds the addresses probed for one peer, learned ones included.
const MaxCandidates = 16

// Config configures one session's punching.
type Config struct {
	ID   uint64
	Key  []byte           // probe MAC key (Offer.Key)
	Peer []netip.AddrPort // the peer's candidates, already filtered (Usable)
	// Send writes one raw frame to addr from the shared socket.
	Send func(b []byte, to netip.AddrPort) error
	// OnDirect is called when a direct path is confirmed.
	OnDirect func(remote netip.AddrPort, took time.Duration)
	// OnLost is called when the confirmed path stops answering.
	OnLost func(remote netip.AddrPort)
	// Gate, if set, is asked before each discovery probe (a ping while
	// punching, to an address that has not answered yet); false: the
	// probe is not sent, and counted (Limited). Keepalives to the
	// confirmed path and pongs, which answer the peer's own pings one for
	// one, are not discovery.
	Gate func(to netip.AddrPort) bool
	// Accept, if set, screens the address an authenticated ping came from:
	// one it refuses is neither answered nor learned as a candidate. The
	// peer holds the MAC key, so a peer that can forge its source address
	// could otherwise aim our pongs and probes anywhere.
	Accept func(from netip.AddrPort) bool
	// Stuck, if set, is called once per attempt, WideAfter into it, while
	// no path is confirmed: the normal probing failed, and the caller may
	// try the wide round (wide.go) while the attempt goes on.
	Stuck func()
	// Pinged, if set, is called after an authentic ping from from was
	// answered while no path is confirmed. The pong confirms the path at
	// the peer, not here: that takes a ping of ours answered from there,
	// which Gate may refuse. The wide round's easy side sends one
	// (underlay's wide.go). It runs on the receive path: it must not block.
	Pinged func(from netip.AddrPort)
	Log    *slog.Logger
}

// Punch is one session's direct-path state.
type Punch struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	cands     []netip.AddrPort
	sent      map[uint64]sentPing // our outstanding ping nonces
	remote    netip.AddrPort      // confirmed path, if any
	lastHeard time.Time
	rtt       time.Duration
	start     time.Time
	wake      chan struct{}
	kick      chan struct{} // AddPeer: probe now

	dropBadMAC, dropMalformed uint64
	pingsHeard, pingsSent     uint64
	limited, refusedFrom      uint64
}

// Stats counts probes: valid pings heard from the peer and pings sent.
// A direct attempt that failed with pingsHeard == 0 means nothing the peer
// sent got through our NAT or its.
func (p *Punch) Stats() (heard, sent uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pingsHeard, p.pingsSent
}

// Limited returns the discovery probes Gate refused and the pings not
// answered because Accept refused where they came from.
func (p *Punch) Limited() (gated, refusedFrom uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.limited, p.refusedFrom
}

// Candidates returns the addresses being probed.
func (p *Punch) Candidates() []netip.AddrPort {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]netip.AddrPort(nil), p.cands...)
}

// sentPing is one of our pings awaiting its pong.
type sentPing struct {
	at time.Time
	to netip.AddrPort
}

// New prepares punching; Run does it.
func New(cfg Config) *Punch {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	p := &Punch{cfg: cfg, log: cfg.Log, sent: make(map[uint64]sentPing), wake: make(chan struct{}, 1), kick: make(chan struct{}, 1)}
	p.cands = append(p.cands, cfg.Peer...)
	return p
}

// Remote returns the confirmed direct address and its RTT.
func (p *Punch) Remote() (netip.AddrPort, time.Duration, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.remote, p.rtt, p.remote.IsValid()
}

// Drops returns probes dropped for a bad MAC and for bad shape.
func (p *Punch) Drops() (badMAC, malformed uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.dropBadMAC, p.dropMalformed
}

func (p *Punch) mac(hdr []byte, typ byte, nonce []byte) []byte {
	h := hmac.New(sha256.New, p.cfg.Key)
	h.Write(hdr)
	h.Write([]byte{typ})
	h.Write(nonce)
	return h.Sum(nil)[:macLen]
}

func (p *Punch) probe(typ byte, nonce uint64) []byte {
	b := make([]byte, 0, wire.FrameHeaderLen+probeLen)
	b = wire.AppendFrameHeader(b, wire.FrameProbe, p.cfg.ID)
	hdr := b[:wire.FrameHeaderLen]
	b = append(b, typ)
	b = binary.BigEndian.AppendUint64(b, nonce)
	return append(b, p.mac(hdr, typ, b[len(b)-8:])...)
}

func (p *Punch) ping(to netip.AddrPort) { p.pingVia(to, p.cfg.Send) }

// PingVia sends one discovery ping to to through send (not Config.Send,
// and not asked of Gate: the wide round has its own budget). A pong from
// to confirms the path as any ping's does.
func (p *Punch) PingVia(to netip.AddrPort, send func(b []byte, to netip.AddrPort) error) {
	p.pingVia(netip.AddrPortFrom(to.Addr().Unmap(), to.Port()), send)
}

// Authentic reports whether payload, after the frame header hdr, is a
// well-formed probe under this session's key (nothing is counted or
// answered).
func (p *Punch) Authentic(hdr, payload []byte) bool {
	if len(payload) != probeLen || (payload[0] != probePing && payload[0] != probePong) {
		return false
	}
	return hmac.Equal(payload[9:], p.mac(hdr, payload[0], payload[1:9]))
}

// ProbeKind names a probe payload's type, "ping" or "pong" (for logs);
// "" for anything else.
func ProbeKind(payload []byte) string {
	if len(payload) == 0 {
		return ""
	}
	switch payload[0] {
	case probePing:
		return "ping"
	case probePong:
		return "pong"
	}
	return ""
}

func (p *Punch) pingVia(to netip.AddrPort, send func(b []byte, to netip.AddrPort) error) {
	var nb [8]byte
	rand.Read(nb[:])
	nonce := binary.BigEndian.Uint64(nb[:])
	p.mu.Lock()
	// Forget the oldest nonces; a late pong past that is just ignored.
	if len(p.sent) > 256 {
		cut := time.Now().Add(-10 * time.Second)
		for n, s := range p.sent {
			if s.at.Before(cut) {
				delete(p.sent, n)
			}
		}
	}
	p.sent[nonce] = sentPing{at: time.Now(), to: to}
	p.pingsSent++
	p.mu.Unlock()
	if err := send(p.probe(probePing, nonce), to); err != nil {
		p.log.Debug("probe not sent", "to", to, "err", err)
	}
}

// known reports whether a is a candidate already. p.mu is held.
func (p *Punch) known(a netip.AddrPort) bool {
	for _, c := range p.cands {
		if c == a {
			return true
		}
	}
	return false
}

// AddPeer makes a the first candidate (the peer's new address, learned
// from the gateway after its NAT rebound) and probes it now: an attempt
// under way probes it at once and runs its full time from here; a wait
// between attempts ends, and the backoff starts over. If the candidates
// are full, the last goes.
func (p *Punch) AddPeer(a netip.AddrPort) {
	a = netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
	p.mu.Lock()
	cands := []netip.AddrPort{a}
	for _, c := range p.cands {
		if c != a && len(cands) < MaxCandidates {
			cands = append(cands, c)
		}
	}
	p.cands = cands
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// ErrBadProbe is returned by Handle for a probe that fails its checks.
var ErrBadProbe = errors.New("bad probe")

// Handle processes a probe frame's payload (after the frame header hdr)
// that arrived from addr. Pings are answered; a pong to one of our pings
// confirms the path it came on.
func (p *Punch) Handle(hdr, payload []byte, from netip.AddrPort) error {
	if len(payload) != probeLen || (payload[0] != probePing && payload[0] != probePong) {
		p.mu.Lock()
		p.dropMalformed++
		p.mu.Unlock()
		return ErrBadProbe
	}
	typ, nonceB, mac := payload[0], payload[1:9], payload[9:]
	if !hmac.Equal(mac, p.mac(hdr, typ, nonceB)) {
		p.mu.Lock()
		p.dropBadMAC++
		p.mu.Unlock()
		return ErrBadProbe
	}
	nonce := binary.BigEndian.Uint64(nonceB)
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if typ == probePing {
		p.mu.Lock()
		p.pingsHeard++
		known := p.known(from)
		p.mu.Unlock()
		if !known && p.cfg.Accept != nil && !p.cfg.Accept(from) {
			p.mu.Lock()
			p.refusedFrom++
			p.mu.Unlock()
			return nil
		}
		p.mu.Lock()
		// The peer reached us from an address we did not know (its NAT
		// mapped it anew): probe it too.
		if !p.known(from) && len(p.cands) < MaxCandidates {
			p.cands = append(p.cands, from)
		}
		if p.remote == from {
			p.lastHeard = time.Now()
		}
		confirmed := p.remote.IsValid()
		p.mu.Unlock()
		err := p.cfg.Send(p.probe(probePong, nonce), from)
		if !confirmed && p.cfg.Pinged != nil {
			p.cfg.Pinged(from)
		}
		return err
	}
	p.mu.Lock()
	sp, ok := p.sent[nonce]
	if !ok {
		p.mu.Unlock()
		return nil // late or replayed
	}
	if sp.to != from {
		// A pong counts only from where its ping went (as ICE's checks
		// do). The peer holds the MAC key and sees its own nonces: were a
		// pong from anywhere enough, a peer that can forge its source
		// address could confirm a stranger's address as the path and aim
		// our keepalives and the session's traffic at it. A peer whose NAT
		// answers from another mapping is learned from its own pings.
		p.mu.Unlock()
		return nil
	}
	delete(p.sent, nonce)
	now := time.Now()
	rtt := now.Sub(sp.at)
	var confirmed bool
	switch {
	case !p.remote.IsValid():
		p.remote, confirmed = from, true
		p.rtt = rtt
	case p.remote == from:
		p.rtt = (7*p.rtt + rtt) / 8
	default:
		p.mu.Unlock()
		return nil
	}
	p.lastHeard = now
	took := now.Sub(p.start)
	p.mu.Unlock()
	if confirmed {
		if p.cfg.OnDirect != nil {
			p.cfg.OnDirect(from, took)
		}
		select {
		case p.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// Run punches, keeps the path alive, and punches again with backoff after
// a loss, until ctx ends.
func (p *Punch) Run(ctx context.Context) {
	backoff := time.Second
	for ctx.Err() == nil {
		p.mu.Lock()
		p.start = time.Now()
		p.mu.Unlock()
		if p.attempt(ctx) {
			backoff = time.Second
			p.hold(ctx)
			continue // lost: punch again at once
		}
		p.log.Info("no direct path yet; staying on the relay", "retry_in", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-p.kick:
			// The peer moved (AddPeer): probe its new address now.
			t.Stop()
			backoff = time.Second
			continue
		case <-t.C:
		}
		backoff = min(2*backoff, MaxBackoff)
	}
}

// attempt probes every candidate until one answers or AttemptDuration ends.
func (p *Punch) attempt(ctx context.Context) bool {
	deadline := time.NewTimer(AttemptDuration)
	defer deadline.Stop()
	t := time.NewTicker(ProbeInterval)
	defer t.Stop()
	var stuck <-chan time.Time
	if p.cfg.Stuck != nil {
		st := time.NewTimer(WideAfter)
		defer st.Stop()
		stuck = st.C
	}
	for {
		if _, _, ok := p.Remote(); ok {
			return true
		}
		p.mu.Lock()
		cands := append([]netip.AddrPort(nil), p.cands...)
		p.mu.Unlock()
		for _, c := range cands {
			if p.cfg.Gate != nil && !p.cfg.Gate(c) {
				p.mu.Lock()
				p.limited++
				p.mu.Unlock()
				continue
			}
			p.ping(c)
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			_, _, ok := p.Remote()
			return ok
		case <-p.wake:
		case <-stuck:
			stuck = nil
			if _, _, ok := p.Remote(); !ok {
				p.cfg.Stuck()
			}
		case <-p.kick:
			// A new candidate (AddPeer): probed at the top of the loop,
			// for a whole attempt's time.
			if !deadline.Stop() {
				select {
				case <-deadline.C:
				default:
				}
			}
			deadline.Reset(AttemptDuration)
		case <-t.C:
		}
	}
}

// hold keeps a confirmed path alive and returns when it stops answering.
func (p *Punch) hold(ctx context.Context) {
	t := time.NewTicker(KeepaliveInterval)
	defer t.Stop()
	for {
		p.mu.Lock()
		remote, last := p.remote, p.lastHeard
		p.mu.Unlock()
		if time.Since(last) > LossAfter {
			p.mu.Lock()
			p.remote = netip.AddrPort{}
			p.mu.Unlock()
			p.log.Warn("the direct channel stopped answering; falling back to the relay", "remote", remote, "silent_for", time.Since(last).Round(time.Millisecond))
			if p.cfg.OnLost != nil {
				p.cfg.OnLost(remote)
			}
			return
		}
		p.ping(remote)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
