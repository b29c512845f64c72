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

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// TestSACKedFrom: how far the SACKed run from a byte reaches decides where a
// resend of a large segment starts; a wrong answer either resends what the
// receiver holds or skips what it lacks.
func TestSACKedFrom(t *testing.T) {
	const iss = seqnum.Value(0xffff_ff00) // the blocks wrap around 2^32
	sb := NewSACKScoreboard(1000, iss)
	for _, b := range []header.SACKBlock{
		{Start: iss.Add(1000), End: iss.Add(3000)},
		{Start: iss.Add(5000), End: iss.Add(6000)},
		{Start: iss.Add(6000), End: iss.Add(7000)}, // merges with the one before
	} {
		sb.Insert(b)
	}
	for _, tc := range []struct {
		off  seqnum.Size
		want seqnum.Size
	}{
		{0, 0},       // before every block
		{999, 0},     // the byte before a block
		{1000, 2000}, // a block's first byte: all of it
		{1500, 1500}, // inside a block: its rest
		{2999, 1},    // its last byte
		{3000, 0},    // just past it
		{4000, 0},    // in a hole
		{5000, 2000}, // merged blocks count as one run
		{6500, 500},
		{7000, 0}, // past every block
	} {
		if got := sb.SACKedFrom(iss.Add(tc.off)); got != tc.want {
			t.Errorf("SACKedFrom(iss+%d) = %d, want %d", tc.off, got, tc.want)
		}
	}
	if got := NewSACKScoreboard(1000, iss).SACKedFrom(iss); got != 0 {
		t.Errorf("empty scoreboard: SACKedFrom = %d, want 0", got)
	}
}
