package punch

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// fastTiming shrinks the package's timing for the test and restores it
// afterwards. Callers must stop every Run before the test ends (the
// cleanup order guarantees that when they register their own cleanup
// after this one).
func fastTiming(t *testing.T) {
	t.Helper()
	pi, ad, ki, la := ProbeInterval, AttemptDuration, KeepaliveInterval, LossAfter
	ProbeInterval = 10 * time.Millisecond
	AttemptDuration = 400 * time.Millisecond
	KeepaliveInterval = 20 * time.Millisecond
	LossAfter = 200 * time.Millisecond
	t.Cleanup(func() { ProbeInterval, AttemptDuration, KeepaliveInterval, LossAfter = pi, ad, ki, la })
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// fakeNet is an in-memory UDP network: each node has an address, frames
// sent to an address are parsed and handed to that node's Punch from the
// sender's address, asynchronously, unless the network is down.
type fakeNet struct {
	mu    sync.Mutex
	nodes map[netip.AddrPort]*Punch
	sent  map[netip.AddrPort]int // frames sent to each address, delivered or not
	down  atomic.Bool
	wg    sync.WaitGroup
}

func newFakeNet() *fakeNet {
	return &fakeNet{nodes: map[netip.AddrPort]*Punch{}, sent: map[netip.AddrPort]int{}}
}

func (n *fakeNet) attach(addr netip.AddrPort, p *Punch) {
	n.mu.Lock()
	n.nodes[addr] = p
	n.mu.Unlock()
}

func (n *fakeNet) sentTo(addr netip.AddrPort) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.sent[addr]
}

// sender returns the Send func of the node at from.
func (n *fakeNet) sender(from netip.AddrPort) func([]byte, netip.AddrPort) error {
	return func(b []byte, to netip.AddrPort) error {
		n.mu.Lock()
		n.sent[to]++
		dst := n.nodes[to]
		n.mu.Unlock()
		if n.down.Load() || dst == nil {
			return nil // lost, like UDP
		}
		pkt := append([]byte(nil), b...)
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			kind, _, payload, err := wire.ParseFrame(pkt)
			if err != nil || kind != wire.FrameProbe {
				return
			}
			dst.Handle(pkt[:wire.FrameHeaderLen], payload, from)
		}()
		return nil
	}
}

type events struct {
	direct chan netip.AddrPort
	lost   chan netip.AddrPort
}

func newEvents() *events {
	return &events{direct: make(chan netip.AddrPort, 16), lost: make(chan netip.AddrPort, 16)}
}

func (e *events) cfg(c Config) Config {
	c.OnDirect = func(r netip.AddrPort, took time.Duration) {
		if took < 0 {
			panic("negative time to confirm")
		}
		e.direct <- r
	}
	c.OnLost = func(r netip.AddrPort) { e.lost <- r }
	c.Log = quiet
	return c
}

func waitFor(t *testing.T, ch <-chan netip.AddrPort, within time.Duration, what string) netip.AddrPort {
	t.Helper()
	select {
	case a := <-ch:
		return a
	case <-time.After(within):
		t.Fatalf("no %s within %v", what, within)
	}
	return netip.AddrPort{}
}

func testKey(b byte) []byte {
	k := make([]byte, 32)
	for i := range k {
		k[i] = b
	}
	return k
}

var (
	addrA = ap("127.0.0.1:1001")
	addrB = ap("127.0.0.1:1002")
	addrC = ap("127.0.0.1:1003")
)

// pair wires two punches for session 9 over net and runs them until the
// test ends.
type pair struct {
	net    *fakeNet
	a, b   *Punch
	ea, eb *events
}

func startPair(t *testing.T, peerA, peerB []netip.AddrPort) *pair {
	t.Helper()
	fastTiming(t)
	p := &pair{net: newFakeNet(), ea: newEvents(), eb: newEvents()}
	key := testKey(7)
	p.a = New(p.ea.cfg(Config{ID: 9, Key: key, Peer: peerA, Send: p.net.sender(addrA)}))
	p.b = New(p.eb.cfg(Config{ID: 9, Key: key, Peer: peerB, Send: p.net.sender(addrB)}))
	p.net.attach(addrA, p.a)
	p.net.attach(addrB, p.b)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.a.Run(ctx) }()
	go func() { defer wg.Done(); p.b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		p.net.wg.Wait()
	})
	return p
}

func TestPunchConfirmsBothWays(t *testing.T) {
	p := startPair(t, []netip.AddrPort{addrB}, []netip.AddrPort{addrA})
	if got := waitFor(t, p.ea.direct, 3*time.Second, "direct path at a"); got != addrB {
		t.Fatalf("a confirmed %v, want %v", got, addrB)
	}
	if got := waitFor(t, p.eb.direct, 3*time.Second, "direct path at b"); got != addrA {
		t.Fatalf("b confirmed %v, want %v", got, addrA)
	}
	r, rtt, ok := p.a.Remote()
	if !ok || r != addrB {
		t.Fatalf("a.Remote() = %v, %v", r, ok)
	}
	if rtt <= 0 || rtt > 2*time.Second {
		t.Fatalf("a's RTT %v is not plausible", rtt)
	}
	heard, sent := p.a.Stats()
	if heard == 0 || sent == 0 {
		t.Fatalf("a.Stats() = heard %d, sent %d; want both > 0", heard, sent)
	}
	if bad, mal := p.a.Drops(); bad != 0 || mal != 0 {
		t.Fatalf("drops on a clean network: badMAC %d, malformed %d", bad, mal)
	}
	// Keepalives hold it: no loss while the network is up.
	select {
	case r := <-p.ea.lost:
		t.Fatalf("a lost the path to %v on a healthy network", r)
	case <-time.After(3 * LossAfter):
	}
}

func TestPunchOneSideUnknownPeerReflexive(t *testing.T) {
	// a knows no candidate for b (say b's NAT mapped it anew); b's pings
	// teach a where b is, and a probes that address back.
	p := startPair(t, nil, []netip.AddrPort{addrA})
	if got := waitFor(t, p.ea.direct, 3*time.Second, "direct path at a"); got != addrB {
		t.Fatalf("a confirmed %v, want %v", got, addrB)
	}
	waitFor(t, p.eb.direct, 3*time.Second, "direct path at b")
	if c := p.a.Candidates(); len(c) != 1 || c[0] != addrB {
		t.Fatalf("a's candidates %v; want the learned %v", c, addrB)
	}
}

func TestPunchLossThenRecovery(t *testing.T) {
	p := startPair(t, []netip.AddrPort{addrB}, []netip.AddrPort{addrA})
	waitFor(t, p.ea.direct, 3*time.Second, "direct path at a")
	waitFor(t, p.eb.direct, 3*time.Second, "direct path at b")

	p.net.down.Store(true)
	start := time.Now()
	if got := waitFor(t, p.ea.lost, 3*time.Second, "OnLost at a"); got != addrB {
		t.Fatalf("a lost %v, want %v", got, addrB)
	}
	if took := time.Since(start); took < LossAfter/2 {
		t.Fatalf("a gave up after %v, well before LossAfter %v", took, LossAfter)
	}
	waitFor(t, p.eb.lost, 3*time.Second, "OnLost at b")
	if _, _, ok := p.a.Remote(); ok {
		t.Fatal("a still reports a direct path after losing it")
	}

	p.net.down.Store(false)
	// Run retries (after one failed attempt and a backoff of ~1 s at most).
	if got := waitFor(t, p.ea.direct, 5*time.Second, "re-confirmed path at a"); got != addrB {
		t.Fatalf("a re-confirmed %v, want %v", got, addrB)
	}
	waitFor(t, p.eb.direct, 5*time.Second, "re-confirmed path at b")
}

func TestPunchNothingAnswers(t *testing.T) {
	fastTiming(t)
	n := newFakeNet()
	e := newEvents()
	a := New(e.cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB, addrC}, Send: n.sender(addrA)}))
	ctx, cancel := context.WithTimeout(context.Background(), 3*AttemptDuration/2)
	defer cancel()
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
	select {
	case r := <-e.direct:
		t.Fatalf("confirmed %v with nobody answering", r)
	default:
	}
	heard, sent := a.Stats()
	if heard != 0 {
		t.Fatalf("heard %d pings from nobody", heard)
	}
	if sent < 4 {
		t.Fatalf("sent only %d pings in an attempt", sent)
	}
	if n.sentTo(addrB) == 0 || n.sentTo(addrC) == 0 {
		t.Fatalf("not every candidate probed: %v", n.sent)
	}
}

// probeFrame builds a whole probe frame as p would send it.
func probeFrame(p *Punch, typ byte, nonce uint64) []byte { return p.probe(typ, nonce) }

func handleFrame(p *Punch, frame []byte, from netip.AddrPort) error {
	return p.Handle(frame[:wire.FrameHeaderLen], frame[wire.FrameHeaderLen:], from)
}

func TestHandleRejectsForgedProbes(t *testing.T) {
	n := newFakeNet()
	e := newEvents()
	a := New(e.cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: n.sender(addrA)}))
	evil := New(Config{ID: 9, Key: testKey(8), Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})
	otherSession := New(Config{ID: 10, Key: testKey(7), Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})

	// a has a ping outstanding to b, so a forged pong has something to hit.
	a.ping(addrB)
	var nonce uint64
	a.mu.Lock()
	for k := range a.sent {
		nonce = k
	}
	a.mu.Unlock()

	good := probeFrame(a, probePong, nonce)
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)-1] ^= 1
	nonceChanged := append([]byte(nil), good...)
	nonceChanged[wire.FrameHeaderLen+1] ^= 1
	typeChanged := probeFrame(a, probePing, nonce)
	typeChanged[wire.FrameHeaderLen] = probePong // MAC covers the type

	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"ping under another key", probeFrame(evil, probePing, 1)},
		{"pong under another key", probeFrame(evil, probePong, nonce)},
		{"pong of another session replayed", probeFrame(otherSession, probePong, nonce)},
		{"flipped MAC bit", flipped},
		{"changed nonce", nonceChanged},
		{"changed type", typeChanged},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad0, _ := a.Drops()
			before := n.sentTo(addrC)
			heard0, _ := a.Stats()
			f := tc.frame
			if tc.name == "pong of another session replayed" {
				// Same key, session 10's MAC, relabelled as session 9.
				f = append([]byte(nil), f...)
				binary.BigEndian.PutUint64(f[1:9], 9)
			}
			if err := handleFrame(a, f, addrC); !errors.Is(err, ErrBadProbe) {
				t.Fatalf("Handle = %v, want ErrBadProbe", err)
			}
			if bad, _ := a.Drops(); bad != bad0+1 {
				t.Fatalf("bad-MAC drops %d → %d, want +1", bad0, bad)
			}
			if heard, _ := a.Stats(); heard != heard0 {
				t.Fatal("a forged ping counted as heard")
			}
			if n.sentTo(addrC) != before {
				t.Fatal("a forged probe was answered")
			}
			if _, _, ok := a.Remote(); ok {
				t.Fatal("a forged probe confirmed a path")
			}
			for _, c := range a.Candidates() {
				if c == addrC {
					t.Fatal("a forged ping added its source as a candidate")
				}
			}
		})
	}
	select {
	case r := <-e.direct:
		t.Fatalf("OnDirect(%v) after forged probes", r)
	default:
	}

	// The real pong still confirms, from where it came.
	if err := handleFrame(a, good, addrB); err != nil {
		t.Fatal(err)
	}
	if r, _, ok := a.Remote(); !ok || r != addrB {
		t.Fatalf("genuine pong: Remote = %v, %v", r, ok)
	}
	// Replaying it confirms nothing new and is harmless.
	if err := handleFrame(a, good, addrC); err != nil {
		t.Fatalf("replayed pong: %v", err)
	}
	if r, _, _ := a.Remote(); r != addrB {
		t.Fatalf("a replayed pong moved the path to %v", r)
	}
}

func TestHandleMalformed(t *testing.T) {
	n := newFakeNet()
	a := New(Config{ID: 9, Key: testKey(7), Send: n.sender(addrA), Log: quiet})
	good := probeFrame(a, probePing, 5)
	payload := good[wire.FrameHeaderLen:]
	hdr := good[:wire.FrameHeaderLen]
	badType := append([]byte(nil), payload...)
	badType[0] = 3
	for i, tc := range []struct {
		name    string
		payload []byte
	}{
		{"empty", nil},
		{"one byte", []byte{probePing}},
		{"short by one", payload[:len(payload)-1]},
		{"long by one", append(append([]byte(nil), payload...), 0)},
		{"unknown type", badType},
		{"type zero", make([]byte, probeLen)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := a.Handle(hdr, tc.payload, addrB); !errors.Is(err, ErrBadProbe) {
				t.Fatalf("Handle = %v, want ErrBadProbe", err)
			}
			if _, mal := a.Drops(); mal != uint64(i+1) {
				t.Fatalf("malformed drops = %d, want %d", mal, i+1)
			}
		})
	}
	if n.sentTo(addrB) != 0 {
		t.Fatal("a malformed probe was answered")
	}
	if bad, _ := a.Drops(); bad != 0 {
		t.Fatalf("malformed probes counted as bad MAC: %d", bad)
	}
}

func TestPingIsAnsweredAndLearned(t *testing.T) {
	var mu sync.Mutex
	var replies []struct {
		b  []byte
		to netip.AddrPort
	}
	send := func(b []byte, to netip.AddrPort) error {
		mu.Lock()
		defer mu.Unlock()
		replies = append(replies, struct {
			b  []byte
			to netip.AddrPort
		}{append([]byte(nil), b...), to})
		return nil
	}
	a := New(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: send, Log: quiet})
	peer := New(Config{ID: 9, Key: testKey(7), Send: send, Log: quiet})

	// From a known address: answered, not re-added.
	if err := handleFrame(a, probeFrame(peer, probePing, 77), addrB); err != nil {
		t.Fatal(err)
	}
	// From an unknown one (v4-mapped, as a dual-stack socket reports it):
	// answered there and learned, unmapped.
	mapped := netip.AddrPortFrom(netip.AddrFrom16(addrC.Addr().As16()), addrC.Port())
	if err := handleFrame(a, probeFrame(peer, probePing, 78), mapped); err != nil {
		t.Fatal(err)
	}
	if c := a.Candidates(); len(c) != 2 || c[0] != addrB || c[1] != addrC {
		t.Fatalf("candidates %v, want [%v %v]", c, addrB, addrC)
	}
	if heard, sent := a.Stats(); heard != 2 || sent != 0 {
		t.Fatalf("Stats = heard %d sent %d, want 2, 0", heard, sent)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(replies) != 2 {
		t.Fatalf("%d replies, want 2", len(replies))
	}
	for i, want := range []struct {
		to    netip.AddrPort
		nonce uint64
	}{{addrB, 77}, {addrC, 78}} {
		r := replies[i]
		if r.to != want.to {
			t.Errorf("reply %d went to %v, want %v", i, r.to, want.to)
		}
		kind, id, payload, err := wire.ParseFrame(r.b)
		if err != nil || kind != wire.FrameProbe || id != 9 {
			t.Fatalf("reply %d: kind %d id %d err %v", i, kind, id, err)
		}
		if payload[0] != probePong || binary.BigEndian.Uint64(payload[1:9]) != want.nonce {
			t.Errorf("reply %d is not the pong for nonce %d: %x", i, want.nonce, payload)
		}
		// The pong verifies under the shared key.
		if err := peer.Handle(r.b[:wire.FrameHeaderLen], payload, r.to); err != nil {
			t.Errorf("reply %d does not verify: %v", i, err)
		}
	}
}

func TestLearnedCandidatesAreCapped(t *testing.T) {
	a := New(Config{ID: 9, Key: testKey(7), Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})
	peer := New(Config{ID: 9, Key: testKey(7), Log: quiet})
	for i := range 3 * MaxCandidates {
		from := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(2000+i))
		if err := handleFrame(a, probeFrame(peer, probePing, uint64(i)), from); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(a.Candidates()); n != MaxCandidates {
		t.Fatalf("%d candidates after %d ping sources, want the cap %d", n, 3*MaxCandidates, MaxCandidates)
	}
}

func TestPongFromUnexpectedAddressWhileConfirmed(t *testing.T) {
	a := New(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB, addrC}, Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})
	var directs atomic.Int32
	a.cfg.OnDirect = func(netip.AddrPort, time.Duration) { directs.Add(1) }
	a.ping(addrB)
	a.ping(addrC)
	if err := handleFrame(a, probeFrame(a, probePong, nonceTo(a, addrB)), addrB); err != nil {
		t.Fatal(err)
	}
	if err := handleFrame(a, probeFrame(a, probePong, nonceTo(a, addrC)), addrC); err != nil {
		t.Fatal(err)
	}
	if r, _, _ := a.Remote(); r != addrB {
		t.Fatalf("the first confirmed pair must win; Remote = %v", r)
	}
	if n := directs.Load(); n != 1 {
		t.Fatalf("OnDirect called %d times, want 1", n)
	}
}

func FuzzHandle(f *testing.F) {
	seed := New(Config{ID: 9, Key: testKey(7), Log: quiet})
	good := seed.probe(probePing, 1)
	f.Add(good[:wire.FrameHeaderLen], good[wire.FrameHeaderLen:])
	f.Add([]byte{}, []byte{})
	f.Add(good[:wire.FrameHeaderLen], make([]byte, probeLen))
	f.Fuzz(func(t *testing.T, hdr, payload []byte) {
		var sends atomic.Int32
		p := New(Config{ID: 9, Key: testKey(7), Send: func([]byte, netip.AddrPort) error { sends.Add(1); return nil }, Log: quiet})
		err := p.Handle(hdr, payload, addrB)
		bad, mal := p.Drops()
		if err != nil {
			if !errors.Is(err, ErrBadProbe) || bad+mal != 1 {
				t.Fatalf("err %v, drops %d+%d", err, bad, mal)
			}
			if sends.Load() != 0 {
				t.Fatal("a rejected probe was answered")
			}
		}
		// With no ping outstanding, nothing can confirm a path.
		if _, _, ok := p.Remote(); ok {
			t.Fatal("random input confirmed a path")
		}
	})
}

// nonceTo is the nonce of p's outstanding ping to addr.
func nonceTo(p *Punch, addr netip.AddrPort) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	for n, s := range p.sent {
		if s.to == addr {
			return n
		}
	}
	panic("no ping outstanding to " + addr.String())
}

// A pong confirms only the address its ping went to: a peer holding the
// key (it sees its own nonces) must not be able to confirm a stranger's
// address as the path by forging the pong's source.
func TestPongOnlyFromWherePingWent(t *testing.T) {
	a := New(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})
	a.ping(addrB)
	n := nonceTo(a, addrB)
	if err := handleFrame(a, probeFrame(a, probePong, n), addrC); err != nil {
		t.Fatal(err)
	}
	if r, _, ok := a.Remote(); ok {
		t.Fatalf("a pong from %v for a ping to %v confirmed %v", addrC, addrB, r)
	}
	// The nonce is still good where it went.
	if err := handleFrame(a, probeFrame(a, probePong, n), addrB); err != nil {
		t.Fatal(err)
	}
	if r, _, ok := a.Remote(); !ok || r != addrB {
		t.Fatalf("the genuine pong: Remote = %v, %v", r, ok)
	}
}

// Gate is asked before every discovery probe; what it refuses is not sent
// and is counted. Keepalives on a confirmed path do not ask it.
func TestGateLimitsDiscoveryOnly(t *testing.T) {
	fastTiming(t)
	n := newFakeNet()
	var asked atomic.Int32
	allowB := atomic.Bool{}
	gate := func(to netip.AddrPort) bool {
		asked.Add(1)
		return to == addrB && allowB.Load()
	}
	e := newEvents()
	a := New(e.cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB, addrC}, Send: n.sender(addrA), Gate: gate}))
	b := New(newEvents().cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrA}, Send: n.sender(addrB)}))
	n.attach(addrA, a)
	n.attach(addrB, b)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); a.Run(ctx) }()
	go func() { defer wg.Done(); b.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait(); n.wg.Wait() })

	time.Sleep(10 * ProbeInterval)
	if got := n.sentTo(addrC); got != 0 {
		t.Fatalf("%d probes to %v, which the gate refuses", got, addrC)
	}
	if _, _, ok := a.Remote(); ok {
		t.Fatal("a confirmed a path with every probe refused")
	}
	if g, _ := a.Limited(); g == 0 {
		t.Fatal("refused probes not counted")
	}
	allowB.Store(true)
	waitFor(t, e.direct, 3*time.Second, "direct path at a once the gate lets b through")
	// Holding the path: keepalives flow, the gate is not asked.
	time.Sleep(2 * KeepaliveInterval)
	before, sentB := asked.Load(), n.sentTo(addrB)
	time.Sleep(5 * KeepaliveInterval)
	if asked.Load() != before {
		t.Fatalf("the gate was asked %d times for keepalives", asked.Load()-before)
	}
	if n.sentTo(addrB) == sentB {
		t.Fatal("no keepalives on the confirmed path")
	}
	if got := n.sentTo(addrC); got != 0 {
		t.Fatalf("%d probes to %v, which the gate refuses", got, addrC)
	}
}

// Accept screens where the peer's pings come from: a refused source is
// neither answered nor learned.
func TestAcceptScreensPingSources(t *testing.T) {
	var sends []netip.AddrPort
	var mu sync.Mutex
	send := func(_ []byte, to netip.AddrPort) error { mu.Lock(); sends = append(sends, to); mu.Unlock(); return nil }
	a := New(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: send, Log: quiet,
		Accept: func(from netip.AddrPort) bool { return from != addrC }})
	peer := New(Config{ID: 9, Key: testKey(7), Log: quiet})
	for i, from := range []netip.AddrPort{addrB, addrC, ap("127.0.0.1:1004")} {
		if err := handleFrame(a, probeFrame(peer, probePing, uint64(i)), from); err != nil {
			t.Fatal(err)
		}
	}
	mu.Lock()
	got := append([]netip.AddrPort(nil), sends...)
	mu.Unlock()
	if want := []netip.AddrPort{addrB, ap("127.0.0.1:1004")}; !slices.Equal(got, want) {
		t.Fatalf("pongs went to %v, want %v", got, want)
	}
	if c := a.Candidates(); !slices.Equal(c, []netip.AddrPort{addrB, ap("127.0.0.1:1004")}) {
		t.Fatalf("candidates %v; %v must not be learned", c, addrC)
	}
	if _, r := a.Limited(); r != 1 {
		t.Fatalf("refused sources counted %d, want 1", r)
	}
}

// AddPeer, told during the wait between attempts, probes the peer's new
// address at once (not after the backoff) and first, and the path comes up.
func TestAddPeerProbesAtOnce(t *testing.T) {
	fastTiming(t)
	n := newFakeNet()
	ea, eb := newEvents(), newEvents()
	key := testKey(7)
	// a knows only a dead address of b (b's NAT rebound); b knows nothing
	// of a and learns it from a's pings.
	a := New(ea.cfg(Config{ID: 9, Key: key, Peer: []netip.AddrPort{addrC}, Send: n.sender(addrA)}))
	b := New(eb.cfg(Config{ID: 9, Key: key, Send: n.sender(addrB)}))
	n.attach(addrA, a)
	n.attach(addrB, b)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); a.Run(ctx) }()
	go func() { defer wg.Done(); b.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait(); n.wg.Wait() })

	// a's first attempt fails; it then waits a backoff of 1 s.
	time.Sleep(AttemptDuration + 100*time.Millisecond)
	if n.sentTo(addrB) != 0 {
		t.Fatal("a probed b's new address before being told")
	}
	start := time.Now()
	a.AddPeer(netip.AddrPortFrom(netip.AddrFrom16(addrB.Addr().As16()), addrB.Port())) // 4in6, as a socket may give it
	if got := waitFor(t, ea.direct, 3*time.Second, "direct path at a"); got != addrB {
		t.Fatalf("a confirmed %v, want %v", got, addrB)
	}
	if took := time.Since(start); took > 300*time.Millisecond {
		t.Fatalf("direct path %v after AddPeer; the backoff (1 s) was not cut", took)
	}
	if c := a.Candidates(); !slices.Equal(c, []netip.AddrPort{addrB, addrC}) {
		t.Fatalf("candidates %v, want the new address first", c)
	}
	// Told again (the same address): no duplicate.
	a.AddPeer(addrB)
	if c := a.Candidates(); len(c) != 2 {
		t.Fatalf("candidates %v after adding a known one", c)
	}
}

// AddPeer keeps at most MaxCandidates, dropping the last.
func TestAddPeerCapped(t *testing.T) {
	var cands []netip.AddrPort
	for i := range MaxCandidates {
		cands = append(cands, netip.AddrPortFrom(addrC.Addr(), uint16(2000+i)))
	}
	p := New(Config{ID: 9, Key: testKey(7), Peer: cands, Send: func([]byte, netip.AddrPort) error { return nil }, Log: quiet})
	p.AddPeer(addrB)
	c := p.Candidates()
	if len(c) != MaxCandidates || c[0] != addrB || c[MaxCandidates-1] != cands[MaxCandidates-2] {
		t.Fatalf("candidates %v", c)
	}
}

// Pinged hears of each authentic ping answered while no path is confirmed,
// after its pong went out, and of nothing else: not a ping from a refused
// source, not a pong, not a forged ping, not a ping once the path is
// confirmed.
func TestPingedOnlyWhileUnconfirmed(t *testing.T) {
	var mu sync.Mutex
	var log []string // "pong to X" and "pinged from X", in order
	a := New(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Log: quiet,
		Send: func(b []byte, to netip.AddrPort) error {
			mu.Lock()
			defer mu.Unlock()
			if _, _, payload, err := wire.ParseFrame(b); err == nil && payload[0] == probePong {
				log = append(log, "pong to "+to.String())
			}
			return nil
		},
		Accept: func(from netip.AddrPort) bool { return from != addrC },
		Pinged: func(from netip.AddrPort) {
			mu.Lock()
			defer mu.Unlock()
			log = append(log, "pinged from "+from.String())
		}})
	peer := New(Config{ID: 9, Key: testKey(7), Log: quiet})
	other := New(Config{ID: 9, Key: testKey(8), Log: quiet})
	handleFrame(a, probeFrame(peer, probePing, 1), addrB)  // heard
	handleFrame(a, probeFrame(peer, probePing, 2), addrC)  // refused source
	handleFrame(a, probeFrame(other, probePing, 3), addrB) // forged
	a.ping(addrB)
	handleFrame(a, probeFrame(peer, probePong, nonceTo(a, addrB)), addrB) // a pong: confirms
	if _, _, ok := a.Remote(); !ok {
		t.Fatal("not confirmed by the pong")
	}
	handleFrame(a, probeFrame(peer, probePing, 4), addrB) // confirmed: answered only
	mu.Lock()
	defer mu.Unlock()
	want := []string{"pong to " + addrB.String(), "pinged from " + addrB.String(), "pong to " + addrB.String()}
	if !slices.Equal(log, want) {
		t.Fatalf("got %q, want %q", log, want)
	}
}
