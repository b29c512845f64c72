package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// TestAgentNeverServesItsHost: the agent advertises its LAN and the
// link-local range, and listens itself on its LAN address and on the cloud
// metadata address 169.254.169.254 (as a cloud machine would find it).
// A client reaches the LAN host, but neither of the agent host's own
// listeners: no connection arrives at either, and the agent counts each
// refusal by reason.
func TestAgentNeverServesItsHost(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	agentState := filepath.Join(e.dir, "agent")
	e.agent.Stop()
	if _, err := lab.Output(context.Background(), e.lab.NS.Agent, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo"); err != nil {
		t.Fatal(err)
	}
	var leaked atomic.Int64
	for _, addr := range []string{net.JoinHostPort(e.lab.AgentLANAddr.String(), "8099"), "169.254.169.254:80"} {
		ln, err := lab.Listen(e.lab.NS.Agent, "tcp4", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				leaked.Add(1)
				c.Write([]byte("HTTP/1.0 200 OK\r\n\r\nleaked\n"))
				c.Close()
			}
		}()
	}
	e.agent = e.start(t, e.lab.NS.Agent, "agent", "agent", "--token-file", e.tokenFile(e.agentTok), "--gateway", e.gwAddr(),
		"--advertise", e.lab.LANSubnet.String(), "--advertise", "169.254.0.0/16", "--state-dir", agentState)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.agent.WaitLog(ctx, "registered"); err != nil {
		t.Fatalf("agent: %v", err)
	}
	e.startClientMode(t)

	for _, url := range []string{
		fmt.Sprintf("http://%s:8099/", e.lab.AgentLANAddr),
		"http://169.254.169.254/latest/meta-data/",
	} {
		out, _, err := lab.Run(context.Background(), e.lab.NS.Client, "curl", "-sS", "--noproxy", "*", "--max-time", "3", url)
		if err == nil {
			t.Errorf("%s answered through the tunnel: %q", url, out)
		}
	}
	if n := leaked.Load(); n != 0 {
		t.Fatalf("%d connections reached the agent host's own listeners", n)
	}
	var st struct {
		Denied map[string]uint64 `json:"denied"`
	}
	sctx, scancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer scancel()
	stdout, _, err := lab.Run(sctx, e.lab.NS.Agent, nlvpnBin, "status", "--json", "--state-dir", agentState)
	if err != nil {
		t.Fatalf("agent status: %v", err)
	}
	if err := json.Unmarshal(stdout, &st); err != nil {
		t.Fatalf("agent status --json printed %q: %v", stdout, err)
	}
	if st.Denied["host_address"] == 0 || st.Denied["link_local"] == 0 {
		t.Errorf("agent's denied counters %v: want host_address and link_local counted", st.Denied)
	}
	if err := e.download(t, 1<<20, 23); err != nil {
		t.Fatalf("the LAN host is not reachable: %v", err)
	}
}
