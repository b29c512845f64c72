//go:build linux

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/gateway"
	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/token"
)

// TestClusterACMEGateways: two gateways of one cluster (one NATS server),
// each with a name of its own and a certificate for it from pebble
// (HTTP-01 checked for real), so no pin. They join the cluster (the pin
// they compare is empty on both); a gateway with a pinned certificate is
// refused from it, saying why. An agent is on gateway 2; a client whose
// token names gateway 1 only, by name and without a pin, is sent to
// gateway 2, verifies it by pebble's root and its name, and a download
// relayed by gateway 2 arrives intact. A node that dials gateway 2 by its
// address, which the certificate does not name, refuses it.
func TestClusterACMEGateways(t *testing.T) {
	names := []string{"gw1.nlvpn.test", "gw2.nlvpn.test"}
	var apiCert string
	ce := newClusterEnvWith(t, coneCone, 2, 1, func(ce *clusterEnv) {
		hosts := "127.0.0.1 localhost\n"
		for i, g := range ce.gws {
			g.public = fmt.Sprintf("%s:%d", names[i], gwPort)
			hosts += fmt.Sprintf("%s %s\n", g.addr, names[i])
		}
		// pebble (beside gateway 1) resolves both names for its checks;
		// the nodes dial them.
		for _, ns := range []string{ce.gws[0].ns, ce.gws[1].ns, ce.lab.NS.Client, ce.lab.NS.Agent} {
			setNetnsHosts(t, ns, hosts)
		}
		var directory string
		apiCert, directory = startPebble(t, ce.env)
		for i, g := range ce.gws {
			g.extra = []string{"--acme-domain", names[i], "--acme-directory", directory, "--acme-ca", apiCert, "--acme-http", ":80"}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for i, g := range ce.gws {
		if err := g.proc.WaitLog(ctx, "ACME certificate ready"); err != nil {
			t.Fatalf("gateway %d: %v", i+1, err)
		}
		info, ok, err := gateway.ReadInfoFile(g.state)
		if err != nil || !ok || info.Pin != "" || info.ACMEDomain != names[i] {
			t.Fatalf("gateway %d's info: %+v (%v), want no pin and ACME domain %s", i+1, info, err, names[i])
		}
		if v := ce.gatewayMetric(t, i, "nlvpn_gateway_cluster_connected"); v != "1" {
			t.Fatalf("gateway %d: cluster_connected %q, want 1", i+1, v)
		}
	}

	// What join compares is the pin, empty for both: a gateway whose
	// certificate is pinned (same gateway key and authority) would be a
	// redirect target no node of this network could verify, so it is
	// refused and told why.
	pinned := filepath.Join(ce.dir, "gw-pinned")
	if err := os.MkdirAll(pinned, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"gateway.key", gateway.AuthorityFile} {
		b, err := os.ReadFile(filepath.Join(ce.gws[0].state, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(pinned, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	odd := ce.start(t, ce.gws[0].ns, "gateway-pinned", "gateway", "--listen", fmt.Sprintf(":%d", gwPort+1),
		"--public-addr", fmt.Sprintf("%s:%d", ce.gws[0].addr, gwPort+1), "--state-dir", pinned,
		"--cluster", ce.urls, "--cluster-creds", ce.creds)
	if !odd.Wait(20 * time.Second) {
		t.Fatal("a gateway with a pinned certificate is still running in the cluster of ACME gateways")
	}
	if odd.ExitCode() == 0 || !strings.Contains(odd.Log(), "the cluster's gateways have an ACME certificate (no pin)") {
		t.Fatalf("the pinned gateway exited with %s, want a refusal that names ACME; log:\n%s", odd.ExitStatus(), odd.Log())
	}

	// Tokens from gateway 1's state name it by its name, with no pin.
	issue := func(args ...string) string {
		out, stderr, err := lab.Run(ctx, ce.gws[0].ns, append([]string{nlvpnBin, "token", "--state-dir", ce.gws[0].state}, args...)...)
		if err != nil {
			t.Fatalf("nlvpn token %v: %v\n%s", args, err, stderr)
		}
		return strings.TrimSpace(string(out))
	}
	clientTok := issue("--client", "alice", "--allow-agent", agentName, "--uses", "2")
	if tok, err := token.ParseToken(clientTok); err != nil {
		t.Fatal(err)
	} else if c := tok.Claims; c.Gateway != ce.gws[0].publicAddr() || len(c.Gateways) != 0 || c.Pin != "" {
		t.Fatalf("client token names gateway %q, others %v, pin %q; want %s alone, no pin", c.Gateway, c.Gateways, c.Pin, ce.gws[0].publicAddr())
	}
	agentTok := issue("--agent", agentName, "--gateway", ce.gws[1].publicAddr())
	agent := ce.start(t, ce.lab.NS.Agent, "agent", "agent", "--token-file", ce.tokenFile(agentTok),
		"--advertise", ce.lab.LANSubnet.String(), "--state-dir", ce.agentStateDir())
	waitRegistered(t, agent)
	if got := lastGateway(agent); got != ce.gws[1].publicAddr() {
		t.Fatalf("the agent registered with %q, want %s", got, ce.gws[1].publicAddr())
	}

	start := time.Now()
	client := ce.start(t, ce.lab.NS.Client, "client", "up", "--token-file", ce.tokenFile(clientTok), "--agent", agentName,
		"--state-dir", filepath.Join(ce.dir, "client"), "--tun", tunName, "--relay")
	ce.waitFor(t, readyTimeout, "the LAN host through gateway 2", func() error {
		if !client.Running() {
			return errStop(fmt.Errorf("client exited (%s)", client.ExitStatus()))
		}
		return ce.httpHealth()
	})
	t.Logf("tunnel up %v after the client started on gateway 1", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(client.Log(), "moving to the gateway the agent is on") || lastGateway(client) != ce.gws[1].publicAddr() {
		t.Fatalf("the client is on %q, want it sent to %s; log:\n%s", lastGateway(client), ce.gws[1].publicAddr(), client.Log())
	}
	relayed := func(i int) float64 {
		v, err := strconv.ParseFloat(ce.gatewayMetric(t, i, "nlvpn_relay_bytes_total"), 64)
		if err != nil {
			t.Fatalf("gateway %d's relayed bytes: %v", i+1, err)
		}
		return v
	}
	before := relayed(1)
	const size = 8 << 20
	if err := ce.download(t, size, 94); err != nil {
		t.Fatalf("download through gateway 2: %v", err)
	}
	if got := relayed(1) - before; got < size {
		t.Fatalf("gateway 2 relayed %.0f bytes during an %d-byte download, want it to carry the session", got, size)
	}
	if got := relayed(0); got != 0 {
		t.Fatalf("gateway 1 relayed %.0f bytes, want none (it only sends the client on)", got)
	}

	// The name is what is verified: gateway 2 dialed by its address, with
	// the same root trusted, is refused.
	byAddr := ce.start(t, ce.lab.NS.Client, "agents-by-address", "agents", "--json", "--token-file", ce.tokenFile(clientTok),
		"--gateway", fmt.Sprintf("%s:%d", ce.gws[1].addr, gwPort), "--state-dir", filepath.Join(ce.dir, "by-address"))
	if !byAddr.Wait(20 * time.Second) {
		t.Fatal("nlvpn agents against gateway 2's address is still running")
	}
	if byAddr.ExitCode() == 0 || !strings.Contains(byAddr.Log(), "certificate") {
		t.Fatalf("nlvpn agents against gateway 2 by address: %s, want a certificate refusal; log:\n%s", byAddr.ExitStatus(), byAddr.Log())
	}
}
