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
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// sackCursor answers the scoreboard's questions (IsSACKED, IsRangeLost) for
// ranges asked in ascending order, as SetPipe and RACK's detectLoss walk the
// write list. It copies the scoreboard's blocks once per walk and then moves
// forward through them, where a tree search per range costs O(log n) each
// time and the walk asks once per SMSS of everything in flight.
type sackCursor struct {
	// blocks are the scoreboard's SACKed ranges, ascending, disjoint and
	// not adjacent (Insert merges touching ranges).
	blocks []header.SACKBlock
	// lost[j] is IsRangeLost's verdict for a range whose SACKed ranges
	// above it are blocks[j:]; len(lost) == len(blocks)+1. Only SetPipe
	// needs it (judgeLoss); RACK's walk asks IsSACKED alone.
	lost []bool
	// next is the first block that starts after the last position seeked.
	next int
}

// reset loads sb's blocks, reusing the cursor's storage.
func (c *sackCursor) reset(sb *SACKScoreboard) {
	c.blocks = c.blocks[:0]
	c.next = 0
	if !sb.Empty() {
		sb.ranges.Ascend(c.add)
	}
}

// judgeLoss fills lost from the blocks reset loaded; sb is the scoreboard
// they came from.
func (c *sackCursor) judgeLoss(sb *SACKScoreboard) {
	c.lost = c.lost[:0]
	threshold := seqnum.Size((nDupAckThreshold - 1) * sb.smss)
	for j := range len(c.blocks) + 1 {
		// As IsRangeLost: count the blocks above the range in ascending
		// order until nDupAckThreshold of them or enough bytes are seen.
		lost := false
		var bytes seqnum.Size
		for k := j; k < len(c.blocks); k++ {
			bytes += c.blocks[k].Start.Size(c.blocks[k].End)
			if k-j+1 >= nDupAckThreshold || bytes >= threshold {
				lost = true
				break
			}
		}
		c.lost = append(c.lost, lost)
	}
}

func (c *sackCursor) add(b header.SACKBlock) bool {
	c.blocks = append(c.blocks, b)
	return true
}

// seek moves to seq, which must not be below the last position seeked.
func (c *sackCursor) seek(seq seqnum.Value) {
	for c.next < len(c.blocks) && c.blocks[c.next].Start.LessThanEq(seq) {
		c.next++
	}
}

// covering returns the block that holds the last position seeked.
func (c *sackCursor) covering(seq seqnum.Value) (header.SACKBlock, bool) {
	if c.next == 0 {
		return header.SACKBlock{}, false
	}
	b := c.blocks[c.next-1]
	return b, seq.LessThan(b.End)
}

// isSACKED is SACKScoreboard.IsSACKED for r, r.Start not below the last
// position seeked.
func (c *sackCursor) isSACKED(r header.SACKBlock) bool {
	c.seek(r.Start)
	if c.next == 0 {
		return false
	}
	return c.blocks[c.next-1].Contains(r)
}

// SetPipe implements the SetPipe() function described in RFC6675. Netstack
// maintains the congestion window in number of packets and not bytes, so
// SetPipe() here measures number of outstanding packets rather than actual
// outstanding bytes in the network.
//
// It counts, as the RFC's octet walk does, each SMSS-sized piece of the
// segments in flight that is not SACKed: one if it is not lost, and one more
// if it was sent before HighRxt. Pieces between two SACK block edges share
// their verdicts, so each run of them is counted at once.
//
// +checklocks:s.ep.mu
func (s *sender) SetPipe() {
	// If SACK isn't permitted or it is permitted but recovery is not active
	// then ignore pipe calculations.
	if !s.ep.SACKPermitted || !s.FastRecovery.Active {
		return
	}
	c := &s.sackCursor
	c.reset(s.ep.scoreboard)
	c.judgeLoss(s.ep.scoreboard)
	pipe := 0
	smss := seqnum.Size(s.ep.scoreboard.SMSS())
	for s1 := s.writeList.Front(); s1 != nil && s.isAssignedSequenceNumber(s1); s1 = s1.Next() {
		size := seqnum.Size(s1.payloadSize())
		if size == 0 || !s1.sequenceNumber.LessThan(s.SndNxt) {
			break
		}
		// (b) If S1 <= HighRxt, Pipe is incremented by 1 (per piece of
		// a segment that starts at or below HighRxt).
		rxt := 0
		if s1.sequenceNumber.LessThanEq(s.FastRecovery.HighRxt) {
			rxt = 1
		}
		pipe += c.segmentPipe(s1.sequenceNumber, size, smss, rxt)
	}
	s.Outstanding = pipe
}

// segmentPipe is SetPipe's count for one segment of size bytes from start,
// which must not be below the last position seeked. With GSO a segment can
// be much larger than SMSS, so it is counted in SMSS-sized pieces from its
// first byte; rxt is what each unSACKed piece adds for HighRxt.
func (c *sackCursor) segmentPipe(start seqnum.Value, size, smss seqnum.Size, rxt int) int {
	pipe := 0
	segEnd := start.Add(size)
	for p := start; p.LessThan(segEnd); {
		c.seek(p)
		if b, in := c.covering(p); in {
			// Pieces that end inside b are SACKed.
			if segEnd.LessThanEq(b.End) {
				break
			}
			p = p.Add(p.Size(b.End) / smss * smss)
			if p.LessThan(b.End) {
				// This piece runs past b: not SACKed; the blocks
				// above b decide whether it is lost.
				if !c.lost[c.next] {
					pipe++
				}
				pipe += rxt
				p = p.Add(smss)
			}
			continue
		}
		// p is in a hole: every piece starting before the next block is
		// unSACKed and has the same blocks above it.
		limit := segEnd
		if c.next < len(c.blocks) && c.blocks[c.next].Start.LessThan(limit) {
			limit = c.blocks[c.next].Start
		}
		n := (p.Size(limit) + smss - 1) / smss
		if !c.lost[c.next] {
			pipe += int(n)
		}
		pipe += int(n) * rxt
		p = p.Add(n * smss)
	}
	return pipe
}
