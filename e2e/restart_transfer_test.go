//go:build linux

package e2e

import (
	"testing"
	"time"
)

// TestTransferSurvivesGatewayRestart keeps one TCP connection (a slow
// download) open on the relay while the gateway restarts: the end-to-end
// session resumes over the new relay route, so the connection inside it
// carries on and the download completes intact, and the client stays on
// UDP.
func TestTransferSurvivesGatewayRestart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, true, relayOnly...)
	done := make(chan error, 1)
	go func() { done <- e.download(t, 16<<20, 41, "--limit-rate", "1M") }()
	time.Sleep(3 * time.Second)
	e.gateway.Stop()
	time.Sleep(time.Second)
	e.startGateway(t)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the download across the gateway restart failed: %v", err)
		}
	case <-time.After(150 * time.Second):
		t.Fatal("the download did not finish")
	}
	// UDP works here: the reconnect after the restart must not have moved
	// the gateway connection to the TCP fallback.
	if st, err := e.status(t); err != nil || st.Transport != "udp" {
		t.Fatalf("after the gateway restart the client reaches it over %q (%v), want udp", st.Transport, err)
	}
}
