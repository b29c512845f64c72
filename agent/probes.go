package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/wire"
)

// Hole-punch probes are the one thing a client makes the agent send to
// addresses the client names, so they are where the agent could become a
// reflector (issue 9). Three rules hold here, whatever the client or the
// gateway says:
//
//  1. Where: only candidates that make sense for that client (punch.Screen):
//     its observed public address, and private addresses it reported that
//     lie in a subnet of one of this host's interfaces. Never loopback,
//     link-local (169.254.169.254 and the other metadata services),
//     multicast, broadcast, unspecified, the overlay or this host's own
//     addresses; never a private range this host is not on. The same screen
//     applies to the addresses the client's pings come from, which are
//     answered and learned only if they pass.
//
//     Candidates inside the advertised subnets are not refused for being
//     there: a client on the agent's own LAN is legitimate (a laptop at
//     home), and that LAN is usually the advertised one, so refusing them
//     would send every same-LAN client through the relay. Nor would it
//     protect anything: the advertised hosts are what the client reaches
//     through the tunnel anyway (policy permitting), with any payload; a
//     probe is a 34-byte authenticated frame, under the limits below. (The
//     client, for its part, drops candidates inside the routes it sends
//     into its TUN: that is about the underlay not entering the tunnel.)
//
//  2. How much per connect: an offer may send offerProbeBurst discovery
//     probes until its client has a live session; after that its budget
//     refills one probe a second (probeLimits.liveEvery), to punch again
//     after a lost path. Pongs answer the client's authenticated pings one for one and
//     keepalives go only to the path the client confirmed, so neither
//     amplifies. See maxProbeBytesPerConnect.
//
//  3. How often per client and per address, across offers: token buckets
//     keyed by the client's credential name and by the probed IP, kept by
//     the agent and not by the session, so reconnecting (a new offer, a new
//     session ID, a new gateway connection) starts with what is left.
//
// And the gateway saying the client left (TypeGone) ends discovery for its
// session at once.

// offerProbeBurst is the discovery probes one session offer may send before
// its client's session is live. Enough to punch one or two candidates for
// about 3 s at punch.ProbeInterval (a cone NAT opens in a round trip).
const offerProbeBurst = 16

// maxProbeBytesPerConnect bounds what one connect makes the agent send to
// the addresses the client named, before the client has a live session:
// probes per candidate × candidates × size, where the offer's budget caps
// the product at offerProbeBurst whatever the candidates (≤ 16 of them,
// wire.MaxCandidates; before this budget, 16 × 40 probes per 8 s attempt,
// attempts repeated for the offer's minute: ~3,200 probes, ~109 KB):
//
//	16 probes × 34 bytes (punch.ProbeFrameLen) = 544 bytes of UDP payload
//	(992 bytes on the wire over IPv4, 1,312 over IPv6).
//
// The smallest connect that asks for probes (a one-letter agent name, the
// probe key and its signature) is a 212-byte control message, so a connect
// makes the agent send at most ~2.6 times its own size
// (TestProbeAmplificationBound computes both). Pongs are answers to the
// client's own pings, one each.
const maxProbeBytesPerConnect = offerProbeBurst * punch.ProbeFrameLen

// offerTTL is how long an offer the client never follows up with a session
// is kept (and punched for).
const offerTTL = time.Minute

// probeLimits bound the agent's discovery probes. Defaults fit a small
// server: ~1 probe a second per client name and 2 per probed address,
// sustained, i.e. tens of bytes a second.
type probeLimits struct {
	offerBurst int           // per offer until its session is live
	liveEvery  time.Duration // a live session's offer budget refills one probe this often
	nameBurst  int           // per client credential name, across offers
	nameEvery  time.Duration
	addrBurst  int // per probed IP, across clients (several may share a NAT)
	addrEvery  time.Duration
	tableCap   int // client names, and probed addresses, the agent keeps state for
}

var defaultProbeLimits = probeLimits{
	offerBurst: offerProbeBurst, liveEvery: time.Second,
	nameBurst: 3 * offerProbeBurst, nameEvery: time.Second,
	addrBurst: 4 * offerProbeBurst, addrEvery: 500 * time.Millisecond,
	tableCap: 4096,
}

// probeGuard applies the rules above. The zero value uses the defaults,
// the clock and this host's interfaces.
type probeGuard struct {
	lim   probeLimits                    // zero: defaultProbeLimits
	now   func() time.Time               // nil: time.Now
	local func() ([]netip.Prefix, error) // nil: platform.InterfacePrefixes

	mu     sync.Mutex
	ready  bool
	byName limitTable[string]
	byAddr limitTable[netip.Addr]
	offers map[uint64]*offerProbes // by session ID, while punching
	counts map[string]uint64
	wideAt map[string]time.Time // a client name's last wide round

	lastRefusedLog, lastLimitLog atomic.Int64
}

// offerProbes is one offer's punching, as the guard sees it.
type offerProbes struct {
	id     uint64
	client string // the client's credential name
	cands  []netip.AddrPort
	screen punch.Screen // under probeGuard.mu once begun (moved changes it)
	live   func() bool  // whether the session is live now
	log    *slog.Logger
	b      bucket // the offer's own budget; under probeGuard.mu
	gone   bool   // the gateway said the client left; under probeGuard.mu
	wide   bool   // the offer had its wide round; under probeGuard.mu
}

// init fills in the defaults. g.mu is held.
func (g *probeGuard) init() {
	if g.ready {
		return
	}
	g.ready = true
	if g.lim == (probeLimits{}) {
		g.lim = defaultProbeLimits
	}
	if g.now == nil {
		g.now = time.Now
	}
	if g.local == nil {
		g.local = platform.InterfacePrefixes
	}
	g.byName = limitTable[string]{m: map[string]*bucket{}, burst: g.lim.nameBurst, every: g.lim.nameEvery, cap: g.lim.tableCap}
	g.byAddr = limitTable[netip.Addr]{m: map[netip.Addr]*bucket{}, burst: g.lim.addrBurst, every: g.lim.addrEvery, cap: g.lim.tableCap}
	g.offers = map[uint64]*offerProbes{}
	g.counts = map[string]uint64{}
	g.wideAt = map[string]time.Time{}
}

// observedOf is the client's public IP: the address the gateway saw its
// connection come from, or, from a gateway that does not say, the client's
// first candidate, which punch.Candidates makes its observed address (then
// it is only the client's word: any public address a client names passes
// as the one it is on, under the same limits). Either way the screen's
// refusals still apply to it.
func observedOf(s *wire.Session) netip.Addr {
	if s.PeerObserved.IsValid() {
		return s.PeerObserved.Addr().Unmap()
	}
	if len(s.Candidates) > 0 {
		if ip := s.Candidates[0].Addr().Unmap(); ip.IsGlobalUnicast() && !ip.IsPrivate() {
			return ip
		}
	}
	return netip.Addr{}
}

// begin screens session offer s's candidates for client (its credential
// name), counts and logs the refused ones, and starts the offer's budget.
// own reports this host's addresses; live whether the session is live; log
// is the session's (probes.go adds the client and candidate fields). The
// offer's probing replaces any earlier one under the same session ID.
func (g *probeGuard) begin(s *wire.Session, client string, own func(netip.Addr) bool, live func() bool, log *slog.Logger) *offerProbes {
	g.mu.Lock()
	g.init()
	localFn := g.local
	g.mu.Unlock()
	local, err := localFn()
	if err != nil {
		// Fail closed: with no LAN known, no private address passes.
		log.Warn("could not read this host's interfaces; probing no private candidate", "err", err)
	}
	op := &offerProbes{id: s.ID, client: client, live: live, log: log,
		screen: punch.Screen{Observed: observedOf(s), Local: local, Own: own}}
	cands := s.Candidates
	if s.PeerObserved.IsValid() {
		// The address the gateway saw works whether or not the client
		// listed it (it lists it first, as punch.Candidates does).
		cands = append([]netip.AddrPort{s.PeerObserved}, cands...)
	}
	var refused []string
	seen := map[netip.AddrPort]bool{}
	g.mu.Lock()
	for _, c := range cands {
		c = netip.AddrPortFrom(c.Addr().Unmap(), c.Port())
		if seen[c] {
			continue
		}
		seen[c] = true
		if r := op.screen.Check(c); r != punch.Accepted {
			g.counts["refused_"+string(r)]++
			refused = append(refused, fmt.Sprintf("%s (%s)", c, r))
			continue
		}
		if len(op.cands) < punch.MaxCandidates {
			op.cands = append(op.cands, c)
		}
	}
	op.b = bucket{tokens: float64(g.lim.offerBurst), at: g.now()}
	g.offers[s.ID] = op
	g.mu.Unlock()
	if len(refused) > 0 && logDue(&g.lastRefusedLog) {
		log.Info("not probing candidates that cannot be this client's", "client", client, "candidate", strings.Join(refused, ", "),
			"probing", op.cands, "observed", op.screen.Observed)
	}
	return op
}

// allow is op's punch.Config.Gate: whether one more discovery probe may go
// to to now. It takes a token from the offer's, the client's and the
// address's budgets, all or none.
func (g *probeGuard) allow(op *offerProbes, to netip.AddrPort) bool {
	live := op.live != nil && op.live() // before g.mu: it takes the agent's lock
	g.mu.Lock()
	defer g.mu.Unlock()
	if op.gone || g.offers[op.id] != op {
		return false // the client left, or the offer ended: no more probing
	}
	now := g.now()
	var refill time.Duration // a pending offer's budget does not refill
	if live {
		refill = g.lim.liveEvery
	}
	op.b.fill(now, g.lim.offerBurst, refill)
	var limit string
	var nb, ab *bucket
	if op.b.tokens < 1 {
		limit = "offer"
	} else if nb, ab = g.byName.get(op.client, now), g.byAddr.get(to.Addr().Unmap(), now); nb == nil || ab == nil {
		limit = "table_full"
	} else if nb.tokens < 1 {
		limit = "client"
	} else if ab.tokens < 1 {
		limit = "address"
	}
	if limit != "" {
		g.counts["limited_"+limit]++
		// An offer's own budget running out is the pacing of every punch
		// that takes long; the client's or an address's is worth a look.
		level := slog.LevelInfo
		if limit == "offer" {
			level = slog.LevelDebug
		}
		if op.log.Enabled(context.Background(), level) && logDue(&g.lastLimitLog) {
			op.log.Log(context.Background(), level, "probe rate limit reached; not probing for now", "client", op.client, "candidate", to, "limit", limit)
		}
		return false
	}
	op.b.tokens--
	nb.tokens--
	ab.tokens--
	g.counts["sent"]++
	return true
}

// accept is op's punch.Config.Accept: whether a ping from from (the client
// holds the key, but may forge its source) may be answered and learned.
func (g *probeGuard) accept(op *offerProbes, from netip.AddrPort) bool {
	g.mu.Lock()
	screen := op.screen
	g.mu.Unlock()
	r := screen.Check(from)
	if r == punch.Accepted {
		return true
	}
	g.mu.Lock()
	g.init()
	g.counts["refused_"+string(r)]++
	g.mu.Unlock()
	if logDue(&g.lastRefusedLog) {
		op.log.Info("not answering a probe from an address that cannot be this client's", "client", op.client, "candidate", from, "reason", string(r))
	}
	return false
}

// movedProbeBurst is what a moved notice lifts the offer's budget to: a
// few rounds of probes to the client's new address (and the old one) at
// punch.ProbeInterval, enough for a cone NAT, which opens in a round trip.
// The client's and the address's budgets still apply, so a gateway
// sending notices without end gets no more than those allow.
const movedProbeBurst = offerProbeBurst / 2

// moved takes the gateway's word that session id's client now comes from
// to (its NAT rebound, it changed networks): to's IP becomes the client's
// observed address for the session's screen, and the offer's budget is
// lifted to movedProbeBurst. It reports whether to may be probed: false
// for a session not being punched for, whose client left, or an address
// the screen refuses (counted).
func (g *probeGuard) moved(id uint64, to netip.AddrPort) bool {
	to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	g.mu.Lock()
	defer g.mu.Unlock()
	g.init()
	op := g.offers[id]
	if op == nil || op.gone {
		return false
	}
	screen := op.screen
	if ip := to.Addr(); ip.IsGlobalUnicast() && !ip.IsPrivate() {
		screen.Observed = ip
	}
	if r := screen.Check(to); r != punch.Accepted {
		g.counts["refused_"+string(r)]++
		return false
	}
	op.screen = screen
	op.b.tokens = max(op.b.tokens, float64(min(movedProbeBurst, g.lim.offerBurst)))
	g.counts["moved"]++
	return true
}

// allowWide is op's underlay.DirectConfig.Wide: whether the offer may
// have a wide round (punch/wide.go), the budget kept apart from the
// discovery probes' above because it is of another size: the burst of up
// to punch.BurstProbes pings (34 bytes each, ~35 KB) at punch.BurstRate,
// all to ports of the client's observed IP, or punch.HardSockets pings
// from as many extra sockets, all to the client's observed address. One
// round per offer, and one per client name per punch.WideEvery across
// offers, whatever the client does. (The few pings either side sends to
// confirm a hit are the round's: at most underlay's confirmPings each.)
func (g *probeGuard) allowWide(op *offerProbes, role punch.Role, n int) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.init()
	now := g.now()
	if op.gone || g.offers[op.id] != op || op.wide || n > punch.BurstProbes || role == punch.RoleNone {
		g.counts["limited_wide"]++
		return false
	}
	if last, ok := g.wideAt[op.client]; ok && now.Sub(last) < punch.WideEvery {
		g.counts["limited_wide"]++
		return false
	}
	if len(g.wideAt) >= g.lim.tableCap {
		for k, t := range g.wideAt {
			if now.Sub(t) >= punch.WideEvery {
				delete(g.wideAt, k)
			}
		}
		if len(g.wideAt) >= g.lim.tableCap {
			g.counts["limited_wide"]++
			return false
		}
	}
	g.wideAt[op.client] = now
	op.wide = true
	g.counts["wide_rounds"]++
	if role == punch.RoleEasy {
		g.counts["wide_probes"] += uint64(n)
	} else {
		g.counts["wide_sockets"] += uint64(n)
	}
	return true
}

// gone ends discovery for session id: the gateway said its client left.
// It reports whether the session was being punched for.
func (g *probeGuard) gone(id uint64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.init()
	op := g.offers[id]
	if op == nil || op.gone {
		return false
	}
	op.gone = true
	g.counts["stopped_gone"]++
	return true
}

// end forgets session id's probing (the session or the offer ended).
func (g *probeGuard) end(id uint64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	delete(g.offers, id)
}

// snapshot is the probe counters, for the agent's status: refused_<reason>
// (candidates and ping sources refused, by punch.Reason), limited_offer,
// limited_client, limited_address, limited_table_full (discovery probes not
// sent, by the budget that stopped them), sent (discovery probes allowed)
// stopped_gone (sessions whose probing stopped because the client left),
// moved (the gateway's notices that a client moved, taken), wide_rounds,
// wide_probes and wide_sockets (wide rounds granted, and the burst pings
// and extra sockets they were granted) and limited_wide (rounds refused). Every name
// is present, zero or not.
func (g *probeGuard) snapshot() map[string]uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.init()
	out := map[string]uint64{}
	for _, r := range []punch.Reason{punch.RefusedInvalid, punch.RefusedUnspec, punch.RefusedLoopback, punch.RefusedMulticast,
		punch.RefusedLinkLocal, punch.RefusedBroadcast, punch.RefusedReserved, punch.RefusedOverlay, punch.RefusedOwn,
		punch.RefusedForeignLAN, punch.RefusedPublic} {
		out["refused_"+string(r)] = 0
	}
	for _, k := range []string{"limited_offer", "limited_client", "limited_address", "limited_table_full", "sent", "stopped_gone", "moved",
		"wide_rounds", "wide_probes", "wide_sockets", "limited_wide"} {
		out[k] = 0
	}
	for k, v := range g.counts {
		out[k] = v
	}
	return out
}

// logDue reports whether a second has passed since it last said yes for
// last: one log line a second of each kind, however fast a client makes
// reasons for more. The counters count everything.
func logDue(last *atomic.Int64) bool {
	now := time.Now().UnixNano()
	l := last.Load()
	return now-l >= int64(time.Second) && last.CompareAndSwap(l, now)
}

// bucket is a token bucket; its owner holds the lock.
type bucket struct {
	tokens float64
	at     time.Time
}

// fill adds the tokens earned since the last fill, one per every (none if
// every is 0), up to burst.
func (b *bucket) fill(now time.Time, burst int, every time.Duration) {
	if every > 0 && now.After(b.at) {
		b.tokens = min(float64(burst), b.tokens+float64(now.Sub(b.at))/float64(every))
	}
	b.at = now
}

// limitTable is token buckets by key, at most cap of them. A key is
// forgotten only once its bucket is full again, which is the state a new
// key starts in, so bounding the memory never hands anyone a fresh budget.
type limitTable[K comparable] struct {
	m     map[K]*bucket
	burst int
	every time.Duration
	cap   int
	swept time.Time
}

// get returns k's bucket filled up to now, or nil when the table is at its
// cap and no bucket has refilled to let a new key in.
func (t *limitTable[K]) get(k K, now time.Time) *bucket {
	if b := t.m[k]; b != nil {
		b.fill(now, t.burst, t.every)
		return b
	}
	if len(t.m) >= t.cap && now.Sub(t.swept) >= t.every {
		// At most once per refill interval: a sweep that found nothing
		// full will not find anything sooner.
		t.swept = now
		for key, b := range t.m {
			if b.fill(now, t.burst, t.every); b.tokens >= float64(t.burst) {
				delete(t.m, key)
			}
		}
	}
	if len(t.m) >= t.cap {
		return nil
	}
	b := &bucket{tokens: float64(t.burst), at: now}
	t.m[k] = b
	return b
}

// isLive reports whether session id has a live peer connection.
func (a *Agent) isLive(id uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.live[id]
}

// onGone is told by the gateway that the client of session id left it.
// Discovery probes for the session stop at once. A pending offer's
// punching ends altogether (its client can only come back with a new
// connect, which makes a new offer). A live session may carry on over a
// confirmed direct path, so that path keeps its keepalives, which go only
// while the client answers them (punch.LossAfter), as before.
func (a *Agent) onGone(id uint64) {
	if !a.probes.gone(id) {
		return
	}
	live := a.isLive(id)
	if !live {
		a.stopPunch(id, true)
	}
	a.log.Info("the client left the gateway; no more probes for its session", "session", wire.SessionID(id), "live", live)
}

// onMoved is told by the gateway that the client of session id now comes
// from to (its NAT mapping changed): the session's punching probes there
// at once, so the direct path comes back instead of staying on the relay
// (the agent's NAT drops the client's probes from its new port until the
// agent has sent there). The client's new IP becomes the one public address
// probed for the session; the probe budgets still apply.
func (a *Agent) onMoved(id uint64, to netip.AddrPort) {
	a.mu.Lock()
	d := a.punches[id]
	a.mu.Unlock()
	if d == nil || d.Punch() == nil || !a.probes.moved(id, to) {
		return
	}
	d.AddPeer(to)
	a.log.Info("the client's address changed; probing it there", "session", wire.SessionID(id), "addr", to)
}
