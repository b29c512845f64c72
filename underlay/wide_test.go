package underlay

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
)

// fastWide shortens the wide round's timing for a test.
func fastWide(t *testing.T) {
	wa, ad, ttl := punch.WideAfter, punch.AttemptDuration, wideTTL
	punch.WideAfter, punch.AttemptDuration, wideTTL = 100*time.Millisecond, 400*time.Millisecond, time.Second
	t.Cleanup(func() { punch.WideAfter, punch.AttemptDuration, wideTTL = wa, ad, ttl })
}

// deadAddr is a loopback address nothing listens on.
func deadAddr(t *testing.T) netip.AddrPort {
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	a := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return a
}

func waitUntil(t *testing.T, within time.Duration, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The hard side of a wide round: after the normal attempt fails it opens
// at most punch.HardSockets extra sockets, each pinging the peer; the one
// the peer answers carries the direct path (the peer sees the session
// come from that socket, not from the node's port), the others close at
// once, and the last one closes with the session.
func TestWideHardSideAdoptsTheSocketThatWasHit(t *testing.T) {
	fastWide(t)
	a, b := openTest(t, true), openTest(t, true)
	const id = 0x3a3a
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	upA, upB := make(chan netip.AddrPort, 4), make(chan netip.AddrPort, 4)
	// Neither knows a candidate that works: the normal attempt fails. A
	// answers pings from anywhere (it is the easy side, in no round).
	da := a.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Log: quiet,
		OnDirect: func(r netip.AddrPort, _ time.Duration) { upA <- r }})
	defer da.Close()
	// B's discovery budget is spent (as an agent's may be by then): the
	// round's own pings open the mappings and confirm the hit.
	db := b.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Log: quiet, Role: punch.RoleHard, PeerObserved: a.addr,
		Peer: []netip.AddrPort{deadAddr(t)}, Gate: func(netip.AddrPort) bool { return false },
		OnDirect: func(r netip.AddrPort, _ time.Duration) { upB <- r }})
	var remoteA, remoteB netip.AddrPort
	for remoteA == (netip.AddrPort{}) || remoteB == (netip.AddrPort{}) {
		select {
		case remoteA = <-upA:
		case remoteB = <-upB:
		case <-time.After(5 * time.Second):
			t.Fatal("no direct path through the wide round")
		}
	}
	if remoteB != a.addr {
		t.Fatalf("hard side's path goes to %v, want the peer's %v", remoteB, a.addr)
	}
	if remoteA == b.addr || remoteA.Port() == b.addr.Port() {
		t.Fatalf("easy side's path goes to the hard side's port %v, want one of its extra sockets", remoteA)
	}
	ws := db.Wide()
	if ws.Rounds != 1 || ws.Sockets == 0 || ws.Sockets > punch.HardSockets || ws.Probes != 0 {
		t.Fatalf("wide stats %+v: want one round of 1..%d sockets", ws, punch.HardSockets)
	}
	// The others close (at once, or at the round's end), the hit one stays.
	waitUntil(t, 3*wideTTL, "only the adopted socket left open", func() bool { return b.wideOpen.Load() == 1 })
	// The session's frames cross it: a packet from B reaches A's session.
	got := make(chan []byte, 1)
	go func() {
		buf := make([]byte, 2048)
		a.Conn.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, _, err := a.Conn.ReadFrom(buf)
		if err == nil {
			got <- buf[:n]
		}
	}()
	if _, err := b.Conn.WriteTo([]byte("through the extra socket"), session.Addr(id)); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-got:
		if string(p) != "through the extra socket" {
			t.Fatalf("got %q", p)
		}
	case <-time.After(4 * time.Second):
		t.Fatal("a session packet did not cross the adopted socket")
	}
	db.Close()
	if n := b.wideOpen.Load(); n != 0 {
		t.Fatalf("%d extra sockets open after the session closed", n)
	}
}

// A round that finds nothing closes every socket after wideTTL, and the
// next attempt's Stuck starts no other round within punch.WideEvery. A
// round the budget refuses opens nothing; an easy or hard role needs a
// round; a node in no role (cone ↔ cone, symmetric ↔ symmetric) has none.
func TestWideRoundBoundedAndClosed(t *testing.T) {
	fastWide(t)
	t.Run("no hit", func(t *testing.T) {
		b := openTest(t, true)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var peak atomic.Int32
		db := b.StartDirect(ctx, DirectConfig{ID: 7, Key: probeKey(), Log: quiet, Role: punch.RoleHard, PeerObserved: deadAddr(t)})
		defer db.Close()
		start := time.Now()
		for time.Since(start) < 3*wideTTL {
			peak.Store(max(peak.Load(), b.wideOpen.Load()))
			time.Sleep(5 * time.Millisecond)
		}
		if p := peak.Load(); p == 0 || p > punch.HardSockets {
			t.Fatalf("at most %d extra sockets open at once, want 1..%d", p, punch.HardSockets)
		}
		if n := b.wideOpen.Load(); n != 0 {
			t.Fatalf("%d extra sockets open %v after a round that found nothing", n, 3*wideTTL)
		}
		// (Fewer than all of them if opening them took longer than the
		// round's 1 s, as under -race on a loaded machine.)
		if ws := db.Wide(); ws.Rounds != 1 || ws.Sockets == 0 || ws.Sockets > punch.HardSockets {
			t.Fatalf("wide stats %+v over several attempts, want one round of 1..%d sockets", ws, punch.HardSockets)
		}
	})
	t.Run("refused by the budget", func(t *testing.T) {
		b := openTest(t, true)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var asked atomic.Int32
		db := b.StartDirect(ctx, DirectConfig{ID: 7, Key: probeKey(), Log: quiet, Role: punch.RoleHard, PeerObserved: deadAddr(t),
			Wide: func(role punch.Role, n int) bool {
				if role != punch.RoleHard || n != punch.HardSockets {
					t.Errorf("asked for %v %d", role, n)
				}
				asked.Add(1)
				return false
			}})
		defer db.Close()
		waitUntil(t, 2*time.Second, "the budget asked", func() bool { return asked.Load() > 0 })
		time.Sleep(200 * time.Millisecond)
		if ws := db.Wide(); ws.Rounds != 0 || ws.Sockets != 0 || b.wideOpen.Load() != 0 {
			t.Fatalf("a refused round: %+v, %d open", ws, b.wideOpen.Load())
		}
	})
	t.Run("no role", func(t *testing.T) {
		b := openTest(t, true)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// No welcome, so no observed address to guess from: no role.
		db := b.StartDirect(ctx, DirectConfig{ID: 7, Key: probeKey(), Log: quiet, PeerObserved: deadAddr(t),
			Wide: func(punch.Role, int) bool { t.Error("a round asked for without a role"); return false }})
		defer db.Close()
		time.Sleep(time.Second)
		if ws := db.Wide(); ws.Rounds != 0 {
			t.Fatalf("wide stats %+v without a role", ws)
		}
	})
}

// The easy side's burst can open its NAT toward a port of the hard side
// before the hard side's NAT has a mapping there (the burst ping is
// dropped); when one of the hard side's extra sockets then gets that port,
// its first ping crosses, our pong confirms the path its way, and the hard
// side stops confirming (its confirm pings end once it has a path). The
// easy side, whose discovery budget is spent by then (the agent's Gate,
// before its session is live), must still confirm the path its way: else
// a direct-only session stays on nothing at this end and the end-to-end
// handshake times out (seen in e2e TestConeSymmetricGoesDirect).
//
// On loopback the hard side's pings reach the easy side as if the burst
// had opened its NAT; the burst itself never starts (wideDelay), as when
// its pings were all dropped.
func TestWideEasySideConfirmsAHitThatCrossedItsBurst(t *testing.T) {
	fastWide(t)
	wd := wideDelay
	wideDelay = time.Hour
	t.Cleanup(func() { wideDelay = wd })
	a, b := openTest(t, true), openTest(t, true)
	const id = 0x3b3b
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	upA, upB := make(chan netip.AddrPort, 4), make(chan netip.AddrPort, 4)
	var gatedA atomic.Int32
	da := a.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Log: quiet, Role: punch.RoleEasy, PeerObserved: b.addr,
		Peer: []netip.AddrPort{deadAddr(t)}, Gate: func(netip.AddrPort) bool { gatedA.Add(1); return false },
		OnDirect: func(r netip.AddrPort, _ time.Duration) { upA <- r }})
	db := b.StartDirect(ctx, DirectConfig{ID: id, Key: probeKey(), Log: quiet, Role: punch.RoleHard, PeerObserved: a.addr,
		Peer: []netip.AddrPort{deadAddr(t)}, Gate: func(netip.AddrPort) bool { return false },
		OnDirect: func(r netip.AddrPort, _ time.Duration) { upB <- r }})
	// Before the timing is restored: nothing of either may run then.
	t.Cleanup(func() { da.Close(); db.Close(); <-da.Done(); <-db.Done() })
	var remoteA, remoteB netip.AddrPort
	for remoteA == (netip.AddrPort{}) || remoteB == (netip.AddrPort{}) {
		select {
		case remoteA = <-upA:
		case remoteB = <-upB:
		case <-time.After(5 * time.Second):
			t.Fatalf("direct at the easy side: %v, at the hard side: %v; want both (easy side's discovery pings refused: %d)", remoteA, remoteB, gatedA.Load())
		}
	}
	if remoteB != a.addr || remoteA.Port() == b.addr.Port() {
		t.Fatalf("paths %v (easy) and %v (hard): want the hard side's extra socket and the easy side's port", remoteA, remoteB)
	}
	if ws := da.Wide(); ws.Rounds != 1 || ws.Probes == 0 || ws.Probes > confirmPings {
		t.Fatalf("easy side's wide stats %+v: want one round whose pings (only those confirming the hit) number 1..%d", ws, confirmPings)
	}
	// The session's packets cross both ways.
	for _, dir := range []struct {
		name     string
		from, to *testPort
	}{{"easy to hard", a, b}, {"hard to easy", b, a}} {
		got := make(chan []byte, 1)
		go func() {
			buf := make([]byte, 2048)
			dir.to.Conn.SetReadDeadline(time.Now().Add(3 * time.Second))
			n, _, err := dir.to.Conn.ReadFrom(buf)
			if err == nil {
				got <- buf[:n]
			}
		}()
		if _, err := dir.from.Conn.WriteTo([]byte(dir.name), session.Addr(id)); err != nil {
			t.Fatal(err)
		}
		select {
		case p := <-got:
			if string(p) != dir.name {
				t.Fatalf("%s: got %q", dir.name, p)
			}
		case <-time.After(4 * time.Second):
			t.Fatalf("%s: a session packet did not cross the direct path", dir.name)
		}
	}
}
