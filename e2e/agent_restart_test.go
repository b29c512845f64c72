//go:build linux

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/config"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
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
			// The agent kept the token that worked in its state (0600):
			// it comes back with no token given anywhere.
			state := e.agentStateDir()
			checkSavedToken(t, filepath.Join(state, "config"), "agent_token", e.agentTok)
			e.agent = e.start(t, e.lab.NS.Agent, "agent", "agent", "--gateway", e.gwAddr(),
				"--advertise", e.lab.LANSubnet.String(), "--state-dir", state)
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

// checkSavedToken asserts that the config file at path is 0600 and keeps,
// under key, the credential the token tok became on this machine (bound to
// the node key in the same directory), and not the token itself: its
// enrollment secret is not kept once used.
func checkSavedToken(t *testing.T, path, key, tok string) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatalf("the credential was not saved: %v", err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %#o, want 0600", path, st.Mode().Perm())
	}
	file, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(fmt.Sprint(file), strings.TrimSpace(tok)) {
		t.Errorf("%s keeps the token with its enrollment secret", path)
	}
	cr, err := token.ParseCredential(file[key])
	if err != nil {
		t.Fatalf("%s keeps no credential under %q: %v", path, key, err)
	}
	want, _ := token.Parse(tok)
	nodeKey, err := identity.LoadOrCreate(filepath.Join(filepath.Dir(path), "node.key"))
	if err != nil {
		t.Fatal(err)
	}
	if cr.Claims.ID != want.ID || !cr.Node.Equal(nodeKey.Public()) {
		t.Fatalf("saved credential is for token %s and key %s; want token %s, key %s", cr.Claims.ID, cr.Node, want.ID, nodeKey.Public())
	}
}

// TestClientWaitsForAgent: `nlvpn up` started while the agent is not
// online waits for it, saying so, instead of exiting; the tunnel comes up
// by itself once the agent starts, with nobody restarting the client.
func TestClientWaitsForAgent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.agent.Stop()
	c := e.start(t, e.lab.NS.Client, "client", e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir())...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.WaitLog(ctx, "waiting for the agent to come online"); err != nil {
		t.Fatalf("the client does not say it waits for the agent: %v\n%s", err, c.Log())
	}
	time.Sleep(4 * time.Second) // a few rounds of asking
	if !c.Running() {
		t.Fatalf("the client exited while the agent was offline: %s\n%s", c.ExitStatus(), c.Log())
	}
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String())
	start := time.Now()
	const within = 20 * time.Second
	if err := e.poll(within, e.httpHealth); err != nil {
		t.Fatalf("the tunnel did not come up within %v of the agent starting: %v\n%s", within, err, c.Log())
	}
	t.Logf("tunnel up %v after the agent registered", time.Since(start).Round(100*time.Millisecond))
	if !strings.Contains(c.Log(), "the agent is there") {
		t.Errorf("the client does not say the agent came:\n%s", c.Log())
	}
}
