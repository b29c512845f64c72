//go:build linux

package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// exitTimeout bounds how long a refused command may take to exit.
const exitTimeout = 30 * time.Second

// flipChar changes the character at i to another one of the same class
// (letter, digit, other), so the token still looks well-formed.
func flipChar(s string, i int) string {
	b := []byte(s)
	c := b[i]
	switch {
	case c >= 'a' && c <= 'z':
		b[i] = 'a' + (c-'a'+7)%26
	case c >= 'A' && c <= 'Z':
		b[i] = 'A' + (c-'A'+7)%26
	case c >= '0' && c <= '9':
		b[i] = '0' + (c-'0'+3)%10
	default:
		b[i] = 'Q'
	}
	return string(b)
}

// TestBadInput: the client and agent refuse bad tokens and unknown agents
// with a clear message and a non-zero exit.
func TestBadInput(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false, relayOnly...)
	// Make sure the agent is registered before testing "unknown agent".
	e.client = e.startClient(t)
	// Each refused client gets its own TUN name and state dir, so it cannot
	// disturb the working one.
	n := 0
	refusedUp := func(t *testing.T, tok, agent string, wantInMsg ...string) {
		t.Helper()
		n++
		args := e.clientArgs(tok, agent, fmt.Sprintf("nvbad%d", n), filepath.Join(e.dir, fmt.Sprintf("bad%d", n)))
		expectRefused(t, e, e.lab.NS.Client, "up", args, wantInMsg...)
	}

	tok := e.clientTok
	t.Run("FlippedCharNearEnd", func(t *testing.T) {
		refusedUp(t, flipChar(tok, len(tok)-8), agentName, "token")
	})
	t.Run("FlippedCharInMiddle", func(t *testing.T) {
		refusedUp(t, flipChar(tok, len(tok)/2), agentName, "token")
	})
	t.Run("GarbageToken", func(t *testing.T) {
		refusedUp(t, "this-is-not-a-token", agentName, "token")
	})
	t.Run("ExpiredToken", func(t *testing.T) {
		exp := e.token(t, "--client", "eve", "--allow-agent", agentName, "--ttl", "1s")
		time.Sleep(2 * time.Second)
		refusedUp(t, exp, agentName, "token")
	})
	t.Run("AgentTokenUsedByClient", func(t *testing.T) {
		// A token for role agent must not open a client session.
		refusedUp(t, e.agentTok, agentName)
	})
	t.Run("UnknownAgent", func(t *testing.T) {
		refusedUp(t, tok, "nosuch", "nosuch")
	})
	t.Run("AgentGarbageToken", func(t *testing.T) {
		args := []string{"agent", "--token", "this-is-not-a-token", "--gateway", e.gwAddr(),
			"--advertise", e.lab.LANSubnet.String(), "--state-dir", filepath.Join(e.dir, "badagent")}
		expectRefused(t, e, e.lab.NS.Agent, "bad-agent", args, "token")
	})
	t.Run("AgentFlippedToken", func(t *testing.T) {
		args := []string{"agent", "--token", flipChar(e.agentTok, len(e.agentTok)-8), "--gateway", e.gwAddr(),
			"--advertise", e.lab.LANSubnet.String(), "--state-dir", filepath.Join(e.dir, "badagent2")}
		expectRefused(t, e, e.lab.NS.Agent, "bad-agent", args, "token")
	})
	t.Run("TunnelStillWorks", func(t *testing.T) {
		if !e.gateway.Running() || !e.agent.Running() || !e.client.Running() {
			t.Fatalf("running: gateway %v agent %v client %v", e.gateway.Running(), e.agent.Running(), e.client.Running())
		}
		if err := e.poll(20*time.Second, e.httpHealth); err != nil {
			t.Fatalf("tunnel broken after the bad inputs: %v", err)
		}
	})
}

// expectRefused runs nlvpn args in ns and requires a non-zero exit within
// exitTimeout and, case-insensitively, each of wantInMsg in its output.
func expectRefused(t *testing.T, e *env, ns, name string, args []string, wantInMsg ...string) {
	t.Helper()
	p := e.start(t, ns, name, args...)
	if !p.Wait(exitTimeout) {
		p.Stop()
		t.Fatalf("nlvpn %s still running %v after a bad input; log:\n%s", args[0], exitTimeout, p.Log())
	}
	if p.ExitCode() == 0 {
		t.Fatalf("nlvpn %s exited 0 on a bad input; log:\n%s", args[0], p.Log())
	}
	log := p.Log()
	for _, w := range wantInMsg {
		if !strings.Contains(strings.ToLower(log), strings.ToLower(w)) {
			t.Errorf("message does not mention %q; log:\n%s", w, log)
		}
	}
	t.Logf("refused (exit %d): %s", p.ExitCode(), lastLines(log, 2))
}
