//go:build linux

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
	e.clientTok = e.token(t, "--client", "alice", "--allow-agent", agentName, "--ttl", "8s")
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
	e.clientTok = e.token(t, "--client", "bob", "--allow-agent", agentName)
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

// TestRevokeEndsDirectTransfer: `nlvpn token revoke --client alice`
// during a download on the direct path (which does not pass the gateway)
// ends it within 2 s: the agent cuts the session on the gateway's word,
// the client stops saying the token was revoked, and a new `up` with the
// same token is refused as revoked.
func TestRevokeEndsDirectTransfer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	c := e.startClientMode(t, "--direct")
	e.waitPath(t, "direct", 5*time.Second)
	done := make(chan error, 1)
	// A download far longer than the test, unthrottled (a throttled curl
	// would go on reading what its socket buffered); curl gives up when
	// nothing arrives for 2 s, since a cut tunnel sends no RST.
	go func() { done <- e.download(t, 1<<30, 41, "--speed-limit", "1000", "--speed-time", "2") }()
	time.Sleep(1500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, stderr, err := lab.Run(ctx, e.lab.NS.GW, nlvpnBin, "token", "revoke", "--state-dir", e.gwState, "--client", "alice"); err != nil {
		t.Fatalf("nlvpn token revoke: %v: %s", err, stderr)
	}
	revoked := time.Now()
	// The target is 2 s; the bound leaves room for a loaded machine, and
	// the log says what it took.
	if !c.Wait(5 * time.Second) {
		t.Fatal("the client still runs 5 s after its token was revoked")
	}
	t.Logf("client stopped %v after the revocation", time.Since(revoked).Round(100*time.Millisecond))
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("the 1 GiB download completed although the token was revoked 1.5 s in")
		}
		t.Logf("download ended %v after the revocation: %v", time.Since(revoked).Round(100*time.Millisecond), err)
	case <-time.After(30 * time.Second):
		t.Fatal("the download went on 30 s after the revocation")
	}
	if !strings.Contains(c.Log(), "revoked") {
		t.Errorf("the client does not say its token was revoked:\n%s", c.Log())
	}
	// The agent ends the session on the gateway's word; the client, told
	// by the gateway too, may have said goodbye first, and then the agent
	// logs that it has no session to end.
	if err := e.agent.WaitLog(ctx, "the client's token was revoked; "); err != nil {
		t.Errorf("the agent did not take the gateway's revocation of the session: %v", err)
	}
	// and it holds the authority's signed list, which it checked itself.
	if err := e.agent.WaitLog(ctx, "revocation list in force"); err != nil {
		t.Errorf("the agent did not take the authority's revocation list: %v", err)
	}
	again := e.start(t, e.lab.NS.Client, "client-again", e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir())...)
	if !again.Wait(20 * time.Second) {
		t.Fatal("`up` with a revoked token still runs after 20 s")
	}
	if again.ExitCode() == 0 || !strings.Contains(again.Log(), "revoked") {
		t.Fatalf("`up` with a revoked token: %s\n%s", again.ExitStatus(), again.Log())
	}
}

// TestCopiedAgentTokenCannotTakeName: while the agent is offline, a second
// machine with a copy of its token tries to register under its name. The
// gateway refuses it (the token is bound to the first machine's key), the
// real agent comes back under its name, and clients reach its LAN.
func TestCopiedAgentTokenCannotTakeName(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.agent.Stop()
	impostor := e.start(t, e.lab.NS.Agent, "impostor", "agent", "--token-file", e.tokenFile(e.agentTok), "--gateway", e.gwAddr(),
		"--advertise", e.lab.LANSubnet.String(), "--state-dir", filepath.Join(e.dir, "impostor"))
	if !impostor.Wait(20 * time.Second) {
		t.Fatal("an agent with a copied token still runs after 20 s")
	}
	if impostor.ExitCode() == 0 || !strings.Contains(impostor.Log(), "already used by another machine") {
		t.Fatalf("impostor: %s\n%s", impostor.ExitStatus(), impostor.Log())
	}
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String())
	e.startClientMode(t)
	if err := e.download(t, 1<<20, 31); err != nil {
		t.Fatalf("the LAN is not reachable through the real agent: %v", err)
	}
}
