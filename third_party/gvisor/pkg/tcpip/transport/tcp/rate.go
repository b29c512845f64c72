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
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

const (
	// rateSamples is how many delivery-rate samples (and ACK-aggregation
	// maxima) the windowed maxima keep; a sample spans at least one minimum
	// RTT and rateMinSample.
	rateSamples = 10

	// rateMinSample is the shortest span of a delivery-rate sample. Below a
	// millisecond a sample holds a handful of ACKs and is mostly noise.
	rateMinSample = time.Millisecond

	// rateMinRTTWindow is how long a minimum RTT stays valid without being
	// seen again, so that a move to a longer path is noticed.
	rateMinRTTWindow = 10 * time.Second

	// rateCwndGain is the window, in bandwidth-delay products, that the
	// sender keeps in flight: one BDP on the path and one to cover ACKs
	// that come late or in bursts.
	rateCwndGain = 2

	// rateFullGrowth and rateFullRounds decide when startup is over: the
	// measured rate grew by less than a quarter in that many samples.
	rateFullGrowth = 1.25
	rateFullRounds = 3

	// rateMaxExtra caps the ACK-aggregation allowance at this much time of
	// data at the measured rate; so does the minimum RTT (see OnAck).
	rateMaxExtra = 100 * time.Millisecond

	// rateMinCwnd is the smallest window, in packets.
	rateMinCwnd = 4
)

// rateState is a congestion control that sizes the window from what the
// path delivers (the largest delivery rate of the last samples times the
// minimum RTT, the model of BBR) instead of halving it at every loss, so
// that a path with random, non-congestive loss is not run at a fraction of
// its rate. The window is bounded by twice the bandwidth-delay product plus
// the measured ACK aggregation (at most one more BDP), so a standing queue
// it builds stays within one or two BDP. gVisor has no pacing, so unlike
// BBR this only shapes the window; startup grows it as slow start does
// until the rate stops growing.
//
// It needs every ACK, in recovery too (ackObserver), because a path with
// random loss is in recovery most of the time, where Update is not called.
type rateState struct {
	s *sender

	// delivered is the number of bytes the peer has acknowledged, by
	// cumulative ACK or SACK, since the connection started.
	delivered  uint64
	lastUna    seqnum.Value
	lastSacked seqnum.Size
	started    bool

	// The current delivery-rate sample.
	sampleStart     tcpip.MonotonicTime
	sampleDelivered uint64

	// rates (bytes per second) and extra (bytes) of the last samples; next
	// is the slot the current sample fills.
	rates [rateSamples]float64
	extra [rateSamples]uint64
	next  int

	minRTT      time.Duration
	minRTTStamp tcpip.MonotonicTime

	// Startup: filled is set once the rate stopped growing.
	filled     bool
	fullRate   float64
	fullRounds int

	// The ACK-aggregation epoch: ACKs that deliver more than the measured
	// rate explains since aggStart are an allowance the window must hold.
	aggStart     tcpip.MonotonicTime
	aggDelivered uint64

	// pending is delivered bytes not yet counted as whole packets of growth.
	pending uint64

	// priorCwnd is the window when a retransmission timeout came (the
	// first of a run), to restore once the cumulative ACK passes rtoUna,
	// where the timeout resent from; 0: no timeout pending.
	priorCwnd int
	rtoUna    seqnum.Value
}

func newRateCC(s *sender) *rateState {
	return &rateState{s: s}
}

// maxRate is the largest delivery rate of the kept samples, in bytes/s.
func (r *rateState) maxRate() float64 {
	m := 0.0
	for _, v := range r.rates {
		m = max(m, v)
	}
	return m
}

func (r *rateState) maxExtra() uint64 {
	var m uint64
	for _, v := range r.extra {
		m = max(m, v)
	}
	return m
}

// targetCwnd is the window the model asks for, in packets, or 0 before it
// has a rate and an RTT.
//
// +checklocks:r.s.ep.mu
func (r *rateState) targetCwnd(rate float64) int {
	if rate == 0 || r.minRTT <= 0 || r.s.MaxPayloadSize <= 0 {
		return 0
	}
	bdp := rate * r.minRTT.Seconds()
	bytes := rateCwndGain*bdp + float64(r.maxExtra())
	return max(rateMinCwnd, int(bytes/float64(r.s.MaxPayloadSize)))
}

// capToModel bounds a window of cwnd packets by the model's once startup
// is over.
//
// +checklocks:r.s.ep.mu
func (r *rateState) capToModel(cwnd int, rate float64) int {
	if target := r.targetCwnd(rate); r.filled && target > 0 {
		return min(cwnd, target)
	}
	return cwnd
}

// OnAck implements ackObserver.OnAck.
//
// +checklocks:r.s.ep.mu
func (r *rateState) OnAck(rtt time.Duration, now tcpip.MonotonicTime) {
	s := r.s
	if rtt > 0 && (r.minRTT == 0 || rtt <= r.minRTT || now.Sub(r.minRTTStamp) > rateMinRTTWindow) {
		r.minRTT = rtt
		r.minRTTStamp = now
	}

	// Bytes newly delivered: the cumulative ACK's advance plus the change
	// in SACKed bytes (data SACKed earlier and now cumulatively acked
	// counts once). A scoreboard reset after a timeout can make this
	// negative; that is no delivery.
	sacked := s.ep.scoreboard.Sacked()
	if !r.started {
		r.started = true
		r.lastUna = s.SndUna
		r.lastSacked = sacked
		r.sampleStart = now
		r.aggStart = now
		return
	}
	// The retransmission of a timeout was delivered: the path works, and
	// the model still holds what it delivers, so the window goes back to
	// what it was (as BBR restores its prior window after a loss episode)
	// instead of slow-starting from one packet. Under random loss a
	// timeout mostly means a lost retransmission with everything above it
	// SACKed, nothing new to send, and no later packet to show the loss;
	// slow start after it cost ~10 RTTs of a fraction of the rate.
	if r.priorCwnd > 0 && r.rtoUna.LessThan(s.SndUna) {
		s.SndCwnd = max(s.SndCwnd, r.capToModel(r.priorCwnd, r.maxRate()))
		s.Ssthresh = s.SndCwnd
		r.priorCwnd = 0
	}
	d := int64(r.lastUna.Size(s.SndUna)) + int64(sacked) - int64(r.lastSacked)
	r.lastUna = s.SndUna
	r.lastSacked = sacked
	if d <= 0 {
		return
	}
	r.delivered += uint64(d)

	// Close the current rate sample once it spans a minimum RTT.
	span := max(r.minRTT, rateMinSample)
	if el := now.Sub(r.sampleStart); el >= span {
		r.rates[r.next] = float64(r.delivered-r.sampleDelivered) / el.Seconds()
		r.next = (r.next + 1) % rateSamples
		r.rates[r.next] = 0
		r.extra[r.next] = 0
		r.sampleStart = now
		r.sampleDelivered = r.delivered
		if !r.filled {
			if m := r.maxRate(); m >= r.fullRate*rateFullGrowth {
				r.fullRate = m
				r.fullRounds = 0
			} else if r.fullRounds++; r.fullRounds >= rateFullRounds {
				r.filled = true
			}
		}
	}
	rate := r.maxRate()

	// ACK aggregation: what arrived beyond what the rate explains since
	// the epoch began; an epoch ends when the rate catches up. The
	// allowance is at most one minimum RTT of data, one more BDP: ACKs
	// that come in bursts also inflate the rate samples, and an allowance
	// of up to rateMaxExtra at that rate let a few flows through one
	// tunnel hold more in flight than the queues before their receiver,
	// which then dropped the excess.
	expected := uint64(rate * now.Sub(r.aggStart).Seconds())
	if got := r.delivered - r.aggDelivered; got <= expected {
		r.aggStart = now
		r.aggDelivered = r.delivered
	} else {
		extra := min(got-expected, uint64(rate*min(rateMaxExtra, r.minRTT).Seconds()))
		r.extra[r.next] = max(r.extra[r.next], extra)
	}

	// Grow by the packets delivered, as slow start does; once startup is
	// over, never beyond the model's window.
	r.pending += uint64(d)
	mss := uint64(max(1, s.MaxPayloadSize))
	grow := int(r.pending / mss)
	r.pending %= mss
	s.SndCwnd = max(r.capToModel(s.SndCwnd+grow, rate), rateMinCwnd)
	// gVisor's recovery sets the window from Ssthresh when it enters and
	// leaves; keeping them equal keeps the model's window through it.
	s.Ssthresh = s.SndCwnd
}

// Update implements congestionControl.Update. The window is sized in OnAck,
// which sees every ACK.
func (r *rateState) Update(int, time.Duration, tcpip.MonotonicTime) {}

// HandleLossDetected implements congestionControl.HandleLossDetected. A loss
// alone does not shrink the window: congestion shows as a lower delivery
// rate, and the window follows the rate.
//
// +checklocks:r.s.ep.mu
func (r *rateState) HandleLossDetected() {
	r.s.Ssthresh = r.s.SndCwnd
}

// HandleRTOExpired implements congestionControl.HandleRTOExpired. After a
// timeout the window is one packet, as RFC 5681 requires, until the
// retransmission is acknowledged; then OnAck restores the window of before
// the timeout (at most the model's). While no ACK comes, each timeout
// backs off as usual and the window stays at one packet.
//
// +checklocks:r.s.ep.mu
func (r *rateState) HandleRTOExpired() {
	if r.priorCwnd == 0 {
		r.priorCwnd = max(r.s.SndCwnd, rateMinCwnd)
	}
	r.rtoUna = r.s.SndUna
	r.s.Ssthresh = max(r.s.SndCwnd, rateMinCwnd)
	r.s.SndCwnd = 1
}

// PostRecovery implements congestionControl.PostRecovery.
func (r *rateState) PostRecovery() {}
