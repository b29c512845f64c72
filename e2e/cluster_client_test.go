//go:build linux

package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

var onGatewayInLog = regexp.MustCompile(`msg="registered with gateway"[^\n]*? gateway=(\S+)`)

// lastGateway is the gateway a node's log says it registered with last.
func lastGateway(p *lab.Process) string {
	m := onGatewayInLog.FindAllStringSubmatch(p.Log(), -1)
	if len(m) == 0 {
		return ""
	}
	return m[len(m)-1][1]
}

// TestClusterClientFollowsAgent: three gateways and three NATS servers. The
// agent knows gateways 2 and 3 and registers with whichever answers first;
// the client knows gateway 1 only. The client's `up` is sent by gateway 1
// to the agent's gateway, and the tunnel works there: direct by default,
// and relayed by the agent's gateway with --relay. Then the agent's
// gateway is killed in the middle of a relayed download: the agent moves
// to the other gateway it knows, the client (back on gateway 1, which
// sends it on) follows, the end-to-end session resumes, and the download
// completes intact. Prints time to first packet across gateways and the
// failover time.
func TestClusterClientFollowsAgent(t *testing.T) {
	ce := newClusterEnv(t, coneCone, 3, 3)
	gw := func(i int) string { return ce.gws[i].publicAddr() }
	agentTok := ce.token(t, "--agent", agentName)
	agent := ce.start(t, ce.lab.NS.Agent, "agent", "agent", "--token-file", ce.tokenFile(agentTok),
		"--gateway", gw(1), "--gateway", gw(2),
		"--advertise", ce.lab.LANSubnet.String(), "--state-dir", ce.agentStateDir())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	err := agent.WaitLog(ctx, "registered with gateway")
	cancel()
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	home := lastGateway(agent)
	homeIdx := map[string]int{gw(1): 1, gw(2): 2}[home]
	if homeIdx == 0 {
		t.Fatalf("the agent registered with %q, not gateway 2 or 3", home)
	}
	t.Logf("agent on gateway %d (%s)", homeIdx+1, home)
	clientTok := ce.token(t, "--client", "alice", "--allow-agent", agentName, "--uses", "4")

	for _, mode := range []string{"direct", "relay"} {
		t.Run(mode, func(t *testing.T) {
			state := filepath.Join(ce.dir, "client-"+mode)
			args := []string{"up", "--token-file", ce.tokenFile(clientTok), "--gateway", gw(0), "--agent", agentName,
				"--state-dir", state, "--tun", tunName}
			if mode == "relay" {
				args = append(args, "--relay")
			}
			start := time.Now()
			client := ce.start(t, ce.lab.NS.Client, "client-"+mode, args...)
			ce.waitFor(t, 30*time.Second, "the LAN host through the tunnel", func() error {
				if !client.Running() {
					return errStop(fmt.Errorf("client exited: %s", client.Log()))
				}
				return ce.httpHealth()
			})
			t.Logf("%s: cross-gateway time to first packet %v", mode, time.Since(start).Round(time.Millisecond))
			if !strings.Contains(client.Log(), "moving to the gateway the agent is on") || lastGateway(client) != home {
				t.Fatalf("the client is on %q, want the agent's gateway %s; log:\n%s", lastGateway(client), home, client.Log())
			}
			if mode == "direct" {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				err := client.WaitLog(ctx, established)
				cancel()
				if err != nil {
					t.Fatalf("no direct path across gateways: %v", err)
				}
				if err := ce.download(t, 8<<20, 91); err != nil {
					t.Fatalf("download on the direct path: %v", err)
				}
				client.Stop()
				return
			}

			done := make(chan error, 1)
			go func() { done <- ce.download(t, 16<<20, 92, "--limit-rate", "1M") }()
			time.Sleep(3 * time.Second)
			killed := time.Now()
			ce.gws[homeIdx].proc.Signal(syscall.SIGKILL) // a crash: no goodbye to anyone
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("the download across the loss of the agent's gateway failed: %v", err)
				}
			case <-time.After(150 * time.Second):
				t.Fatal("the download did not finish")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := client.WaitLog(ctx, "session resumed over the relay"); err != nil {
				t.Fatalf("the session was not resumed: %v\n%s", err, client.Log())
			}
			other := gw(3 - homeIdx)
			if got := lastGateway(agent); got != other {
				t.Fatalf("after its gateway died the agent is on %q, want %s", got, other)
			}
			if got := lastGateway(client); got != other {
				t.Fatalf("after the agent's gateway died the client is on %q, want the agent's new gateway %s", got, other)
			}
			t.Logf("failover: download intact; the client resumed within %v of the kill (log)", resumedAfter(client.Log(), killed))
		})
	}
}

var resumedAt = regexp.MustCompile(`time=(\S+) level=INFO msg="session resumed over the relay"`)

// resumedAfter is how long after t the client's log says the session
// resumed (the last time it did), or 0 if it does not say.
func resumedAfter(log string, t time.Time) time.Duration {
	m := resumedAt.FindAllStringSubmatch(log, -1)
	if len(m) == 0 {
		return 0
	}
	at, err := time.Parse(time.RFC3339Nano, m[len(m)-1][1])
	if err != nil {
		return 0
	}
	return at.Sub(t).Round(time.Millisecond)
}
