package relay

import (
	"net/netip"
	"testing"

	"github.com/nlvpn/nlvpn/wire"
)

// slowUDP is a gateway write queue that holds cap datagrams and that the
// test drains, a few per tick, as a slow uplink would.
type slowUDP struct {
	q   [][]byte
	cap int
}

func (u *slowUDP) Write(_ netip.AddrPort, b []byte) bool {
	if len(u.q) >= u.cap {
		return false
	}
	u.q = append(u.q, append([]byte(nil), b...))
	return true
}
func (u *slowUDP) WriteWait(to netip.AddrPort, b []byte) bool { return u.Write(to, b) }
func (u *slowUDP) Queued() int                                { return len(u.q) }
func (u *slowUDP) Cap() int                                   { return u.cap }

// fairCase is one mix of senders toward one agent whose queue takes perTick
// frames per tick: rates[i] frames per tick from client i, each on its own
// route, spread evenly over the tick.
type fairCase struct {
	name    string
	rates   []int
	perTick int
	// checks on the outcome: frames delivered and offered per client.
	check func(t *testing.T, delivered, offered []int, st Stats)
}

// runFair relays ticks ticks of c's traffic over one carrier (UDP through
// a slow write queue, or DATAGRAMs through the agent's queue) and returns
// the frames delivered and offered per client.
func runFair(t *testing.T, c fairCase, udp bool, ticks int) (delivered, offered []int, st Stats) {
	h := quietHub()
	var w *slowUDP
	if udp {
		w = &slowUDP{cap: 2048}
		h.SetUDP(w)
	}
	agentAddr := netip.MustParseAddrPort("198.18.1.1:4000")
	hold := &blockingConn{release: make(chan struct{}), entered: make(chan struct{})}
	agent := h.NewPeer("agent", agentAddr, noToken, hold)
	defer func() { close(hold.release); agent.Close() }()
	if udp {
		check := wire.FrameHeader(wire.FrameRelayCheck, 1)
		h.HandleUDP(agentAddr, append(check[:], noToken[:]...)) // frames to the agent go as UDP
		if len(w.q) != 1 {
			t.Fatal("relay check not answered")
		}
		w.q = w.q[:0]
	}
	clients := make([]*Peer, len(c.rates))
	addrs := make([]netip.AddrPort, len(c.rates))
	frames := make([][]byte, len(c.rates))
	for i := range c.rates {
		addrs[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 2, byte(i + 1)}), 5000)
		clients[i] = h.NewPeer("client", addrs[i], noToken, discard{})
		defer clients[i].Close()
		if err := h.Bind(uint64(i+1), clients[i], agent); err != nil {
			t.Fatal(err)
		}
		frames[i] = Frame(uint64(i+1), make([]byte, 1200))
	}
	delivered, offered = make([]int, len(c.rates)), make([]int, len(c.rates))
	count := func(b []byte) {
		if _, id, _, err := wire.ParseFrame(b); err == nil && id >= 1 && int(id) <= len(delivered) {
			delivered[id-1]++
		}
	}
	top := 0
	for _, r := range c.rates {
		top = max(top, r)
	}
	for range ticks {
		for round := range top {
			for i, r := range c.rates {
				// Client i sends r frames in top rounds, evenly.
				if round*r/top == (round+1)*r/top {
					continue
				}
				offered[i]++
				if udp {
					h.HandleUDP(addrs[i], frames[i])
				} else {
					h.Forward(clients[i], append([]byte(nil), frames[i]...))
				}
			}
		}
		for range c.perTick {
			if udp {
				if len(w.q) == 0 {
					break
				}
				count(w.q[0])
				w.q = w.q[1:]
				continue
			}
			select {
			case b := <-agent.out:
				count(b)
			default:
			}
		}
	}
	// What is still queued goes out too.
	for udp && len(w.q) > 0 {
		count(w.q[0])
		w.q = w.q[1:]
	}
	for !udp && len(agent.out) > 0 {
		count(<-agent.out)
	}
	return delivered, offered, h.Stats()
}

// TestFairDrop: with the agent's queue congested by one client, another
// client at a modest rate still gets its frames through, and the
// flooder's excess is dropped as unfair; a lone client at full blast and
// traffic below the capacity lose nothing to the rule.
func TestFairDrop(t *testing.T) {
	const ticks = 400
	const perTick = 10
	honestGets := func(i int, min float64) func(*testing.T, []int, []int, Stats) {
		return func(t *testing.T, d, o []int, st Stats) {
			if got := float64(d[i]) / float64(o[i]); got < min {
				t.Errorf("honest client %d got %.0f%% of its frames through (%d of %d), want ≥ %.0f%%", i, 100*got, d[i], o[i], 100*min)
			}
			if st.DropUnfair == 0 {
				t.Error("no frame dropped as unfair")
			}
			total := 0
			for _, n := range d {
				total += n
			}
			// The rule must not leave the agent's link idle: the flooder
			// takes what the others leave.
			if total < ticks*perTick {
				t.Errorf("%d frames delivered in all, want ≥ the %d the link takes", total, ticks*perTick)
			}
		}
	}
	noUnfair := func(all bool) func(*testing.T, []int, []int, Stats) {
		return func(t *testing.T, d, o []int, st Stats) {
			if st.DropUnfair != 0 {
				t.Errorf("%d frames dropped as unfair, want 0 (delivered %v of %v)", st.DropUnfair, d, o)
			}
			if all && st.DropQueueFull != 0 {
				t.Errorf("%d frames dropped at a full queue, want 0", st.DropQueueFull)
			}
		}
	}
	cases := []fairCase{
		// One client at 10× its share (5 frames a tick) and one at 2.
		{name: "flooder and honest", rates: []int{50, 2}, perTick: perTick, check: honestGets(1, 0.8)},
		{name: "honest and flooder", rates: []int{2, 50}, perTick: perTick, check: honestGets(0, 0.8)},
		// Two flooders; the honest one still gets through.
		{name: "two flooders and honest", rates: []int{40, 40, 2}, perTick: perTick, check: honestGets(2, 0.8)},
		// One client at full blast; a second route to the agent is
		// idle: it has no share to protect.
		{name: "one at full blast", rates: []int{50, 0}, perTick: perTick, check: noUnfair(false)},
		// Below the link's rate: the queue never fills.
		{name: "no congestion", rates: []int{6, 3}, perTick: perTick, check: noUnfair(true)},
	}
	for _, carrier := range []string{"datagram", "udp"} {
		for _, c := range cases {
			t.Run(carrier+"/"+c.name, func(t *testing.T) {
				d, o, st := runFair(t, c, carrier == "udp", ticks)
				t.Logf("delivered %v of %v; drop_unfair %d, drop_queue_full %d", d, o, st.DropUnfair, st.DropQueueFull)
				c.check(t, d, o, st)
			})
		}
	}
}

// TestFairWindows: a share counts the bytes a sender had admitted in this
// window and the last one, against all the queue admitted in them and the
// senders seen; a lone sender is always within it.
func TestFairWindows(t *testing.T) {
	const K = 1 << 10
	var l, other fairLink
	var a, b fairSender
	steps := []struct {
		name      string
		l         *fairLink
		s         *fairSender
		congested bool
		bytes     int // added if allowed
		want      bool
	}{
		{"a alone", &l, &a, true, 600 * K, true},
		{"b joins", &l, &b, false, 100 * K, true},
		// a: 600 of 700 KiB, share 5/4 × 350.
		{"a above its share", &l, &a, true, 0, false},
		{"b within its share", &l, &b, true, 0, true},
		{"not congested", &l, &a, false, 400 * K, true}, // 1100 KiB: window 1
		// Window 1: a's 1000 KiB of window 0 still count.
		{"a's last window counts", &l, &a, true, 0, false},
		{"b still within", &l, &b, true, 0, true},
		// On another queue a starts over, alone.
		{"other queue", &other, &a, true, 0, true},
	}
	for _, st := range steps {
		if got := st.l.allow(st.s, st.congested); got != st.want {
			t.Fatalf("%s: allowed %v, want %v", st.name, got, st.want)
		}
		if st.want && st.bytes > 0 {
			st.l.add(st.s, st.bytes)
		}
	}
	if w, act, pact := l.win.Load(), l.act.Load(), l.pact.Load(); w != 1 || act != 2 || pact != 2 {
		t.Errorf("window %d, senders %d and %d before; want 1, 2, 2", w, act, pact)
	}
}
