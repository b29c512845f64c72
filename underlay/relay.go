package underlay

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// The relay carries a session's frames to the gateway's port as plain UDP
// datagrams from the node's port, where the gateway forwards them to the
// other end by session ID; nothing is wrapped again. Whether such frames
// pass both ways is checked (wire.FrameRelayCheck) when the gateway
// connection comes up and then now and then; until they are known to pass,
// or when they stop passing, frames ride in DATAGRAMs of the gateway
// connection instead (slower: encrypted once more, and under that
// connection's congestion control).
const (
	relayCheckEvery   = time.Second      // while not confirmed
	relayRecheckEvery = 5 * time.Second  // once confirmed
	relayCheckLapse   = 12 * time.Second // no answer for this long: back to DATAGRAMs
	// relayPromptLapse: a check sent at once because a session is about
	// to start (CheckRelaySoon) that gets no answer for this long turns
	// the UDP frames off. A peer session's handshake gives up after 10 s
	// without a packet, before relayCheckLapse would notice frames that
	// stopped passing after the last answered check.
	relayPromptLapse = 2 * time.Second
)

type relayState struct {
	gw      atomic.Pointer[netip.AddrPort] // the gateway's address, or nil
	udpOK   atomic.Bool                    // relay frames pass as UDP
	answer  atomic.Int64                   // unix nanoseconds of the last answered check
	kickCh  chan struct{}                  // check now (a new gateway connection)
	soon    atomic.Bool                    // CheckRelaySoon: send a check now even if one went recently
	prompt  int64                          // unix nanoseconds of the unanswered prompt check, or 0; checkRelay's
	mu      sync.Mutex
	pending [4]uint64 // nonces of the checks in flight
	next    int
	// in and out count relay frames received and sent (both carriers):
	// frames going out with none coming back is how a node notices that
	// its gateway is gone (relayQuiet).
	in, out atomic.Uint64
}

// relayQuiet watches the relay's counters once a tick: a gateway that relays
// nothing back while the node sends for quietTicks ticks may be dead
// (or the peer quiet: the check tells them apart).
type relayQuiet struct {
	lastIn, lastOut uint64
	sending         int // ticks with frames out since a frame came in
}

const quietTicks = 2

// tick reports whether the relay has been quiet long enough to check.
func (q *relayQuiet) tick(in, out uint64) bool {
	switch {
	case in != q.lastIn:
		q.sending = 0
	case out != q.lastOut:
		q.sending++
	}
	q.lastIn, q.lastOut = in, out
	if q.sending >= quietTicks {
		q.sending = 0
		return true
	}
	return false
}

// gateway is the address relay frames go to and come from.
func (r *relayState) gateway() netip.AddrPort {
	if p := r.gw.Load(); p != nil {
		return *p
	}
	return netip.AddrPort{}
}

// nonce makes a check's nonce and remembers it.
func (r *relayState) nonce() uint64 {
	var b [8]byte
	rand.Read(b[:])
	n := binary.BigEndian.Uint64(b[:]) | 1 // never 0: a frame for session 0 is malformed
	r.mu.Lock()
	r.pending[r.next] = n
	r.next = (r.next + 1) % len(r.pending)
	r.mu.Unlock()
	return n
}

// answered takes the gateway's echo of a check.
func (r *relayState) answered(n uint64) {
	r.mu.Lock()
	ok := false
	for i, p := range r.pending {
		if p == n && n != 0 {
			r.pending[i], ok = 0, true
		}
	}
	r.mu.Unlock()
	if ok {
		r.answer.Store(time.Now().UnixNano())
		r.udpOK.Store(true)
	}
}

func (r *relayState) kick() {
	select {
	case r.kickCh <- struct{}{}:
	default:
	}
}

// checkRelay keeps relayState current until ctx ends: it follows the
// gateway connection's address and checks that frames pass.
func (u *Underlay) checkRelay(ctx context.Context) {
	r := &u.relay
	t := time.NewTicker(relayCheckEvery)
	defer t.Stop()
	var lastSent time.Time
	var q relayQuiet
	for {
		gw := u.gwAddr()
		if cur := r.gateway(); gw != cur {
			// A new gateway connection (or none): what passed to the old
			// address says nothing about the new one.
			if gw.IsValid() {
				r.gw.Store(&gw)
			} else {
				r.gw.Store(nil)
			}
			if r.udpOK.Swap(false) {
				u.log.Info("relay frames go in the gateway connection until the new address is checked", "gateway", gw)
			}
			lastSent = time.Time{}
		}
		now := time.Now()
		if ok := r.udpOK.Load(); ok && now.Sub(time.Unix(0, r.answer.Load())) > relayCheckLapse {
			r.udpOK.Store(false)
			u.log.Warn("relay frames stopped passing as UDP; carrying them in the gateway connection", "gateway", gw)
		}
		if r.prompt != 0 {
			switch {
			case r.answer.Load() >= r.prompt || !r.udpOK.Load():
				r.prompt = 0
			case now.Sub(time.Unix(0, r.prompt)) > relayPromptLapse:
				r.prompt = 0
				r.udpOK.Store(false)
				u.log.Warn("relay frames stopped passing as UDP (a prompt check went unanswered); carrying them in the gateway connection", "gateway", gw)
			}
		}
		every := relayCheckEvery
		if r.udpOK.Load() {
			every = relayRecheckEvery
		}
		soon := r.soon.Swap(false) && r.udpOK.Load()
		if soon && r.prompt == 0 {
			r.prompt = now.UnixNano()
		}
		if gw.IsValid() && (soon || now.Sub(lastSent) >= every) {
			hdr := wire.FrameHeader(wire.FrameRelayCheck, r.nonce())
			var token []byte
			if w := u.Ctrl.Welcome(); w != nil {
				token = w.RelayToken
			}
			u.sendRaw(hdr[:], token, gw, false)
			lastSent = now
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if q.tick(r.in.Load(), r.out.Load()) {
				u.Ctrl.Suspect()
			}
		case <-r.kickCh:
			// Give the new connection's address a moment to be known.
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// CheckRelaySoon checks at once that relay frames still pass as UDP, and
// carries them in the gateway connection if that check is not answered
// within relayPromptLapse: called when a session is about to start its
// handshake on the relay, which must not wait out relayCheckLapse on a
// way that stopped passing (its frames dropped by a firewall that lets
// the gateway connection through).
func (u *Underlay) CheckRelaySoon() {
	u.relay.soon.Store(true)
	u.relay.kick()
}

// relayPath is the session.Path through the gateway.
type relayPath struct{ u *Underlay }

var errQueueFull = errors.New("frame queue full")

// Send implements session.Path.
func (p relayPath) Send(id uint64, pkt []byte) error {
	u := p.u
	u.relay.out.Add(1)
	if u.relay.udpOK.Load() {
		if gw := u.relay.gateway(); gw.IsValid() {
			hdr := wire.FrameHeader(wire.FrameRelay, id)
			return u.sendRaw(hdr[:], pkt, gw, true)
		}
	}
	return u.Ctrl.SendRelayDatagram(id, pkt)
}

// RelayOverUDP reports whether relay frames go as UDP datagrams (true) or
// in the gateway connection.
func (u *Underlay) RelayOverUDP() bool { return u.relay.udpOK.Load() }
