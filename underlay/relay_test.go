package underlay

import "testing"

// The relay is suspected (the gateway may be gone) only after frames went
// out for quietTicks ticks with none coming back; any frame in clears it,
// and a node sending nothing never suspects.
func TestRelayQuiet(t *testing.T) {
	type tick struct {
		in, out uint64
		suspect bool
	}
	tests := []struct {
		name  string
		ticks []tick
	}{
		{"both ways", []tick{{1, 1, false}, {2, 2, false}, {3, 3, false}, {4, 4, false}}},
		{"idle", []tick{{0, 0, false}, {0, 0, false}, {0, 0, false}}},
		{"sending into silence", []tick{{5, 5, false}, {5, 6, false}, {5, 7, true}, {5, 8, false}, {5, 9, true}}},
		{"an answer in between", []tick{{5, 5, false}, {5, 6, false}, {6, 7, false}, {6, 8, false}, {6, 9, true}}},
		{"receiving only", []tick{{1, 0, false}, {2, 0, false}, {3, 0, false}}},
		{"a pause while quiet", []tick{{0, 0, false}, {0, 1, false}, {0, 1, false}, {0, 2, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var q relayQuiet
			for i, k := range tt.ticks {
				if got := q.tick(k.in, k.out); got != k.suspect {
					t.Fatalf("tick %d (in %d, out %d): suspect = %v, want %v", i, k.in, k.out, got, k.suspect)
				}
			}
		})
	}
}
