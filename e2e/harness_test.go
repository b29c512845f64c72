//go:build linux

package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

const (
	gwPort    = 4433
	agentName = "miranda"
	tunName   = "nlvpn0"
	// readyTimeout bounds every wait for the tunnel to come (back) up.
	readyTimeout = 30 * time.Second
)

// env is one topology with the three nlvpn roles running on it.
type env struct {
	t   *testing.T
	lab *lab.Lab
	dir string

	gwState   string
	gwArgs    []string
	gateway   *lab.Process
	agent     *lab.Process
	client    *lab.Process
	agentTok  string
	clientTok string
	// upFlags are extra flags for every `nlvpn up` (e.g. --relay).
	upFlags []string
	// extraEnv is added to every nlvpn process's environment.
	extraEnv []string

	mu    sync.Mutex
	procs []*lab.Process // every process ever started, for failure logs
	seq   int
}

// newLab builds a topology that is torn down at test cleanup.
func newLab(t *testing.T, opts lab.Options) *lab.Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := lab.New(ctx, opts)
	if err != nil {
		t.Fatalf("building the namespace lab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("lab teardown: %v", err)
		}
		if left, _ := lab.ListNamespaces(l.Prefix); len(left) != 0 {
			t.Errorf("namespaces left after teardown: %v", left)
		}
	})
	t.Logf("lab %s: client NAT %v, agent NAT %v, same LAN %v", l.Prefix, opts.ClientNAT, opts.AgentNAT, opts.SameLAN)
	return l
}

// newEnv builds the topology, starts the LAN services, the gateway and the
// agent, and (if startClient) the client with upFlags, waiting until the
// tunnel works.
func newEnv(t *testing.T, opts lab.Options, startClient bool, upFlags ...string) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), upFlags: upFlags}
	e.lab = newLab(t, opts)
	// Registered after the lab's cleanup, so it runs before teardown.
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
	})
	startLANServers(t, e.lab)
	e.gwState = filepath.Join(e.dir, "gw")
	e.gwArgs = []string{"gateway", "--listen", fmt.Sprintf(":%d", gwPort),
		"--public-addr", e.gwAddr(), "--state-dir", e.gwState, "--metrics", metricsAddr}
	e.startGateway(t)
	e.agentTok = e.token(t, "--agent", agentName)
	// Tests start several clients with state (and keys) of their own on
	// this one token: it may enroll that many machines. One-machine tokens
	// are TestTokenEnrollsOneMachine's subject.
	e.clientTok = e.token(t, "--client", "alice", "--allow-agent", agentName, "--uses", "20")
	e.agent = e.start(t, e.lab.NS.Agent, "agent", "agent", "--token-file", e.tokenFile(e.agentTok), "--gateway", e.gwAddr(),
		"--advertise", e.lab.LANSubnet.String(), "--state-dir", e.agentStateDir())
	// The client refuses an agent that is not connected yet: wait (bounded)
	// for the agent to register. startClient retries anyway if the log line
	// changes.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	if err := e.agent.WaitLog(ctx, "registered"); err != nil && !e.agent.Running() {
		cancel()
		t.Fatalf("agent: %v", err)
	}
	cancel()
	if startClient {
		e.client = e.startClient(t)
	}
	return e
}

func (e *env) gwAddr() string { return e.lab.GatewayAddrPort(gwPort).String() }

// procEnv isolates the product from this machine's config and proxies.
func (e *env) procEnv() []string {
	home := filepath.Join(e.dir, "home")
	os.MkdirAll(home, 0o755)
	return append([]string{"HOME=" + home, "XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		"NLVPN_TOKEN=", "NLVPN_GATEWAY=", "http_proxy=", "https_proxy=", "HTTP_PROXY=", "HTTPS_PROXY=", "ALL_PROXY=", "all_proxy="}, e.extraEnv...)
}

// start runs `nlvpn args...` in ns as a long-running process.
func (e *env) start(t *testing.T, ns, name string, args ...string) *lab.Process {
	t.Helper()
	return e.startCmd(t, ns, name, append([]string{nlvpnBin}, args...)...)
}

// startCmd is start for any command line (e.g. nlvpn under nice).
func (e *env) startCmd(t *testing.T, ns, name string, argv ...string) *lab.Process {
	t.Helper()
	e.mu.Lock()
	e.seq++
	logPath := filepath.Join(e.dir, fmt.Sprintf("%02d-%s.log", e.seq, name))
	e.mu.Unlock()
	p, err := e.lab.Start(ns, lab.ProcConfig{Name: name, Args: argv, Env: e.procEnv(), LogPath: logPath})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	return p
}

func (e *env) dumpLogs() {
	e.mu.Lock()
	procs := append([]*lab.Process(nil), e.procs...)
	e.mu.Unlock()
	for _, p := range procs {
		e.t.Logf("===== log of %s (%s) =====\n%s", p, p.ExitStatus(), p.Log())
	}
}

// startGateway starts the gateway and waits until its UDP port is bound.
func (e *env) startGateway(t *testing.T) {
	t.Helper()
	e.gateway = e.start(t, e.lab.NS.GW, "gateway", e.gwArgs...)
	e.waitFor(t, 20*time.Second, "gateway listening on UDP :4433", func() error {
		if !e.gateway.Running() {
			return errStop(fmt.Errorf("gateway exited (%v)", e.gateway.Err()))
		}
		out, err := lab.Output(context.Background(), e.lab.NS.GW, "ss", "-Hlun", fmt.Sprintf("sport = :%d", gwPort))
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return errors.New("not yet bound")
		}
		return nil
	})
}

// capture starts tcpdump in ns, writing whole packets that match filter
// (tcpdump -s 0 syntax, then the filter words) to pcap, and waits until it
// listens. Stopping it makes it print how many packets it captured.
func (e *env) capture(t *testing.T, ns, pcap string, filter ...string) *lab.Process {
	t.Helper()
	td, err := e.lab.Start(ns, lab.ProcConfig{Name: "tcpdump", Args: append([]string{"tcpdump", "-i", "any", "-U", "-n", "-s", "0", "-w", pcap}, filter...)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := td.WaitLog(ctx, "listening on"); err != nil {
		t.Fatalf("tcpdump: %v\n%s", err, td.Log())
	}
	return td
}

// token runs `nlvpn token` against the gateway's state dir.
func (e *env) token(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	full := append([]string{nlvpnBin, "token", "--state-dir", e.gwState, "--gateway", e.gwAddr()}, args...)
	stdout, stderr, err := lab.Run(ctx, e.lab.NS.GW, full...)
	if err != nil {
		t.Fatalf("nlvpn token %v: %v\nstderr: %s", args, err, stderr)
	}
	tok := strings.TrimSpace(string(stdout))
	if tok == "" || strings.ContainsAny(tok, " \n\t") {
		t.Fatalf("nlvpn token %v: want the token alone on stdout, got %q", args, stdout)
	}
	return tok
}

// agentStateDir is the agent's state directory.
func (e *env) agentStateDir() string { return filepath.Join(e.dir, "agent") }

// restartAgent stops the agent and starts it again with args (its
// --advertise and other flags; token file, gateway and state come from
// the env), and waits until it has registered.
func (e *env) restartAgent(t *testing.T, args ...string) {
	t.Helper()
	e.agent.Stop() // safe if it has stopped already
	full := append([]string{"agent", "--token-file", e.tokenFile(e.agentTok), "--gateway", e.gwAddr(),
		"--state-dir", e.agentStateDir()}, args...)
	e.agent = e.start(t, e.lab.NS.Agent, "agent", full...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.agent.WaitLog(ctx, "registered"); err != nil {
		t.Fatalf("agent: %v", err)
	}
}

// clientArgs is the `nlvpn up` command line for the main client. The token
// goes in a 0600 file, as the README tells users to keep it.
func (e *env) clientArgs(tok, agent, tun, stateDir string) []string {
	args := []string{"up", "--token-file", e.tokenFile(tok), "--gateway", e.gwAddr(), "--agent", agent,
		"--state-dir", stateDir, "--tun", tun}
	return append(args, e.upFlags...)
}

// tokenFile writes tok to a new 0600 file in the test's directory.
func (e *env) tokenFile(tok string) string {
	e.mu.Lock()
	e.seq++
	path := filepath.Join(e.dir, fmt.Sprintf("token-%02d", e.seq))
	e.mu.Unlock()
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return path
}

// startClient starts `nlvpn up` in the client namespace and waits until
// the LAN host answers through the tunnel. If the client exits early (e.g.
// the agent has not registered yet) it is restarted, within the deadline.
func (e *env) startClient(t *testing.T) *lab.Process {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	var c *lab.Process
	for {
		// The relayed-tunnel suite tests the relay: --relay keeps the
		// traffic on it (the direct path has its own tests).
		c = e.start(t, e.lab.NS.Client, "client", append(e.clientArgs(e.clientTok, agentName, tunName, filepath.Join(e.dir, "client")), "--relay")...)
		err := e.poll(time.Until(deadline), func() error {
			if !c.Running() {
				return errStop(fmt.Errorf("client exited with code %d", c.ExitCode()))
			}
			return e.httpHealth()
		})
		if err == nil {
			t.Logf("tunnel up (client pid %d)", c.PID())
			return c
		}
		if c.Running() || time.Until(deadline) < time.Second {
			t.Fatalf("tunnel did not come up within %v: %v", readyTimeout, err)
		}
		t.Logf("client exited early (%v), retrying; log:\n%s", err, c.Log())
		time.Sleep(500 * time.Millisecond)
	}
}

// httpHealth fetches /health from the LAN host with curl in the client ns.
func (e *env) httpHealth() error {
	out, err := e.curl(5*time.Second, fmt.Sprintf("http://%s/health", e.lab.LANHost))
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) != "ok" {
		return fmt.Errorf("unexpected /health body %q", out)
	}
	return nil
}

// curl runs curl in the client namespace; it returns stdout.
func (e *env) curl(maxTime time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), maxTime+5*time.Second)
	defer cancel()
	full := append([]string{"curl", "-sS", "-f", "--noproxy", "*", "--max-time", fmt.Sprint(int(maxTime.Seconds()))}, args...)
	stdout, _, err := lab.Run(ctx, e.lab.NS.Client, full...)
	return string(stdout), err
}

type stopErr struct{ error }

// errStop makes poll give up at once.
func errStop(err error) error { return stopErr{err} }

// poll calls f every 200 ms until it returns nil, returns a stop error, or
// the timeout passes; it returns the last error.
func (e *env) poll(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		var se stopErr
		if errors.As(err, &se) {
			return se.error
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitFor is poll that fails the test.
func (e *env) waitFor(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	if err := e.poll(timeout, f); err != nil {
		t.Fatalf("waiting for %s (up to %v): %v", what, timeout, err)
	}
}
