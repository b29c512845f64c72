// Copyright 2026 The nlvpn authors.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
//     http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

package tcp

import (
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// rateTestPath drives a rateState as a path of a fixed rate and RTT would:
// every tick ACKs the packets the path delivered in it, some of them lost
// (SACKed around, recovered one RTT later).
type rateTestPath struct {
	s   *sender
	cc  *rateState
	now tcpip.MonotonicTime
	una seqnum.Value
	mss int
}

func newRateTestPath() *rateTestPath {
	const mss = 1000
	ep := &Endpoint{}
	ep.scoreboard = NewSACKScoreboard(mss, 0)
	s := &sender{ep: ep}
	s.MaxPayloadSize = mss
	s.SndCwnd = InitialCwnd
	s.Ssthresh = InitialSsthresh
	p := &rateTestPath{s: s, cc: newRateCC(s), mss: mss}
	p.cc.OnAck(unknownRTT, p.now)
	return p
}

// run delivers at most rate bytes/s for d, in 100 µs ticks, limited by
// the window (one window per rtt); every lossEvery-th packet is lost and
// shows as a SACK hole until it is resent an rtt later. It returns the
// bytes delivered.
func (p *rateTestPath) run(rate float64, rtt time.Duration, lossEvery int, d time.Duration) uint64 {
	const tick = 100 * time.Microsecond
	var total uint64
	var n int
	hole := false
	var holeUntil tcpip.MonotonicTime
	var sackEnd seqnum.Value
	for t := time.Duration(0); t < d; t += tick {
		p.now = p.now.Add(tick)
		perTick := rate * tick.Seconds()
		byWindow := float64(p.s.SndCwnd*p.mss) * tick.Seconds() / rtt.Seconds()
		pkts := int(min(perTick, byWindow) / float64(p.mss))
		if pkts == 0 {
			pkts = 1
		}
		for i := 0; i < pkts; i++ {
			n++
			if hole {
				// Data past the hole is SACKed.
				start := p.una
				if p.s.ep.scoreboard.Sacked() > 0 {
					start = sackEnd
				} else {
					start = p.una.Add(seqnum.Size(p.mss))
				}
				sackEnd = start.Add(seqnum.Size(p.mss))
				p.s.ep.scoreboard.Insert(header.SACKBlock{Start: p.una.Add(seqnum.Size(p.mss)), End: sackEnd})
			} else if lossEvery > 0 && n%lossEvery == 0 {
				hole = true
				holeUntil = p.now.Add(rtt)
				p.s.HandleLossDetectedForTest()
				continue
			} else {
				p.una = p.una.Add(seqnum.Size(p.mss))
			}
			total += uint64(p.mss)
		}
		if hole && p.now.Sub(holeUntil) >= 0 {
			// The retransmission arrived: the cumulative ACK covers the
			// hole and everything SACKed past it.
			hole = false
			if p.s.ep.scoreboard.Sacked() > 0 {
				p.una = sackEnd
			} else {
				p.una = p.una.Add(seqnum.Size(p.mss))
			}
			p.s.ep.scoreboard.Delete(p.una)
			total += uint64(p.mss)
		}
		p.s.SndUna = p.una
		p.cc.OnAck(rtt, p.now)
	}
	return total
}

// HandleLossDetectedForTest does what the sender does at a loss: the
// congestion control's reaction, then recovery's window of Ssthresh+3.
func (s *sender) HandleLossDetectedForTest() {
	s.cc.HandleLossDetected()
	s.SndCwnd = s.Ssthresh + 3
}

// TestRateWindowFollowsThePath: on a path of 1 Gbit/s and 1 ms the window
// settles near two bandwidth-delay products, with or without 2 % random
// loss; loss alone does not shrink it, as it does reno's.
func TestRateWindowFollowsThePath(t *testing.T) {
	const (
		rate = 125e6 // bytes/s: 1 Gbit/s
		rtt  = time.Millisecond
	)
	bdp := int(rate * rtt.Seconds() / 1000) // packets
	for _, loss := range []int{0, 50} {
		p := newRateTestPath()
		p.s.cc = p.cc
		p.run(rate, rtt, loss, 2*time.Second)
		if !p.cc.filled {
			t.Errorf("loss 1/%d: still in startup after 2 s", loss)
		}
		if got := p.s.SndCwnd; got < 3*bdp/2 || got > 4*bdp {
			t.Errorf("loss 1/%d: window %d packets, want about 2 BDP (BDP %d)", loss, got, bdp)
		}
		if got := p.cc.maxRate(); got < rate*0.8 || got > rate*1.5 {
			t.Errorf("loss 1/%d: measured rate %.0f B/s, the path's is %.0f", loss, got, float64(rate))
		}
		t.Logf("loss 1/%d: window %d packets (BDP %d), rate %.0f, min RTT %v", loss, p.s.SndCwnd, bdp, p.cc.maxRate(), p.cc.minRTT)
	}
}

// TestRateTimeoutRestarts: after a retransmission timeout the window is one
// packet, through more timeouts and ACKs that acknowledge nothing new; once
// the retransmission is acknowledged the window is what it was before the
// first timeout (the path delivers as the model says), not slow start's.
func TestRateTimeoutRestarts(t *testing.T) {
	p := newRateTestPath()
	p.s.cc = p.cc
	p.run(125e6, time.Millisecond, 0, time.Second)
	before := p.s.SndCwnd
	p.cc.HandleRTOExpired()
	p.cc.HandleRTOExpired() // backed off: nothing came back
	if p.s.SndCwnd != 1 {
		t.Fatalf("window %d after a timeout, want 1", p.s.SndCwnd)
	}
	p.now = p.now.Add(time.Millisecond)
	p.cc.OnAck(time.Millisecond, p.now) // a duplicate ACK
	if p.s.SndCwnd != 1 {
		t.Fatalf("window %d after an ACK of nothing new, want still 1", p.s.SndCwnd)
	}
	p.una = p.una.Add(seqnum.Size(p.mss))
	p.s.SndUna = p.una
	p.now = p.now.Add(time.Millisecond)
	p.cc.OnAck(time.Millisecond, p.now)
	if got := p.s.SndCwnd; got < before*9/10 || got > before+1 {
		t.Errorf("window %d once the retransmission is acknowledged, want %d as before the timeout", got, before)
	}
	// The next timeout saves the window anew.
	p.run(125e6, time.Millisecond, 0, 50*time.Millisecond)
	p.cc.HandleRTOExpired()
	if p.cc.priorCwnd < before*9/10 {
		t.Errorf("a later timeout saved a window of %d, want about %d", p.cc.priorCwnd, before)
	}
}

// TestRateSlowerPathShrinksWindow: when the path's rate falls (congestion
// elsewhere), the window follows it down within the samples it keeps.
func TestRateSlowerPathShrinksWindow(t *testing.T) {
	p := newRateTestPath()
	p.s.cc = p.cc
	p.run(125e6, time.Millisecond, 0, time.Second)
	fast := p.s.SndCwnd
	p.run(125e6/4, time.Millisecond, 0, time.Second)
	if got := p.s.SndCwnd; got > fast/2 {
		t.Errorf("window %d after the rate fell to a quarter, was %d", got, fast)
	}
}

// TestRateACKBurstAllowanceIsOneBDP: ACKs held back and then released in
// a burst (here 20 ms of data acknowledged within 0.5 ms on a 1 ms path,
// as a receiver or tunnel that works in batches does) add at most one
// more BDP at the measured rate to the window, so that flows sharing a
// receiver do not hold more in flight than the queues in front of it.
func TestRateACKBurstAllowanceIsOneBDP(t *testing.T) {
	const (
		rate  = 125e6 // bytes/s: 1 Gbit/s
		rtt   = time.Millisecond
		held  = 20 * time.Millisecond
		burst = 500 * time.Microsecond
	)
	p := newRateTestPath()
	p.s.cc = p.cc
	p.run(rate, rtt, 0, time.Second)
	ack := func(after time.Duration, bytes int) {
		p.now = p.now.Add(after)
		p.una = p.una.Add(seqnum.Size(bytes))
		p.s.SndUna = p.una
		p.cc.OnAck(rtt, p.now)
	}
	// One packet a minimum RTT later closes the rate sample under way, so
	// that the burst falls within the next one.
	ack(rtt, p.mss)
	const acks = 50
	for range acks {
		ack(burst/acks, int(rate*held.Seconds())/acks)
	}
	bdp := p.cc.maxRate() * p.cc.minRTT.Seconds() // bytes, at the measured rate
	if got := p.cc.maxExtra(); float64(got) > bdp {
		t.Errorf("ACK-aggregation allowance %d bytes after the burst, want at most one BDP at the measured rate (%.0f)", got, bdp)
	}
	if got, most := p.s.SndCwnd, int(3*bdp)/p.mss+1; got > most {
		t.Errorf("window %d packets after the burst, want at most %d (3 BDP at the measured rate)", got, most)
	}
	t.Logf("window %d packets, allowance %d bytes, BDP %.0f bytes at the measured rate %.0f B/s", p.s.SndCwnd, p.cc.maxExtra(), bdp, p.cc.maxRate())
}
