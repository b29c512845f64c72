//go:build linux

package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// The tests here run a compromised gateway: the real one built with the
// nlvpn_misbehave tag (gateway/misbehave.go), which alters the session
// introductions it sends, using every key it holds. Agents and clients
// must refuse what it makes up, and nothing may reach the LAN.

var (
	misbehaveOnce sync.Once
	misbehaveBin  string
	misbehaveErr  error
)

// misbehavingBinary builds nlvpn with the misbehaving gateway, once.
func misbehavingBinary(t *testing.T) string {
	t.Helper()
	misbehaveOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nlvpn-e2e-misbehave")
		if err != nil {
			misbehaveErr = err
			return
		}
		misbehaveBin = filepath.Join(dir, "nlvpn-misbehave")
		cmd := exec.Command("go", "build", "-tags", "nlvpn_misbehave", "-o", misbehaveBin, "github.com/nlvpn/nlvpn/cmd/nlvpn")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			misbehaveErr = fmt.Errorf("go build -tags nlvpn_misbehave: %v\n%s", err, out)
		}
	})
	if misbehaveErr != nil {
		t.Fatal(misbehaveErr)
	}
	return misbehaveBin
}

// compromiseGateway replaces the env's gateway by the misbehaving build,
// on the same state (its key, its pin, the nodes' enrollments) and port,
// and waits until the agent has registered with it.
func (e *env) compromiseGateway(t *testing.T, mode string) {
	t.Helper()
	bin := misbehavingBinary(t)
	registered := strings.Count(e.agent.Log(), "registered with gateway")
	e.gateway.Stop()
	p, err := e.lab.Start(e.lab.NS.GW, lab.ProcConfig{Name: "gateway-" + mode, Args: append([]string{bin}, e.gwArgs...),
		Env: append(e.procEnv(), "NLVPN_MISBEHAVE="+mode), LogPath: filepath.Join(e.dir, "gateway-"+mode+".log")})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	e.gateway = p
	e.waitFor(t, 30*time.Second, "the agent registered with the compromised gateway", func() error {
		if !p.Running() {
			return errStop(fmt.Errorf("compromised gateway exited (%v)", p.Err()))
		}
		if strings.Count(e.agent.Log(), "registered with gateway") <= registered {
			return errors.New("not yet")
		}
		return nil
	})
}

// captureLAN counts packets on the LAN namespace that come from the agent
// (tcpdump prints the count when stopped).
func (e *env) captureLAN(t *testing.T) *lab.Process {
	t.Helper()
	return e.capture(t, e.lab.NS.LAN, filepath.Join(e.dir, "lan.pcap"), "src host "+e.lab.AgentLANAddr.String())
}

// refusedClient starts `nlvpn up` (never connected before: no pinned
// agent key) and waits for it to give up; it returns its log.
func (e *env) refusedClient(t *testing.T) string {
	t.Helper()
	c := e.start(t, e.lab.NS.Client, "client", e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir())...)
	if !c.Wait(30 * time.Second) {
		t.Fatalf("the client still runs 30 s after starting against a compromised gateway:\n%s", c.Log())
	}
	if c.ExitCode() == 0 {
		t.Fatalf("the client exited 0:\n%s", c.Log())
	}
	if err := e.httpHealth(); err == nil {
		t.Fatal("the LAN answers through a tunnel the gateway set up on its own terms")
	}
	return c.Log()
}

// TestCompromisedGatewayCannotJoinAsClient: a gateway that offers agents
// its own key as a client, with a credential it signed itself, or with a
// real client's credential (not a secret), is refused by the agent; the
// client is told; no packet from the agent reaches the LAN.
func TestCompromisedGatewayCannotJoinAsClient(t *testing.T) {
	for _, mode := range []string{"client-key", "replay-credential"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, coneCone, false)
			e.compromiseGateway(t, mode)
			td := e.captureLAN(t)
			log := e.refusedClient(t)
			if !strings.Contains(log, "client credential refused") {
				t.Errorf("the client's log does not say the agent refused the credential:\n%s", log)
			}
			if !strings.Contains(e.agent.Log(), "session offer refused: the client's credential does not hold") {
				t.Errorf("the agent's log does not show the refusal:\n%s", e.agent.Log())
			}
			if strings.Contains(e.agent.Log(), "client connected") {
				t.Error("the agent let a client connect")
			}
			if n := agentDenied(t, e)["offer_refused"]; n == 0 {
				t.Error("the agent's offer_refused counter is 0")
			}
			td.Stop()
			if !strings.Contains(td.Log(), "0 packets captured") {
				t.Fatalf("packets from the agent reached the LAN:\n%s", td.Log())
			}
		})
	}
}

// TestCompromisedGatewayCannotImpersonateAgent: a gateway that tells a
// client (on its very first connection, nothing pinned yet) that the
// agent's key is its own, with a credential it signed for it, is refused
// by the client before any handshake; the key is not pinned.
func TestCompromisedGatewayCannotImpersonateAgent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.compromiseGateway(t, "agent-key")
	td := e.captureLAN(t)
	log := e.refusedClient(t)
	if !strings.Contains(log, "has no valid credential from the authority") {
		t.Errorf("the client's log does not say the agent's key lacks a credential:\n%s", log)
	}
	if b, err := os.ReadFile(filepath.Join(e.clientStateDir(), "known_agents")); err == nil && strings.Contains(string(b), agentName) {
		t.Errorf("the client pinned the key the compromised gateway gave it:\n%s", b)
	}
	td.Stop()
	if !strings.Contains(td.Log(), "0 packets captured") {
		t.Fatalf("packets from the agent reached the LAN:\n%s", td.Log())
	}
}
