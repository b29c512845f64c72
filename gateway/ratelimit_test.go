package gateway

import (
	"testing"
	"time"
)

// A client gets a burst of connects, then one a second: enough for any
// real reconnect loop, too little to make an agent probe on demand.
func TestConnectRateLimit(t *testing.T) {
	n := &node{}
	t0 := time.Unix(1000, 0)
	for i := 0; i < connectBurst; i++ {
		if !n.connectAllowed(t0) {
			t.Fatalf("connect %d of the burst refused", i+1)
		}
	}
	if n.connectAllowed(t0) {
		t.Fatal("connect beyond the burst allowed")
	}
	if n.connectAllowed(t0.Add(connectEvery / 2)) {
		t.Fatal("allowed before a token refilled")
	}
	if !n.connectAllowed(t0.Add(connectEvery + connectEvery/2)) {
		t.Fatal("refused after a token refilled")
	}
	if !n.connectAllowed(t0.Add(time.Hour)) {
		t.Fatal("refused after a long pause")
	}
	for i := 1; i < connectBurst; i++ {
		n.connectAllowed(t0.Add(time.Hour))
	}
	if n.connectAllowed(t0.Add(time.Hour)) {
		t.Fatal("a long pause refilled more than the burst")
	}
}
