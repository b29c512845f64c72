package punch

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestWideRole(t *testing.T) {
	const local = 40000
	self := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), port) }
	peerObs := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.18.3.2"), port) }
	peerCands := func(obs netip.AddrPort, localPort uint16) []netip.AddrPort {
		return []netip.AddrPort{obs, netip.AddrPortFrom(netip.MustParseAddr("10.0.2.2"), localPort)}
	}
	for _, tc := range []struct {
		name      string
		self      netip.AddrPort
		peerObs   netip.AddrPort
		peerCands []netip.AddrPort
		want      Role
	}{
		{"cone-cone", self(local), peerObs(50000), peerCands(peerObs(50000), 50000), RoleNone},
		{"symmetric-cone", self(61234), peerObs(50000), peerCands(peerObs(50000), 50000), RoleHard},
		{"cone-symmetric", self(local), peerObs(2222), peerCands(peerObs(2222), 50000), RoleEasy},
		{"symmetric-symmetric", self(61234), peerObs(2222), peerCands(peerObs(2222), 50000), RoleNone},
		{"public peer (its observed address is its candidate)", self(61234), peerObs(50000), []netip.AddrPort{peerObs(50000)}, RoleNone},
		{"peer's local port unknown", self(local), peerObs(2222), nil, RoleNone},
		{"own observed address unknown", netip.AddrPort{}, peerObs(2222), peerCands(peerObs(2222), 50000), RoleNone},
		{"peer's observed address unknown", self(local), netip.AddrPort{}, peerCands(peerObs(2222), 50000), RoleNone},
	} {
		if got := WideRole(tc.self, local, tc.peerObs, tc.peerCands); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestRandomPorts(t *testing.T) {
	ip := netip.MustParseAddr("198.18.3.2")
	for _, n := range []int{0, 1, 300, BurstProbes, 5000} {
		ps := RandomPorts(ip, n)
		if want := min(n, BurstProbes); len(ps) != want {
			t.Fatalf("RandomPorts(%d): %d ports, want %d", n, len(ps), want)
		}
		seen := map[uint16]bool{}
		for _, p := range ps {
			if p.Addr() != ip || p.Port() < PortFirst || seen[p.Port()] {
				t.Fatalf("RandomPorts(%d): %v (another IP, a port below %d, or twice)", n, p, PortFirst)
			}
			seen[p.Port()] = true
		}
	}
}

func TestBurst(t *testing.T) {
	ip := netip.MustParseAddr("198.18.3.2")
	never := func() bool { return false }
	t.Run("count and pacing", func(t *testing.T) {
		var sent []netip.AddrPort
		start := time.Now()
		n := Burst(context.Background(), RandomPorts(ip, 100), BurstRate, func(a netip.AddrPort) { sent = append(sent, a) }, never)
		took := time.Since(start)
		if n != 100 || len(sent) != 100 {
			t.Fatalf("sent %d (counted %d), want 100", len(sent), n)
		}
		// 100 at 200/s: half a second; the last tick's wait is not needed.
		if took < 450*time.Millisecond || took > 2*time.Second {
			t.Fatalf("100 pings at %d/s took %v", BurstRate, took)
		}
	})
	t.Run("rate capped", func(t *testing.T) {
		start := time.Now()
		n := Burst(context.Background(), RandomPorts(ip, 60), 100000, func(netip.AddrPort) {}, never)
		if took := time.Since(start); n != 60 || took < 250*time.Millisecond {
			t.Fatalf("sent %d in %v: faster than %d/s", n, took, BurstRate)
		}
	})
	t.Run("count capped", func(t *testing.T) {
		targets := make([]netip.AddrPort, 3*BurstProbes)
		for i := range targets {
			targets[i] = netip.AddrPortFrom(ip, uint16(1024+i))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		var n atomic.Int64
		if got := Burst(ctx, targets, BurstRate, func(netip.AddrPort) { n.Add(1) }, never); got != BurstProbes || n.Load() != BurstProbes {
			t.Fatalf("sent %d (counted %d) of %d targets, want the cap %d", n.Load(), got, len(targets), BurstProbes)
		}
	})
	t.Run("stops on success", func(t *testing.T) {
		var n atomic.Int64
		got := Burst(context.Background(), RandomPorts(ip, 500), BurstRate, func(netip.AddrPort) { n.Add(1) }, func() bool { return n.Load() >= 10 })
		if got != 10 || n.Load() != 10 {
			t.Fatalf("sent %d after success at 10", n.Load())
		}
	})
	t.Run("stops with ctx", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		got := Burst(ctx, RandomPorts(ip, 500), BurstRate, func(netip.AddrPort) {}, never)
		if got < 20 || got > 60 {
			t.Fatalf("sent %d in 200 ms at %d/s", got, BurstRate)
		}
	})
}

// Stuck is called once per attempt, WideAfter into it, and only while no
// path is confirmed.
func TestStuckAfterTheNormalAttempt(t *testing.T) {
	fastTiming(t)
	wa := WideAfter
	WideAfter = 100 * time.Millisecond
	t.Cleanup(func() { WideAfter = wa })

	t.Run("nothing answers", func(t *testing.T) {
		n := newFakeNet()
		var mu sync.Mutex
		var calls []time.Duration
		start := time.Now()
		a := New(newEvents().cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: n.sender(addrA),
			Stuck: func() {
				mu.Lock()
				calls = append(calls, time.Since(start))
				mu.Unlock()
			}}))
		// One attempt (400 ms) and most of the 1 s wait after it.
		ctx, cancel := context.WithTimeout(context.Background(), AttemptDuration+500*time.Millisecond)
		defer cancel()
		a.Run(ctx)
		n.wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(calls) != 1 || calls[0] < WideAfter || calls[0] > AttemptDuration {
			t.Fatalf("Stuck called at %v, want once, %v into the attempt", calls, WideAfter)
		}
	})
	t.Run("direct at once", func(t *testing.T) {
		var stuck atomic.Int64
		n := newFakeNet()
		ea, eb := newEvents(), newEvents()
		a := New(ea.cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrB}, Send: n.sender(addrA), Stuck: func() { stuck.Add(1) }}))
		b := New(eb.cfg(Config{ID: 9, Key: testKey(7), Peer: []netip.AddrPort{addrA}, Send: n.sender(addrB), Stuck: func() { stuck.Add(1) }}))
		n.attach(addrA, a)
		n.attach(addrB, b)
		ctx, cancel := context.WithTimeout(context.Background(), 3*WideAfter)
		defer cancel()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); a.Run(ctx) }()
		go func() { defer wg.Done(); b.Run(ctx) }()
		waitFor(t, ea.direct, time.Second, "direct path")
		wg.Wait()
		n.wg.Wait()
		if s := stuck.Load(); s != 0 {
			t.Fatalf("Stuck called %d times on a path confirmed at once", s)
		}
	})
}
