//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/connectproxy"
	"github.com/nlvpn/nlvpn/lab"
)

// waitTransport waits until the client's status says it reaches the
// gateway over want.
func (e *env) waitTransport(t *testing.T, want string, timeout time.Duration) status {
	t.Helper()
	var st status
	e.waitFor(t, timeout, "transport "+want, func() error {
		var err error
		if st, err = e.status(t); err != nil {
			return err
		}
		if st.Transport != want {
			return fmt.Errorf("transport is %q", st.Transport)
		}
		return nil
	})
	return st
}

// TestUDPBlockedFallsBackToTCP: the client's network drops all UDP (its
// NAT's forward chain), TCP passes. A plain `nlvpn up` finds no answer
// over UDP, reaches the gateway over TCP/TLS by itself, and the tunnel
// works on the relay (its frames in the gateway connection): a download
// from the LAN host completes intact. Once UDP passes again, the client
// moves its gateway connection back to UDP by itself, and the tunnel
// carries on.
func TestUDPBlockedFallsBackToTCP(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	ctx := context.Background()
	if err := e.lab.BlockClientUDP(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	c := e.startClientMode(t)
	t.Logf("tunnel up %.1f s after start, UDP blocked", time.Since(start).Seconds())
	st := e.waitTransport(t, "tcp", 5*time.Second)
	if st.Path != "relay" || st.RelayUDP {
		t.Fatalf("path %q, relay frames as UDP %v: want the relay, inside the gateway connection", st.Path, st.RelayUDP)
	}
	if !strings.Contains(c.Log(), "no answer from the gateway over UDP yet; trying TCP too") || !strings.Contains(c.Log(), "transport=tcp") {
		t.Fatalf("the client's log does not say it fell back to TCP:\n%s", c.Log())
	}
	t0 := time.Now()
	if err := e.download(t, 16<<20, 51); err != nil {
		t.Fatalf("download over the TCP fallback: %v", err)
	}
	t.Logf("16 MiB over the TCP fallback in %.1f s (%.1f Mbit/s)", time.Since(t0).Seconds(), 16*8*1.048576/time.Since(t0).Seconds())

	// UDP passes again: back to UDP within the first re-check (10 s), and
	// a transfer across the move completes.
	done := make(chan error, 1)
	go func() { done <- e.download(t, 24<<20, 52, "--limit-rate", "1M") }()
	time.Sleep(2 * time.Second)
	if err := e.lab.UnblockClientUDP(ctx); err != nil {
		t.Fatal(err)
	}
	unblocked := time.Now()
	e.waitTransport(t, "udp", 25*time.Second)
	t.Logf("back on UDP %.1f s after UDP passed again", time.Since(unblocked).Seconds())
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the download across the move back to UDP: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the download did not finish")
	}
}

// TestUDPBlockedThroughProxy: the client's network lets nothing out but
// TCP to an HTTP proxy on its router. `nlvpn up --proxy URL`, and the same
// with HTTPS_PROXY instead of the flag, reach the gateway through the
// proxy's CONNECT, and a download through the tunnel completes intact.
func TestUDPBlockedThroughProxy(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	ctx := context.Background()
	const port = 3128
	proxyAddr := fmt.Sprintf("%s:%d", e.lab.ClientLANGateway(), port)
	ln, err := lab.Listen(e.lab.NS.ClientNAT, "tcp", proxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	proxy := &connectproxy.Server{Dial: lab.Dialer(e.lab.NS.ClientNAT)}
	srv := &http.Server{Handler: proxy}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if err := e.lab.ClientOnlyProxy(ctx, port); err != nil {
		t.Fatal(err)
	}
	url := "http://" + proxyAddr
	for i, tc := range []struct {
		name string
		argv func(args []string) []string
	}{
		{"--proxy", func(args []string) []string { return append(append([]string{nlvpnBin}, args...), "--proxy", url) }},
		{"HTTPS_PROXY", func(args []string) []string {
			return append([]string{"env", "HTTPS_PROXY=" + url, "NO_PROXY=192.168.77.0/24", nlvpnBin}, args...)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := proxy.Tunnels()
			start := time.Now()
			c := e.startCmd(t, e.lab.NS.Client, "client", tc.argv(e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir()))...)
			e.waitFor(t, readyTimeout, "the tunnel to come up", func() error {
				if !c.Running() {
					return errStop(fmt.Errorf("client exited with code %d", c.ExitCode()))
				}
				return e.httpHealth()
			})
			t.Logf("tunnel up %.1f s after start, through the proxy", time.Since(start).Seconds())
			e.waitTransport(t, "tcp via proxy "+proxyAddr, 5*time.Second)
			if proxy.Tunnels() == before {
				t.Fatal("the proxy opened no tunnel")
			}
			if err := e.download(t, 8<<20, uint64(61+i)); err != nil {
				t.Fatalf("download through the proxy: %v", err)
			}
			c.Stop()
		})
	}
}

// TestUDPBlockedBothSides: neither the client's nor the agent's network
// lets UDP out. Both reach the gateway over TCP by themselves, and the
// tunnel works through the relay, its frames inside both gateway
// connections: a download completes intact, and both say so in status.
func TestUDPBlockedBothSides(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	e := newEnv(t, coneCone, false)
	if err := e.lab.BlockAgentUDP(ctx); err != nil {
		t.Fatal(err)
	}
	if err := e.lab.BlockClientUDP(ctx); err != nil {
		t.Fatal(err)
	}
	// The agent registered over UDP before its network closed: restart it.
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String())
	e.startClientMode(t)
	e.waitTransport(t, "tcp", 5*time.Second)
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, _, err := lab.Run(sctx, e.lab.NS.Agent, nlvpnBin, "status", "--json", "--state-dir", e.agentStateDir())
	if err != nil {
		t.Fatal(err)
	}
	var ast struct {
		Transport string `json:"transport"`
	}
	if err := json.Unmarshal(out, &ast); err != nil || ast.Transport != "tcp" {
		t.Fatalf("agent status transport %q (%v), want tcp", ast.Transport, err)
	}
	if err := e.download(t, 8<<20, 71); err != nil {
		t.Fatalf("download with both sides over TCP: %v", err)
	}
}
