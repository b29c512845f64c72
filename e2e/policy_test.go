//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
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
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--advertise", "169.254.0.0/16")
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
	denied := agentDenied(t, e)
	if denied["host_address"] == 0 || denied["link_local"] == 0 {
		t.Errorf("agent's denied counters %v: want host_address and link_local counted", denied)
	}
	if err := e.download(t, 1<<20, 23); err != nil {
		t.Fatalf("the LAN host is not reachable: %v", err)
	}
}

// TestAgentPolicy: an agent with --policy lets alice reach the LAN host's
// web port only; her TCP to the echo port and her ping are refused,
// counted and logged with her name, while the web keeps working. A new
// policy put in force with SIGHUP allows ping without dropping her tunnel;
// a policy file that does not parse leaves the last one in force.
func TestAgentPolicy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	polFile := filepath.Join(e.dir, "policy")
	writePolicy := func(text string) {
		if err := os.WriteFile(polFile, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writePolicy(fmt.Sprintf("allow client:alice %s %d tcp\n", e.lab.LANHost, httpPort))
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--policy", polFile)
	e.startClientMode(t) // waits for the web port: allowed

	ping := func() error {
		_, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "1", "-W", "2", e.lab.LANHost.String())
		return err
	}
	// echo connects to the LAN host's TCP echo port: nil if it connects.
	echo := func() error {
		return lab.Do(e.lab.NS.Client, func() error {
			c, err := net.DialTimeout("tcp", net.JoinHostPort(e.lab.LANHost.String(), fmt.Sprint(tcpEchoPort)), 3*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
	}
	if err := ping(); err == nil {
		t.Error("ping passed a policy that has no icmp rule")
	}
	if err := echo(); err == nil {
		t.Error("TCP to the echo port passed a policy that allows only the web port")
	}
	if st := agentDenied(t, e); st["policy"] < 2 {
		t.Errorf("denied counters %v: want the ping and the TCP counted under policy", st)
	}
	if !strings.Contains(e.agent.Log(), "refused by the policy") || !strings.Contains(e.agent.Log(), "client=alice") {
		t.Error("the agent's log does not name the refusal and the client")
	}

	// A broken file on SIGHUP: the last policy stays.
	writePolicy("allow everyone everything\n")
	if err := e.agent.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer rcancel()
	if err := e.agent.WaitLog(rctx, "policy not reloaded"); err != nil {
		t.Fatalf("no word of the broken policy: %v", err)
	}
	if err := e.httpHealth(); err != nil {
		t.Fatalf("the web port closed after a broken policy file: %v", err)
	}

	writePolicy(fmt.Sprintf("allow client:alice %s %d tcp\nallow * %s * icmp\n", e.lab.LANHost, httpPort, e.lab.LANSubnet))
	if err := e.agent.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if err := e.agent.WaitLog(rctx, "policy reloaded"); err != nil {
		t.Fatalf("policy not reloaded: %v", err)
	}
	if err := e.poll(5*time.Second, ping); err != nil {
		t.Fatalf("ping still refused after the reload allowed it: %v", err)
	}
	if err := echo(); err == nil {
		t.Error("TCP to the echo port passed after the reload (still not allowed)")
	}
	if !e.client.Running() {
		t.Fatal("the client's tunnel ended on the reload")
	}
	if err := e.download(t, 1<<20, 24); err != nil {
		t.Fatalf("the allowed web port broke on the reload: %v", err)
	}
}

// agentDenied reads the agent's "denied" counters.
func agentDenied(t *testing.T, e *env) map[string]uint64 {
	t.Helper()
	var st struct {
		Denied map[string]uint64 `json:"denied"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stdout, _, err := lab.Run(ctx, e.lab.NS.Agent, nlvpnBin, "status", "--json", "--state-dir", e.agentStateDir())
	if err != nil {
		t.Fatalf("agent status: %v", err)
	}
	if err := json.Unmarshal(stdout, &st); err != nil {
		t.Fatalf("agent status --json printed %q: %v", stdout, err)
	}
	return st.Denied
}
