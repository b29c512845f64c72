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
	"math/rand"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// treePipe is SetPipe's count for one segment as gVisor computed it before
// the cursor: a tree search per SMSS-sized piece.
func treePipe(sb *SACKScoreboard, start seqnum.Value, size, smss seqnum.Size, rxt int) int {
	pipe := 0
	end := start.Add(size)
	for p := start; p.LessThan(end); p = p.Add(smss) {
		r := header.SACKBlock{Start: p, End: p.Add(smss)}
		if end.LessThan(r.End) {
			r.End = end
		}
		if sb.IsSACKED(r) {
			continue
		}
		if !sb.IsRangeLost(r) {
			pipe++
		}
		pipe += rxt
	}
	return pipe
}

// TestSACKCursorMatchesScoreboard checks the cursor against the
// scoreboard's own searches on random flights: segments of 1 byte to 45
// SMSS (GSO), random SACK blocks, near and across the sequence space's wrap.
func TestSACKCursorMatchesScoreboard(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for trial := 0; trial < 3000; trial++ {
		smss := seqnum.Size(1 + rng.Intn(1460))
		if trial%3 == 0 {
			smss = 1448
		}
		iss := seqnum.Value(rng.Uint32())
		if trial%5 == 0 {
			iss = seqnum.Value(0xffffffff - uint32(rng.Intn(200000)))
		}
		type seg struct {
			start seqnum.Value
			size  seqnum.Size
			rxt   int
		}
		var segs []seg
		p := iss
		for n := 1 + rng.Intn(40); n > 0; n-- {
			size := seqnum.Size(1 + rng.Intn(int(smss)*45))
			if rng.Intn(3) == 0 {
				size = smss
			}
			segs = append(segs, seg{p, size, rng.Intn(2)})
			p = p.Add(size)
		}
		flight := iss.Size(p)
		sb := NewSACKScoreboard(uint16(smss), iss)
		for n := rng.Intn(12); n > 0; n-- {
			a := seqnum.Size(rng.Intn(int(flight)))
			// Block edges on segment or SMSS boundaries, as ACKs of
			// whole packets make them, and anywhere.
			if rng.Intn(2) == 0 {
				s := segs[rng.Intn(len(segs))]
				a = iss.Size(s.start)
			}
			l := seqnum.Size(1 + rng.Intn(int(smss)*8))
			if rng.Intn(2) == 0 {
				l = smss * seqnum.Size(1+rng.Intn(6))
			}
			b := min(a+l, flight)
			sb.Insert(header.SACKBlock{Start: iss.Add(a), End: iss.Add(b)})
		}

		var c sackCursor
		c.reset(sb)
		c.judgeLoss(sb)
		var d sackCursor
		d.reset(sb)
		got, want := 0, 0
		for _, s := range segs {
			got += c.segmentPipe(s.start, s.size, smss, s.rxt)
			want += treePipe(sb, s.start, s.size, smss, s.rxt)
			r := header.SACKBlock{Start: s.start, End: s.start.Add(s.size)}
			if g, w := d.isSACKED(r), sb.IsSACKED(r); g != w {
				t.Fatalf("trial %d: isSACKED(%v) = %v, scoreboard says %v; blocks %v", trial, r, g, w, sb)
			}
		}
		if got != want {
			t.Fatalf("trial %d (smss %d): pipe %d, tree search says %d; blocks %v, segments %v", trial, smss, got, want, sb, segs)
		}
	}
}

// TestSACKCursorReuse checks that a reset drops the last walk's blocks.
func TestSACKCursorReuse(t *testing.T) {
	sb := NewSACKScoreboard(100, 0)
	sb.Insert(header.SACKBlock{Start: 1000, End: 1100})
	var c sackCursor
	c.reset(sb)
	c.judgeLoss(sb)
	if !c.isSACKED(header.SACKBlock{Start: 1000, End: 1100}) {
		t.Fatal("a SACKed range is not seen as SACKed")
	}
	sb.Reset()
	c.reset(sb)
	c.judgeLoss(sb)
	if c.isSACKED(header.SACKBlock{Start: 1000, End: 1100}) {
		t.Fatal("a range is still SACKed after the scoreboard was reset")
	}
	if got := c.segmentPipe(0, 2000, 100, 0); got != 20 {
		t.Fatalf("pipe of 20 unSACKed pieces = %d", got)
	}
}

func BenchmarkSetPipeWalk(b *testing.B) {
	// A 4 MB flight of 64 KB GSO segments with a loss every 50 packets.
	const smss = 1448
	sb := NewSACKScoreboard(smss, 0)
	flight := seqnum.Size(4 << 20)
	for a := seqnum.Size(0); a+51*smss < flight; a += 50 * smss {
		sb.Insert(header.SACKBlock{Start: seqnum.Value(a + smss), End: seqnum.Value(a + 50*smss)})
	}
	b.Run("cursor", func(b *testing.B) {
		var c sackCursor
		b.ReportAllocs()
		for b.Loop() {
			c.reset(sb)
			c.judgeLoss(sb)
			for p := seqnum.Size(0); p < flight; p += 65000 {
				c.segmentPipe(seqnum.Value(p), min(65000, flight-p), smss, 0)
			}
		}
	})
	b.Run("tree", func(b *testing.B) {
		for b.Loop() {
			for p := seqnum.Size(0); p < flight; p += 65000 {
				treePipe(sb, seqnum.Value(p), min(65000, flight-p), smss, 0)
			}
		}
	})
}
