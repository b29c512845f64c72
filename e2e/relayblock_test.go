//go:build linux

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestRelayFramesBlockedAfterCheck: the agent's network starts dropping
// its relay frames right after the agent's first relay check was answered
// (a firewall that passes QUIC and nothing else), and a client connects at
// once. The agent takes the session's relay frames into its gateway
// connection after one unanswered prompt check, so the end-to-end
// handshake completes; before, the agent went on sending them as UDP until
// its checks had been silent for 12 s, and the client's handshake gave up
// after 10 s ("no recent network activity").
func TestRelayFramesBlockedAfterCheck(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	// The agent checks the relay when its gateway connection comes up:
	// give the answer time to arrive.
	time.Sleep(2 * time.Second)
	if err := e.lab.DropAgentFrames(context.Background()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	e.startClientMode(t, "--relay")
	t.Logf("tunnel up %.1f s after the agent's frames were blocked", time.Since(start).Seconds())
	if !strings.Contains(e.agent.Log(), "a prompt check went unanswered") {
		t.Fatalf("the agent did not say it moved its relay frames into the gateway connection:\n%s", e.agent.Log())
	}
	if err := e.download(t, 4<<20, 93); err != nil {
		t.Fatal(err)
	}
}
