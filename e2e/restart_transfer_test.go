//go:build linux

package e2e

import (
	"testing"
	"time"
)

// TestTransferSurvivesGatewayRestart keeps one TCP connection (a slow
// download) open on the relay while the gateway restarts: the end-to-end
// session resumes over the new relay route, so the connection inside it
// carries on and the download completes intact.
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
}
