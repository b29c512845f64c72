package e2e

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// TestExpiryCutsLiveDirectSession: a client whose token expires while its
// tunnel runs on the direct path (which does not pass the gateway) is cut
// at expiry by the agent as well as the gateway: the client stops with a
// message that says the token expired, and the LAN is unreachable.
func TestExpiryCutsLiveDirectSession(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.clientTok = e.token(t, "--client", "alice", "--ttl", "8s")
	issued := time.Now()
	c := e.startClientMode(t, "--direct")
	if st := e.waitPath(t, "direct", 5*time.Second); st.Path != "direct" {
		t.Fatalf("path %q", st.Path)
	}
	ping := func() error {
		_, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "1", "-W", "1", e.lab.LANHost.String())
		return err
	}
	if err := ping(); err != nil {
		t.Fatalf("no ping before expiry: %v", err)
	}
	if !c.Wait(time.Until(issued.Add(8*time.Second)) + 6*time.Second) {
		t.Fatal("the client still runs 6 s after its token expired")
	}
	t.Logf("client stopped %v after issue: %s", time.Since(issued).Round(100*time.Millisecond), c.ExitStatus())
	if c.ExitCode() == 0 {
		t.Error("the client exited 0 on an expired token")
	}
	if !strings.Contains(c.Log(), "expired") {
		t.Errorf("the client's log does not say the token expired:\n%s", c.Log())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.agent.WaitLog(ctx, "the client's token expired; ending its session"); err != nil {
		t.Errorf("the agent did not end the session itself: %v", err)
	}
	if err := ping(); err == nil {
		t.Error("the LAN still answers after the token expired")
	}
}

// TestTokenEnrollsOneMachine: a client token used by one machine is
// refused on a second (its own state, so its own key) with a message
// that says why and what to do, while the first keeps working.
func TestTokenEnrollsOneMachine(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.clientTok = e.token(t, "--client", "bob")
	e.startClientMode(t)
	second := e.start(t, e.lab.NS.Client, "second-machine", "up", "--token-file", e.tokenFile(e.clientTok), "--gateway", e.gwAddr(),
		"--agent", agentName, "--state-dir", filepath.Join(e.dir, "second"), "--netstack", "--socks5", "127.0.0.1:1090", "--http-proxy", "")
	if !second.Wait(20 * time.Second) {
		t.Fatal("a second machine with a used one-machine token still runs after 20 s")
	}
	if second.ExitCode() == 0 || !strings.Contains(second.Log(), "already used by another machine") {
		t.Fatalf("second machine: %s\n%s", second.ExitStatus(), second.Log())
	}
	if err := e.httpHealth(); err != nil {
		t.Fatalf("the first machine lost its tunnel: %v", err)
	}
}
