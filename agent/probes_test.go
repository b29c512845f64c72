package agent

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

var quietLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// The agent of these tests: interfaces in 192.168.1.0/24 and fd00:1::/64,
// so 10.99.0.0/16 is a private range it is not on.
var (
	agentLAN = []netip.Prefix{netip.MustParsePrefix("192.168.1.10/24"), netip.MustParsePrefix("fd00:1::10/64")}
	observed = netip.MustParseAddrPort("198.18.0.5:4000") // the client's public address, as the gateway saw it
	sameLAN  = netip.MustParseAddrPort("192.168.1.20:4000")
)

type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// testGuard is a guard on the test agent's interfaces, with the default
// limits on clock (nil: the real one).
func testGuard(clock *fakeClock) *probeGuard {
	g := &probeGuard{local: func() ([]netip.Prefix, error) { return agentLAN, nil }}
	if clock != nil {
		g.now = clock.now
	}
	return g
}

func offerWith(id uint64, obs netip.AddrPort, cands ...netip.AddrPort) *wire.Session {
	return &wire.Session{ID: id, PeerName: "alice", PeerObserved: obs, Punch: wire.Punch{Candidates: cands}}
}

func notLive() bool { return false }

// One row per probe rule: a client's candidate is probed (and a ping from
// it answered) or refused and counted under its reason.
func TestProbeCandidateRules(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cand    netip.AddrPort
		refused string // counter that must rise; "": probed
	}{
		{"loopback", netip.MustParseAddrPort("127.0.0.1:22"), "refused_loopback"},
		{"cloud metadata", netip.MustParseAddrPort("169.254.169.254:80"), "refused_link_local"},
		{"link-local v6", netip.MustParseAddrPort("[fe80::1]:4000"), "refused_link_local"},
		{"multicast", netip.MustParseAddrPort("224.0.0.251:5353"), "refused_multicast"},
		{"the agent's own address", netip.MustParseAddrPort("192.168.1.10:4000"), "refused_own_address"},
		{"the agent's own address (host set)", netip.MustParseAddrPort("192.168.1.11:4000"), "refused_own_address"},
		{"foreign private range", netip.MustParseAddrPort("10.99.0.5:4000"), "refused_foreign_private"},
		{"public, not the observed address", netip.MustParseAddrPort("203.0.113.9:4000"), "refused_not_observed"},
		{"same-LAN private address", sameLAN, ""},
		{"the observed public address", observed, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := testGuard(nil)
			own := func(a netip.Addr) bool { return a == netip.MustParseAddr("192.168.1.11") } // a.host.has
			op := g.begin(offerWith(7, observed, observed, tc.cand), "alice", own, notLive, quietLog)
			probed := slices.Contains(op.cands, tc.cand)
			answered := g.accept(op, tc.cand)
			counts := g.snapshot()
			if tc.refused == "" {
				if !probed || !answered {
					t.Fatalf("%v: probed %v, answered %v; want both (candidates %v)", tc.cand, probed, answered, op.cands)
				}
				return
			}
			if probed || answered {
				t.Fatalf("%v: probed %v, answered %v; want neither (candidates %v)", tc.cand, probed, answered, op.cands)
			}
			// Once as a candidate, once as a ping source.
			if counts[tc.refused] != 2 {
				t.Fatalf("%s = %d, want 2 (counters %v)", tc.refused, counts[tc.refused], counts)
			}
			if !slices.Equal(op.cands, []netip.AddrPort{observed}) {
				t.Fatalf("candidates %v, want only the observed %v", op.cands, observed)
			}
		})
	}
}

// From a gateway that does not say where it saw the client, the client's
// first candidate (punch.Candidates puts its observed address there) is
// the one public address probed.
func TestProbeObservedFromFirstCandidate(t *testing.T) {
	g := testGuard(nil)
	other := netip.MustParseAddrPort("203.0.113.9:4000")
	op := g.begin(offerWith(7, netip.AddrPort{}, observed, sameLAN, other), "alice", nil, notLive, quietLog)
	if want := []netip.AddrPort{observed, sameLAN}; !slices.Equal(op.cands, want) {
		t.Fatalf("candidates %v, want %v", op.cands, want)
	}
	// A private first candidate is not an observed address.
	op = g.begin(offerWith(8, netip.AddrPort{}, sameLAN, observed), "alice", nil, notLive, quietLog)
	if want := []netip.AddrPort{sameLAN}; !slices.Equal(op.cands, want) {
		t.Fatalf("candidates %v, want %v", op.cands, want)
	}
	// The gateway's word wins over the client's.
	op = g.begin(offerWith(9, observed, other, sameLAN), "alice", nil, notLive, quietLog)
	if want := []netip.AddrPort{observed, sameLAN}; !slices.Equal(op.cands, want) {
		t.Fatalf("candidates %v, want %v", op.cands, want)
	}
}

// drain takes discovery probes for op, round robin over its candidates,
// until the guard refuses one; it returns how many it allowed.
func drain(g *probeGuard, op *offerProbes) int {
	n := 0
	for n < 10000 && g.allow(op, op.cands[n%len(op.cands)]) {
		n++
	}
	return n
}

// A reconnecting client (a new offer, a new session ID, under the same
// credential name) does not get a fresh budget: the client's and the
// address's buckets live in the agent, not in the session.
func TestProbeRateLimitSurvivesReconnect(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	g := testGuard(clock)
	lim := defaultProbeLimits
	total := 0
	for i := range 5 {
		op := g.begin(offerWith(uint64(100+i), observed, observed, sameLAN), "alice", nil, notLive, quietLog)
		n := drain(g, op)
		if n > lim.offerBurst {
			t.Fatalf("offer %d sent %d probes, more than an offer's %d", i, n, lim.offerBurst)
		}
		total += n
	}
	if total != lim.nameBurst {
		t.Fatalf("5 offers for one client sent %d probes in all; want the client's budget %d", total, lim.nameBurst)
	}
	if c := g.snapshot()["limited_client"]; c == 0 {
		t.Fatal("limited_client not counted")
	}
	// Another client name aimed at the same address: the address's budget
	// is what is left of it.
	used := total / 2 // alice's probes alternated between two addresses
	bob := 0
	for i := range 5 {
		s := offerWith(uint64(200+i), observed, observed)
		s.PeerName = "bob"
		bob += drain(g, g.begin(s, "bob", nil, notLive, quietLog))
	}
	if bob != lim.addrBurst-used {
		t.Fatalf("bob sent %d probes to %v; want what alice left of its budget, %d", bob, observed.Addr(), lim.addrBurst-used)
	}
	if c := g.snapshot()["limited_address"]; c == 0 {
		t.Fatal("limited_address not counted")
	}
	// The budgets refill with time, not with reconnects.
	clock.advance(10 * lim.nameEvery)
	op := g.begin(offerWith(300, observed, sameLAN), "alice", nil, notLive, quietLog)
	if n := drain(g, op); n != 10 {
		t.Fatalf("after 10 refill intervals, alice sent %d probes; want 10", n)
	}
}

// A live session's offer budget refills (to punch again after a lost
// path); a pending one's does not.
func TestProbeOfferBudgetRefillsOnlyWhenLive(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	g := testGuard(clock)
	g.lim = defaultProbeLimits
	g.lim.nameBurst, g.lim.addrBurst = 1000, 1000 // only the offer's budget counts here
	live := false
	op := g.begin(offerWith(1, observed, observed), "alice", nil, func() bool { return live }, quietLog)
	if n := drain(g, op); n != offerProbeBurst {
		t.Fatalf("pending offer sent %d, want %d", n, offerProbeBurst)
	}
	clock.advance(time.Hour)
	if n := drain(g, op); n != 0 {
		t.Fatalf("a pending offer got %d more probes after an hour", n)
	}
	live = true
	clock.advance(5 * g.lim.liveEvery)
	if n := drain(g, op); n != 5 {
		t.Fatalf("live session after 5 refill intervals sent %d, want 5", n)
	}
	if c := g.snapshot()["limited_offer"]; c == 0 {
		t.Fatal("limited_offer not counted")
	}
}

// The tables are bounded; a key leaves only once its bucket is full again,
// so the bound never hands anyone a fresh budget, and the cap is counted.
func TestProbeTablesBounded(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	g := testGuard(clock)
	g.lim = probeLimits{offerBurst: 100, nameBurst: 2, nameEvery: time.Second, addrBurst: 100, addrEvery: time.Millisecond, tableCap: 2}
	ops := map[string]*offerProbes{}
	for i, name := range []string{"a", "b", "c"} {
		s := offerWith(uint64(i+1), observed, observed)
		ops[name] = g.begin(s, name, nil, notLive, quietLog)
	}
	if !g.allow(ops["a"], observed) || !g.allow(ops["b"], observed) {
		t.Fatal("first probes refused")
	}
	if g.allow(ops["c"], observed) {
		t.Fatal("a third client name got a bucket in a table of 2")
	}
	if c := g.snapshot()["limited_table_full"]; c != 1 {
		t.Fatalf("limited_table_full = %d, want 1", c)
	}
	// a and b refill to full: they may go, and c takes a place.
	clock.advance(2 * time.Second)
	if !g.allow(ops["c"], observed) {
		t.Fatal("c still refused once the others' buckets were full again")
	}
	if n := len(g.byName.m); n > 2 {
		t.Fatalf("%d client buckets in a table of 2", n)
	}
	// c's bucket, not a fresh one, is what c has now: one probe left.
	if n := drain(g, ops["c"]); n != 1 {
		t.Fatalf("c sent %d more, want 1", n)
	}
}

// waitPunches stops the punches of sessions ids and, at cleanup (before
// setFastPunch restores punch's timing, which they read), waits until they
// have returned.
func waitPunches(t *testing.T, a *Agent, ids ...uint64) {
	a.mu.Lock()
	var ds []*underlay.Direct
	for _, id := range ids {
		ds = append(ds, a.punches[id])
	}
	a.mu.Unlock()
	t.Cleanup(func() {
		for _, d := range ds {
			d.Close()
			select {
			case <-d.Done():
			case <-time.After(5 * time.Second):
				t.Errorf("the punch of session %x did not return", d.ID())
			}
		}
	})
}

// setFastPunch shrinks punch's timing for a test.
func setFastPunch(t *testing.T) {
	pi, ad, ki, la := punch.ProbeInterval, punch.AttemptDuration, punch.KeepaliveInterval, punch.LossAfter
	punch.ProbeInterval, punch.AttemptDuration, punch.KeepaliveInterval, punch.LossAfter = 5*time.Millisecond, 200*time.Millisecond, 20*time.Millisecond, 200*time.Millisecond
	t.Cleanup(func() {
		punch.ProbeInterval, punch.AttemptDuration, punch.KeepaliveInterval, punch.LossAfter = pi, ad, ki, la
	})
}

// sendLog records what a punch sends.
type sendLog struct {
	mu    sync.Mutex
	n     int
	bytes int
	to    map[netip.AddrPort]int
}

func (l *sendLog) send(b []byte, to netip.AddrPort) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	l.bytes += len(b)
	if l.to == nil {
		l.to = map[netip.AddrPort]int{}
	}
	l.to[to]++
	return nil
}

func (l *sendLog) count() (n, bytes int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n, l.bytes
}

// runPunch runs a punch for op with the guard's gate until the test ends.
func runPunch(t *testing.T, g *probeGuard, op *offerProbes, log *sendLog) *punch.Punch {
	p := punch.New(punch.Config{ID: op.id, Key: bytes.Repeat([]byte{7}, 32), Peer: op.cands, Send: log.send, Log: quietLog,
		Gate:   func(to netip.AddrPort) bool { return g.allow(op, to) },
		Accept: func(from netip.AddrPort) bool { return g.accept(op, from) }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return p
}

// A connect never makes the agent send much more than the connect itself:
// an offer naming the most candidates it may, none of which ever answers,
// gets offerProbeBurst probes out of the agent over several attempts, and
// that is maxProbeBytesPerConnect (544) bytes, under three times the
// smallest connect that asks for probes.
func TestProbeAmplificationBound(t *testing.T) {
	if punch.ProbeFrameLen != 34 || maxProbeBytesPerConnect != 544 {
		t.Fatalf("probe frame %d bytes, bound %d bytes; the comments say 34 and 544", punch.ProbeFrameLen, maxProbeBytesPerConnect)
	}
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	po, err := punch.NewOffer(key)
	if err != nil {
		t.Fatal(err)
	}
	var msg bytes.Buffer
	if err := wire.WriteMessage(&msg, &wire.Message{Type: wire.TypeConnect, ID: 1, Connect: &wire.Connect{Agent: "a",
		Punch: wire.Punch{ProbePub: po.Pub, ProbeSig: po.Sig}}}); err != nil {
		t.Fatal(err)
	}
	ratio := float64(maxProbeBytesPerConnect) / float64(msg.Len())
	t.Logf("smallest probing connect: %d bytes; most the agent probes for it: %d bytes (%.1f×)", msg.Len(), maxProbeBytesPerConnect, ratio)
	if ratio > 3 {
		t.Fatalf("a %d-byte connect may make the agent send %d bytes of probes (%.1f×)", msg.Len(), maxProbeBytesPerConnect, ratio)
	}

	setFastPunch(t)
	cands := []netip.AddrPort{observed}
	for i := range wire.MaxCandidates - 1 {
		cands = append(cands, netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 168, 1, byte(20 + i)}), 4000))
	}
	g := testGuard(nil)
	op := g.begin(offerWith(7, observed, cands...), "alice", nil, notLive, quietLog)
	if len(op.cands) != wire.MaxCandidates {
		t.Fatalf("%d candidates probed, want all %d", len(op.cands), wire.MaxCandidates)
	}
	var sent sendLog
	p := runPunch(t, g, op, &sent)
	// Two attempts of the punch (200 ms each, 1 s backoff between) would
	// send 16 candidates × 40 rounds × 2 = 1,280 probes unbounded.
	time.Sleep(2*punch.AttemptDuration + 1200*time.Millisecond)
	n, b := sent.count()
	t.Logf("sent %d probes, %d bytes; %d refused by the budget", n, b, func() uint64 { g, _ := p.Limited(); return g }())
	if b > maxProbeBytesPerConnect || n > offerProbeBurst {
		t.Fatalf("one connect made the agent send %d probes, %d bytes; the bound is %d bytes", n, b, maxProbeBytesPerConnect)
	}
	if n != offerProbeBurst {
		t.Fatalf("sent %d probes; the offer's budget is %d", n, offerProbeBurst)
	}
	for to := range sent.to {
		if !slices.Contains(cands, to) {
			t.Fatalf("probed %v, not a candidate", to)
		}
	}
}

// Probing stops when the gateway says the client is gone: a live
// session's discovery stops at once.
func TestProbesStopWhenClientGone(t *testing.T) {
	setFastPunch(t)
	g := testGuard(nil)
	g.lim = defaultProbeLimits
	g.lim.offerBurst, g.lim.nameBurst, g.lim.addrBurst = 1e6, 1e6, 1e6 // only gone stops it here
	g.lim.liveEvery = time.Microsecond
	op := g.begin(offerWith(7, observed, observed, sameLAN), "alice", nil, func() bool { return true }, quietLog)
	var sent sendLog
	runPunch(t, g, op, &sent)
	time.Sleep(20 * punch.ProbeInterval)
	if n, _ := sent.count(); n == 0 {
		t.Fatal("no probes before the client left")
	}
	if !g.gone(7) {
		t.Fatal("gone did not find the session")
	}
	time.Sleep(2 * punch.ProbeInterval) // a round already past the gate
	n0, _ := sent.count()
	time.Sleep(40 * punch.ProbeInterval)
	if n, _ := sent.count(); n != n0 {
		t.Fatalf("%d probes after the gateway said the client left", n-n0)
	}
	if c := g.snapshot()["stopped_gone"]; c != 1 {
		t.Fatalf("stopped_gone = %d, want 1", c)
	}
	if g.gone(7) || g.gone(8) {
		t.Fatal("gone for a session already stopped, or unknown, reported one")
	}
}

// The agent end to end of its own part: startPunch probes only what the
// rules allow, and the gateway's "gone" for a pending offer ends its
// punching (the Direct closes, nothing more is sent).
func TestAgentPendingOfferStopsOnGone(t *testing.T) {
	setFastPunch(t)
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	u, err := underlay.Open(control.Config{Gateway: "127.0.0.1:1", Key: key, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a := &Agent{log: quietLog, u: u, ctx: ctx, offers: map[uint64]*offer{}, punches: map[uint64]*underlay.Direct{}, live: map[uint64]bool{}}
	a.probes.local = func() ([]netip.Prefix, error) { return agentLAN, nil }
	// Where the kernel refuses the port's steering program, probes leave
	// for real: a ULA on the test LAN and the benchmarking range (RFC
	// 2544) are addresses no real host should have.
	lan6 := netip.MustParseAddrPort("[fd00:1::20]:4000")
	s := offerWith(7, observed, observed, lan6, netip.MustParseAddrPort("127.0.0.1:22"), netip.MustParseAddrPort("169.254.169.254:80"),
		netip.MustParseAddrPort("10.99.0.5:4000"))
	a.startPunch(s, bytes.Repeat([]byte{7}, 32))
	waitPunches(t, a, s.ID)
	a.mu.Lock()
	d := a.punches[7]
	a.mu.Unlock()
	if d == nil || d.Punch() == nil {
		t.Fatal("no punching for the offer")
	}
	if got := d.Punch().Candidates(); !slices.Equal(got, []netip.AddrPort{observed, lan6}) {
		t.Fatalf("probing %v; want only the observed and the same-LAN address", got)
	}
	// A ping from a refused source (the client holds the key, and may
	// forge the address) is neither answered nor learned.
	ping := make(chan []byte, 1)
	peer := punch.New(punch.Config{ID: 7, Key: bytes.Repeat([]byte{7}, 32), Peer: []netip.AddrPort{observed}, Log: quietLog,
		Send: func(b []byte, _ netip.AddrPort) error {
			select {
			case ping <- append([]byte(nil), b...):
			default:
			}
			return nil
		}})
	pctx, pcancel := context.WithCancel(ctx)
	go peer.Run(pctx)
	f := <-ping
	pcancel()
	metadata := netip.MustParseAddrPort("169.254.169.254:80")
	if err := d.Punch().Handle(f[:wire.FrameHeaderLen], f[wire.FrameHeaderLen:], metadata); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(d.Punch().Candidates(), metadata) {
		t.Fatal("a ping from the metadata address taught the agent to probe it")
	}
	// Past the offer's budget nothing goes out, however long it punches.
	time.Sleep(2*punch.AttemptDuration + 1100*time.Millisecond)
	if _, sent := d.Punch().Stats(); sent == 0 || sent > offerProbeBurst {
		t.Fatalf("%d probes for a pending offer; want 1 to %d", sent, offerProbeBurst)
	}
	a.onGone(7)
	a.mu.Lock()
	still := a.punches[7]
	a.mu.Unlock()
	if still != nil {
		t.Fatal("the pending offer is still punched for after the client left")
	}
	time.Sleep(2 * punch.ProbeInterval)
	_, n0 := d.Punch().Stats()
	time.Sleep(20 * punch.ProbeInterval)
	if _, n := d.Punch().Stats(); n != n0 {
		t.Fatalf("%d probes after the client left", n-n0)
	}
	if c := a.probes.snapshot(); c["stopped_gone"] != 1 || c["refused_loopback"] != 1 || c["refused_link_local"] != 2 || c["refused_foreign_private"] != 1 {
		t.Fatalf("counters %v", c)
	}
}

// The gateway's word that a client moved (its NAT rebound, it changed
// networks) makes that session's punching probe the new address first,
// with the new IP as the client's observed one (pings from there are
// answered, from the old IP no more) and a fresh small budget; other
// sessions, unknown sessions and addresses the screen refuses are left
// alone.
func TestAgentProbesClientsNewAddress(t *testing.T) {
	setFastPunch(t)
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	u, err := underlay.Open(control.Config{Gateway: "127.0.0.1:1", Key: key, Log: quietLog})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a := &Agent{log: quietLog, u: u, ctx: ctx, offers: map[uint64]*offer{}, punches: map[uint64]*underlay.Direct{}, live: map[uint64]bool{}}
	a.probes.local = func() ([]netip.Prefix, error) { return agentLAN, nil }
	other := netip.MustParseAddrPort("198.18.0.7:4000")
	bob := offerWith(8, other, other)
	bob.PeerName = "bob"
	a.startPunch(offerWith(7, observed, observed), bytes.Repeat([]byte{7}, 32))
	a.startPunch(bob, bytes.Repeat([]byte{8}, 32))
	waitPunches(t, a, 7, 8)
	punchOf := func(id uint64) *punch.Punch {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.punches[id].Punch()
	}
	opOf := func(id uint64) *offerProbes {
		a.probes.mu.Lock()
		defer a.probes.mu.Unlock()
		return a.probes.offers[id]
	}
	// Past the pending offer's budget: nothing more would go out.
	time.Sleep(2 * punch.AttemptDuration)
	if a.probes.allow(opOf(7), observed) {
		t.Fatal("the offer's budget is not spent; the test shows nothing")
	}

	moved := netip.MustParseAddrPort("198.18.0.9:61000") // a new network: another IP
	a.onMoved(7, moved)
	if got := punchOf(7).Candidates(); !slices.Equal(got, []netip.AddrPort{moved, observed}) {
		t.Fatalf("session 7 probes %v; want the new address first", got)
	}
	if got := punchOf(8).Candidates(); !slices.Equal(got, []netip.AddrPort{other}) {
		t.Fatalf("session 8 (another client) probes %v after session 7's client moved", got)
	}
	if obs := opOf(7).screen.Observed; obs != moved.Addr() {
		t.Fatalf("session 7's observed address %v, want %v", obs, moved.Addr())
	}
	if obs := opOf(8).screen.Observed; obs != other.Addr() {
		t.Fatalf("session 8's observed address %v changed", obs)
	}
	if !a.probes.accept(opOf(7), netip.MustParseAddrPort("198.18.0.9:61001")) || a.probes.accept(opOf(7), observed) {
		t.Fatal("pings are not screened by the new observed address")
	}
	// A fresh burst, bounded. The punch spends some of it at once (it
	// probes the new address right away), the rest is left for us.
	n := 0
	for a.probes.allow(opOf(7), moved) {
		n++
	}
	if n < 1 || n > movedProbeBurst {
		t.Fatalf("%d probes left after the move; want 1 to %d", n, movedProbeBurst)
	}
	// Refused addresses, and sessions the agent does not punch for, change
	// nothing.
	a.onMoved(7, netip.MustParseAddrPort("169.254.169.254:80"))
	a.onMoved(7, netip.MustParseAddrPort("10.99.0.5:4000"))
	a.onMoved(99, netip.MustParseAddrPort("198.18.0.10:5000"))
	if got := punchOf(7).Candidates(); !slices.Equal(got, []netip.AddrPort{moved, observed}) {
		t.Fatalf("session 7 probes %v after refused moves", got)
	}
	if obs := opOf(7).screen.Observed; obs != moved.Addr() {
		t.Fatalf("a refused move changed the observed address to %v", obs)
	}
	c := a.probes.snapshot()
	if c["moved"] != 1 || c["refused_link_local"] != 1 || c["refused_foreign_private"] != 1 {
		t.Fatalf("counters %v", c)
	}
	// After the client left, its moves are ignored.
	a.onGone(8)
	a.onMoved(8, netip.MustParseAddrPort("198.18.0.7:61000"))
	if c := a.probes.snapshot()["moved"]; c != 1 {
		t.Fatalf("moved = %d after a move of a client that left", c)
	}
}

// The wide round's budget (allowWide): one round per offer and one per
// client name per punch.WideEvery across offers, never over the burst's
// cap, none for a client that left; it gives the offer no more discovery
// probes; counted.
func TestProbeWideRoundBudget(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1e9, 0)}
	g := testGuard(clock)
	op := g.begin(offerWith(1, observed, observed), "alice", nil, notLive, quietLog)
	drain(g, op) // the offer's discovery budget spent by the normal attempt
	if g.allowWide(op, punch.RoleEasy, punch.BurstProbes+1) {
		t.Fatal("a burst over the cap allowed")
	}
	if g.allowWide(op, punch.RoleNone, 1) {
		t.Fatal("a round without a role allowed")
	}
	if !g.allowWide(op, punch.RoleEasy, punch.BurstProbes) {
		t.Fatal("the offer's first round refused")
	}
	if n := drain(g, op); n != 0 {
		t.Fatalf("after a round granted the offer may send %d more discovery probes, want none", n)
	}
	if g.allowWide(op, punch.RoleEasy, punch.BurstProbes) {
		t.Fatal("a second round for one offer allowed")
	}
	// A new offer (reconnect) under the same name within the minute: no.
	op2 := g.begin(offerWith(2, observed, observed), "alice", nil, notLive, quietLog)
	if g.allowWide(op2, punch.RoleHard, punch.HardSockets) {
		t.Fatal("a second round for one client name within punch.WideEvery allowed")
	}
	// Another client name may.
	s := offerWith(3, observed, observed)
	s.PeerName = "bob"
	if !g.allowWide(g.begin(s, "bob", nil, notLive, quietLog), punch.RoleHard, punch.HardSockets) {
		t.Fatal("another client's round refused")
	}
	// A minute later, alice's new offer may; not once its client left.
	clock.advance(punch.WideEvery)
	op4 := g.begin(offerWith(4, observed, observed), "alice", nil, notLive, quietLog)
	g.gone(4)
	if g.allowWide(op4, punch.RoleEasy, punch.BurstProbes) {
		t.Fatal("a round for a client that left allowed")
	}
	if !g.allowWide(op2, punch.RoleHard, punch.HardSockets) {
		t.Fatal("alice's round refused a minute after the last")
	}
	c := g.snapshot()
	if c["wide_rounds"] != 3 || c["wide_probes"] != punch.BurstProbes || c["wide_sockets"] != 2*punch.HardSockets || c["limited_wide"] != 5 {
		t.Fatalf("counts %v", c)
	}
}
