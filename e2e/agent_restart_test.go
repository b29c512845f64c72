package e2e

import (
	"path/filepath"
	"testing"
	"time"
)

// TestAgentRestart stops the agent while a client is up and starts it
// again: the client must notice (the agent says goodbye; the gateway
// reports the route gone) and come back by itself on a new session, well
// before the session's 90 s idle timeout would have told it. Both on the
// relay and on the direct path.
func TestAgentRestart(t *testing.T) {
	for _, mode := range []struct {
		name  string
		flags []string
	}{{"relay", relayOnly}, {"default", nil}} {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, coneCone, true, mode.flags...)
			e.agent.Stop()
			t.Logf("agent stopped: %s", e.agent.ExitStatus())
			e.agent = e.start(t, e.lab.NS.Agent, "agent", "agent", "--token", e.agentTok, "--gateway", e.gwAddr(),
				"--advertise", e.lab.LANSubnet.String(), "--state-dir", filepath.Join(e.dir, "agent"))
			start := time.Now()
			const resume = 30 * time.Second
			if err := e.poll(resume, e.httpHealth); err != nil {
				t.Fatalf("traffic did not resume within %v after the agent restarted: %v", resume, err)
			}
			t.Logf("traffic resumed %v after the agent was started again", time.Since(start).Round(100*time.Millisecond))
			if !e.client.Running() {
				t.Fatal("the client exited when the agent went away")
			}
		})
	}
}
