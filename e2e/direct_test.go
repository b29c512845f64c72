//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// metricsAddr is where the gateway serves its counters, inside its namespace.
const metricsAddr = "127.0.0.1:9433"

// status is the part of `nlvpn status --json` the tests read.
type status struct {
	Path    string  `json:"path"`
	Remote  string  `json:"remote"`
	RTT     float64 `json:"rtt_ms"`
	TxBytes uint64  `json:"tx_bytes"`
	RxBytes uint64  `json:"rx_bytes"`
	// Session is the session ID in hex; RelayUDP says the relay parts go
	// as UDP frames to the gateway's port.
	Session  string `json:"session"`
	RelayUDP bool   `json:"relay_udp"`
	// Transport is how the client reaches the gateway (udp, tcp, ...).
	Transport string `json:"transport"`
	// MTU is the tunnel's, UDPSize the client's path size (mtu_test.go).
	MTU     int `json:"mtu"`
	UDPSize int `json:"udp_size"`
}

func (e *env) clientStateDir() string { return filepath.Join(e.dir, "client") }

// status asks the running client for its state, as a script would.
func (e *env) status(t *testing.T) (status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// stdout only: a log line on stderr must not break the JSON.
	stdout, _, err := lab.Run(ctx, e.lab.NS.Client, nlvpnBin, "status", "--json", "--state-dir", e.clientStateDir())
	out := string(stdout)
	if err != nil {
		return status{}, err
	}
	var st status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return status{}, fmt.Errorf("status --json printed %q: %v", out, err)
	}
	return st, nil
}

// relayedBytes is the gateway's count of bytes relayed for all sessions.
func (e *env) relayedBytes(t *testing.T) uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stdout, _, err := lab.Run(ctx, e.lab.NS.GW, "curl", "-sS", "--noproxy", "*", "--max-time", "5", "http://"+metricsAddr+"/relay")
	out := string(stdout)
	if err != nil {
		t.Fatalf("gateway metrics: %v", err)
	}
	var rs struct {
		Bytes uint64 `json:"bytes"`
	}
	if err := json.Unmarshal([]byte(out), &rs); err != nil {
		t.Fatalf("gateway /relay printed %q: %v", out, err)
	}
	return rs.Bytes
}

// startClientMode starts `nlvpn up` with extra flags and waits for the LAN
// host to answer.
func (e *env) startClientMode(t *testing.T, flags ...string) *lab.Process {
	t.Helper()
	args := append(e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir()), flags...)
	c := e.start(t, e.lab.NS.Client, "client", args...)
	e.waitFor(t, readyTimeout, "the tunnel to come up", func() error {
		if !c.Running() {
			return errStop(fmt.Errorf("client exited with code %d", c.ExitCode()))
		}
		return e.httpHealth()
	})
	e.client = c
	return c
}

// waitPath waits until the client reports path want.
func (e *env) waitPath(t *testing.T, want string, timeout time.Duration) status {
	t.Helper()
	var st status
	e.waitFor(t, timeout, "path "+want, func() error {
		var err error
		if st, err = e.status(t); err != nil {
			return err
		}
		if st.Path != want {
			return fmt.Errorf("path is %q", st.Path)
		}
		return nil
	})
	return st
}

// upload posts size bytes of stream(seed) to the LAN host, which must
// report their length and sha256.
func (e *env) upload(t *testing.T, size int, seed uint64) error {
	in := filepath.Join(e.dir, fmt.Sprintf("ul-%d.bin", seed))
	if err := os.WriteFile(in, streamBytes(seed, size), 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(in)
	out, err := e.curl(60*time.Second, "--data-binary", "@"+in, "-H", "Content-Type: application/octet-stream",
		fmt.Sprintf("http://%s/upload", e.lab.LANHost))
	if err != nil {
		return fmt.Errorf("curl upload: %w", err)
	}
	if want := fmt.Sprintf("%d %s", size, streamSHA256(seed, int64(size))); strings.TrimSpace(out) != want {
		return fmt.Errorf("server saw %q, want %q", strings.TrimSpace(out), want)
	}
	return nil
}

// download fetches size bytes from the LAN host and checks them.
func (e *env) download(t *testing.T, size int64, seed uint64, extra ...string) error {
	out := filepath.Join(e.dir, fmt.Sprintf("dl-%d.bin", seed))
	defer os.Remove(out)
	args := append(extra, "-o", out, fmt.Sprintf("http://%s/data?size=%d&seed=%d", e.lab.LANHost, size, seed))
	if _, err := e.curl(120*time.Second, args...); err != nil {
		return fmt.Errorf("curl: %w", err)
	}
	if got, want := fileSHA256(t, out), streamSHA256(seed, size); got != want {
		return fmt.Errorf("sha256 %s, want %s", got, want)
	}
	return nil
}

// assertRelayQuiet checks that the relay carries nothing more while traffic
// flows on the direct path.
func (e *env) assertRelayQuiet(t *testing.T) {
	t.Helper()
	before := e.relayedBytes(t)
	if err := e.download(t, 4<<20, 77); err != nil {
		t.Fatal(err)
	}
	// Keepalives of the peer session ride the path in use, so nothing at
	// all should cross the relay; allow a few packets in flight at a switch.
	if after := e.relayedBytes(t); after-before > 4096 {
		t.Fatalf("relay carried %d bytes during a 4 MiB transfer on the direct path", after-before)
	}
}

func TestDirectConeConeUpgradeMidTransfer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	ctx := context.Background()
	// Hold the direct path shut so the transfer surely starts on the relay.
	if err := e.lab.BlockDirect(ctx); err != nil {
		t.Fatal(err)
	}
	e.startClientMode(t)
	if st := e.waitPath(t, "relay", 5*time.Second); st.Path != "relay" {
		t.Fatal(st)
	}
	done := make(chan error, 1)
	go func() { done <- e.download(t, 40<<20, 11, "--limit-rate", "4M") }()
	time.Sleep(2 * time.Second)
	relayedBefore := e.relayedBytes(t)
	if relayedBefore == 0 {
		t.Fatal("the transfer did not start on the relay")
	}
	if err := e.lab.UnblockDirect(ctx); err != nil {
		t.Fatal(err)
	}
	// Punching retries with backoff (1 s, 2 s, 4 s, ...).
	st := e.waitPath(t, "direct", 20*time.Second)
	if !strings.HasPrefix(st.Remote, e.lab.AgentPublic.String()+":") {
		t.Errorf("direct remote %q, want the agent NAT's address %s", st.Remote, e.lab.AgentPublic)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("transfer across the relay→direct switch: %v", err)
		}
	case <-time.After(150 * time.Second):
		t.Fatal("transfer did not finish")
	}
	e.assertRelayQuiet(t)
}

func TestDirectOnlyConeCone(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.startClientMode(t, "--direct")
	e.waitPath(t, "direct", 5*time.Second)
	if err := e.download(t, 8<<20, 12); err != nil {
		t.Fatal(err)
	}
	if n := e.relayedBytes(t); n != 0 {
		t.Fatalf("--direct: the relay carried %d bytes", n)
	}
}

func TestRelayOnlyConeCone(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	// Capture UDP between the two NATs' public addresses: probes would show.
	capture := filepath.Join(e.dir, "direct.pcap")
	td := e.capture(t, e.lab.NS.Inet, capture, fmt.Sprintf("udp and host %s and host %s", e.lab.ClientPublic, e.lab.AgentPublic))
	e.startClientMode(t, "--relay")
	if err := e.download(t, 8<<20, 13); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // a window in which probes would have gone out
	st, err := e.status(t)
	if err != nil || st.Path != "relay" {
		t.Fatalf("status %+v %v, want relay", st, err)
	}
	if n := e.relayedBytes(t); n < 8<<20 {
		t.Fatalf("relay carried %d bytes, want at least the 8 MiB transfer", n)
	}
	td.Stop()
	// tcpdump prints how many packets it captured when it stops.
	if log := td.Log(); !strings.Contains(log, "0 packets captured") {
		t.Fatalf("--relay: UDP went directly between the two sides:\n%s", log)
	}
}

func TestDirectPublicClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{ClientNAT: lab.None, AgentNAT: lab.Cone}, false)
	e.startClientMode(t)
	e.waitPath(t, "direct", 15*time.Second)
	e.assertRelayQuiet(t)
}

func TestSymmetricStaysOnRelay(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{ClientNAT: lab.Symmetric, AgentNAT: lab.Symmetric}, false)
	e.startClientMode(t)
	if err := e.download(t, 8<<20, 14); err != nil {
		t.Fatal(err)
	}
	// Give punching a full attempt; it must not claim a path it has not got.
	time.Sleep(punchAttempt)
	st, err := e.status(t)
	if err != nil || st.Path != "relay" {
		t.Fatalf("status %+v %v, want relay behind symmetric NATs", st, err)
	}
	// Both sides look hard: no wide round (punch/wide.go) is tried.
	if logs := e.client.Log() + e.agent.Log(); strings.Contains(logs, "wide round") || strings.Contains(logs, "needs more") {
		t.Fatal("a wide round between two symmetric NATs")
	}
	if err := e.httpHealth(); err != nil {
		t.Fatalf("tunnel on the relay stopped working: %v", err)
	}
}

// punchAttempt is one punching attempt (punch.AttemptDuration) and a margin.
const punchAttempt = 9 * time.Second

func TestSymmetricDirectOnlyFails(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{ClientNAT: lab.Symmetric, AgentNAT: lab.Symmetric}, false)
	c := e.start(t, e.lab.NS.Client, "client", append(e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir()), "--direct", "--direct-timeout", "5s")...)
	if !c.Wait(30 * time.Second) {
		t.Fatal("--direct behind symmetric NATs did not give up")
	}
	if c.ExitCode() == 0 {
		t.Fatal("--direct behind symmetric NATs exited 0")
	}
	if log := c.Log(); !strings.Contains(log, "no direct path") || !strings.Contains(log, "symmetric") {
		t.Fatalf("error does not say why:\n%s", log)
	}
	if n := e.relayedBytes(t); n != 0 {
		t.Fatalf("--direct: the relay carried %d bytes", n)
	}
	if lab.NamespaceExists(e.lab.NS.Client) {
		if out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "link", "show", tunName); err == nil {
			t.Fatalf("TUN device left after the failure: %s", out)
		}
	}
}

func TestDirectSameLAN(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{SameLAN: true, ClientNAT: lab.Cone}, false)
	e.startClientMode(t)
	st := e.waitPath(t, "direct", 15*time.Second)
	if !strings.HasPrefix(st.Remote, e.lab.AgentAddr.String()+":") {
		t.Fatalf("direct remote %q, want the agent's LAN address %s", st.Remote, e.lab.AgentAddr)
	}
	e.assertRelayQuiet(t)
}

func TestDirectFallsBackToRelay(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.startClientMode(t)
	e.waitPath(t, "direct", 15*time.Second)
	done := make(chan error, 1)
	go func() { done <- e.download(t, 40<<20, 15, "--limit-rate", "4M") }()
	time.Sleep(2 * time.Second)
	if err := e.lab.BlockDirect(context.Background()); err != nil {
		t.Fatal(err)
	}
	blocked := time.Now()
	e.waitPath(t, "relay", 15*time.Second)
	t.Logf("fell back to the relay %v after the direct path was blocked", time.Since(blocked).Round(100*time.Millisecond))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("transfer across the direct→relay fallback: %v", err)
		}
	case <-time.After(150 * time.Second):
		t.Fatal("transfer did not finish")
	}
	if e.relayedBytes(t) == 0 {
		t.Fatal("the relay carried nothing after the fallback")
	}
}
