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

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// TestWalkSACKMarksEveryBlock: an ACK that carries several SACK blocks
// marks the segments of each, and RACK learns the send time of the most
// recently sent one among them, here a resend delivered into a hole below
// the highest block. With the blocks walked from the highest down, the one
// pass up the write list stopped after the highest block: the resend went
// unmarked, SackedOut missed it, and RACK kept the older time.
func TestWalkSACKMarksEveryBlock(t *testing.T) {
	const mss = 1000
	ep := &Endpoint{}
	ep.scoreboard = NewSACKScoreboard(mss, 0)
	s := &sender{ep: ep, writeList: protectedWriteList{set: make(map[*segment]struct{})}}
	s.MaxPayloadSize = mss
	s.rc.init(s, 0)

	var t0 tcpip.MonotonicTime
	var segs []*segment
	for i := 0; i < 6; i++ {
		seg := newSegment()
		seg.pkt = stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(make([]byte, mss))})
		seg.sequenceNumber = seqnum.Value(i * mss)
		seg.xmitCount = 1
		seg.xmitTime = t0.Add(time.Duration(i) * time.Millisecond)
		s.writeList.PushBack(seg)
		segs = append(segs, seg)
	}
	defer func() {
		for _, seg := range segs {
			seg.DecRef()
		}
	}()
	// Segment 1 was lost and sent again, after all the others.
	resent := t0.Add(10 * time.Millisecond)
	segs[1].xmitCount = 2
	segs[1].xmitTime = resent

	ack := newSegment()
	ack.pkt = stack.NewPacketBuffer(stack.PacketBufferOptions{})
	defer ack.DecRef()
	ack.ackNumber = 0
	ack.rcvdTime = t0.Add(12 * time.Millisecond)
	// The receiver lists the block it just filled first (RFC 2018).
	ack.parsedOptions.SACKBlocks = []header.SACKBlock{
		{Start: 1 * mss, End: 2 * mss},
		{Start: 4 * mss, End: 5 * mss},
	}
	if dsack := s.walkSACK(ack); dsack {
		t.Fatal("walkSACK reported a DSACK for two disjoint blocks above the ACK")
	}

	for i, seg := range segs {
		want := i == 1 || i == 4
		if seg.acked != want {
			t.Errorf("segment %d [%d, %d): acked = %v, want %v", i, i*mss, (i+1)*mss, seg.acked, want)
		}
	}
	if s.rc.XmitTime != resent {
		t.Errorf("RACK's most recent delivered send time = %v, want the resend's %v", s.rc.XmitTime.Sub(t0), resent.Sub(t0))
	}
	if s.SackedOut != 2 {
		t.Errorf("SackedOut = %d, want 2", s.SackedOut)
	}
}
