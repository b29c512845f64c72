//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

var execLookPath = exec.LookPath

const (
	gwPort    = 4433
	agentName = "miranda"
	tunName   = "nlvpn0"
)

// runner holds one run's lab and the processes on it.
type runner struct {
	ctx   context.Context
	lab   *lab.Lab
	nlvpn string
	dir   string
	procs []*lab.Process

	gateway, agent, client *lab.Process
	clientTok              string
	clientTokArgs          []string // --token-file FILE (or --token TOKEN for old binaries)
	agentArgs              []string // the agent's command line (startAgent)
	routed                 bool     // agentArgs has --routed (setRouted)
	clientN                int

	profileDir     string // bench: where CPU profiles go ("" = none)
	profileLoss    bool   // bench: profile the 2% loss run instead
	profileStreams int    // bench: the streams of the run to profile (1 or 4)
	// profilePath and profileDown pick the run profiled.
	profilePath string
	profileDown bool
	only        []string // bench: the paths to measure (nil = all)
	rows        []string // bench: measure only rows whose name contains one of these (nil = all)
	tcpCC       string   // bench: the kernel TCP congestion control set in the namespaces ("" = the host's default)
	kernelCC    string   // the namespaces' kernel TCP congestion control, as read after build
	wgGo        string   // bench: the wireguard-go binary (baseline)

	res *benchResults // bench: what this run measured
}

// gwMetricsAddr is where the lab's gateway serves /metrics and /relay.
const gwMetricsAddr = "127.0.0.1:9433"

// pprofAddr is where every nlvpn process serves pprof when the bench takes
// profiles (loopback of its own namespace).
const pprofAddr = "127.0.0.1:6060"

func (r *runner) gwAddr() string { return r.lab.GatewayAddrPort(gwPort).String() }

func (r *runner) build() error {
	if err := r.lab.Build(r.ctx); err != nil {
		return fmt.Errorf("building the namespaces: %w", err)
	}
	// The kernel TCP senders' congestion control (every iperf3 sender but
	// the agent's netstack): a new namespace takes the host's default
	// (bbr on some machines, cubic on most), which decides the lossy rows.
	n := r.lab.NS
	for _, ns := range []string{n.Client, n.LAN, n.GW, n.Agent} {
		if r.tcpCC != "" {
			if _, err := lab.Output(r.ctx, ns, "sysctl", "-q", "-w", "net.ipv4.tcp_congestion_control="+r.tcpCC); err != nil {
				allowed, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
				return fmt.Errorf("--tcp-cc %s in %s: %w (a namespace may choose only what the host allows, net.ipv4.tcp_allowed_congestion_control: %s)",
					r.tcpCC, ns, err, strings.TrimSpace(string(allowed)))
			}
		}
	}
	out, err := lab.Output(r.ctx, n.LAN, "sysctl", "-n", "net.ipv4.tcp_congestion_control")
	if err != nil {
		return fmt.Errorf("reading the namespaces' TCP congestion control: %w", err)
	}
	r.kernelCC = strings.TrimSpace(out)
	return nil
}

func (r *runner) start(ns, name string, args ...string) (*lab.Process, error) {
	home := filepath.Join(r.dir, "home")
	os.MkdirAll(home, 0o755)
	p, err := r.lab.Start(ns, lab.ProcConfig{
		Name:    name,
		Args:    append([]string{r.nlvpn}, args...),
		Env:     r.env(home),
		LogPath: filepath.Join(r.dir, name+".log"),
	})
	if err != nil {
		return nil, err
	}
	r.procs = append(r.procs, p)
	return p, nil
}

func (r *runner) env(home string) []string {
	env := []string{"HOME=" + home, "XDG_CONFIG_HOME=" + filepath.Join(home, ".config"),
		// A proxy of the developer's shell is not in the lab: nodes
		// would take their TCP fallback through it (empty is unset).
		"HTTPS_PROXY=", "https_proxy=", "NO_PROXY=", "no_proxy="}
	if r.profileDir != "" {
		env = append(env, "NLVPN_PPROF="+pprofAddr)
	}
	return env
}

func (r *runner) dumpLogs() {
	for _, p := range r.procs {
		fmt.Fprintf(os.Stderr, "\n----- last lines of %s -----\n%s\n", p, tail(p.Log(), 25))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// poll calls f every 200 ms until it succeeds, the process p (if any)
// exits, the timeout passes or the run is interrupted.
func (r *runner) poll(timeout time.Duration, p *lab.Process, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if p != nil && !p.Running() {
			return fmt.Errorf("%s exited with code %d", p.Name, p.ExitCode())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("still failing after %v: %w", timeout, err)
		}
		select {
		case <-r.ctx.Done():
			return r.ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// udpBound reports whether something listens on UDP port in ns.
func (r *runner) listening(ns, proto string, port int) func() error {
	return func() error {
		flag := "-Hlun"
		if proto == "tcp" {
			flag = "-Hltn"
		}
		out, err := lab.Output(r.ctx, ns, "ss", flag, fmt.Sprintf("sport = :%d", port))
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("nothing listening on %s port %d", proto, port)
		}
		return nil
	}
}

// startStack starts gateway, agent and client and waits until the client
// routes the LAN into its TUN and check succeeds. verbose explains each step.
func (r *runner) startStack(verbose bool, check func() error, upFlags ...string) error {
	l := r.lab
	explain := func(format string, args ...any) {
		if verbose {
			say(format, args...)
		}
	}
	gwState := filepath.Join(r.dir, "gw")
	explain("Starting the gateway, the only public piece, in namespace %s (%s):\n    nlvpn gateway --listen :%d --public-addr %s --state-dir %s",
		l.NS.GW, l.Gateway, gwPort, r.gwAddr(), gwState)
	var err error
	gwArgs := []string{"gateway", "--listen", fmt.Sprintf(":%d", gwPort), "--public-addr", r.gwAddr(), "--state-dir", gwState}
	if r.supports("gateway", "--metrics") {
		// The relay's counters, for the bench's drop table (loopback of
		// the gateway's own namespace).
		gwArgs = append(gwArgs, "--metrics", gwMetricsAddr)
	}
	r.gateway, err = r.start(l.NS.GW, "gateway", gwArgs...)
	if err != nil {
		return err
	}
	if err := r.poll(20*time.Second, r.gateway, r.listening(l.NS.GW, "udp", gwPort)); err != nil {
		return fmt.Errorf("gateway did not start listening: %w", err)
	}
	if verbose {
		fmt.Println(indent(tail(r.gateway.Log(), 5)))
	}

	token := func(args ...string) (string, error) {
		full := append([]string{r.nlvpn, "token", "--state-dir", gwState, "--gateway", r.gwAddr()}, args...)
		out, stderr, err := lab.Run(r.ctx, l.NS.GW, full...)
		if err != nil {
			return "", fmt.Errorf("nlvpn token: %w (%s)", err, strings.TrimSpace(string(stderr)))
		}
		return strings.TrimSpace(string(out)), nil
	}
	explain("Issuing two tokens from the gateway's state: one for the agent %q, one for the client \"alice\":\n    nlvpn token --state-dir %s --agent %s -o %s.token\n    nlvpn token --state-dir %s --client alice --allow-agent %s -o alice.token",
		agentName, gwState, agentName, agentName, gwState, agentName)
	agentTok, err := token("--agent", agentName)
	if err != nil {
		return err
	}
	// The bench starts TUN and netstack clients with state (and keys) of
	// their own on this one token.
	clientArgs := []string{"--client", "alice", "--allow-agent", agentName}
	if r.supports("token", "--uses") {
		clientArgs = append(clientArgs, "--uses", "4")
	}
	clientTok, err := token(clientArgs...)
	if err != nil {
		return err
	}
	if verbose {
		fmt.Printf("    agent token:  %s\n    client token: %s\n", short(agentTok), short(clientTok))
		fmt.Println("    (a token is all a new machine needs: it names the role, carries the gateway's address and certificate pin, and is signed)")
	}

	explain("Starting the agent %q in namespace %s, behind a %v NAT. It dials OUT to the gateway (no open port)\n    and offers the LAN %s, which only it can reach:\n    nlvpn agent --token-file %s.token --gateway %s --advertise %s",
		agentName, l.NS.Agent, l.Opts.AgentNAT, l.LANSubnet, agentName, r.gwAddr(), l.LANSubnet)
	agentArgs, err := r.tokenArgs(agentTok, agentName+".token")
	if err != nil {
		return err
	}
	r.agentArgs = append(append([]string{"agent"}, agentArgs...), "--gateway", r.gwAddr(),
		"--advertise", l.LANSubnet.String(), "--state-dir", filepath.Join(r.dir, "agent"))
	r.setRouted(r.routed)
	if err := r.startAgent(); err != nil {
		return err
	}

	explain("Starting the client in namespace %s, behind a %v NAT. It dials out to the gateway too,\n    creates the TUN device %s and routes %s into it:\n    nlvpn up --token-file alice.token --gateway %s --agent %s",
		l.NS.Client, l.Opts.ClientNAT, tunName, l.LANSubnet, r.gwAddr(), agentName)
	r.clientTok = clientTok
	if r.clientTokArgs, err = r.tokenArgs(clientTok, "alice.token"); err != nil {
		return err
	}
	return r.startClient(verbose, check, upFlags...)
}

// setRouted makes the agent's command line (the next startAgent, and
// startStack's) carry --routed or not.
func (r *runner) setRouted(on bool) {
	r.routed = on
	r.agentArgs = slices.DeleteFunc(r.agentArgs, func(a string) bool { return a == "--routed" })
	if on {
		r.agentArgs = append(r.agentArgs, "--routed")
	}
}

// startAgent starts (or restarts) the agent with r.agentArgs and gives it
// a moment to register, so the client finds it on its first try (the
// client refuses an agent that is not connected).
func (r *runner) startAgent() error {
	if r.agent != nil {
		r.agent.Stop()
	}
	var err error
	if r.agent, err = r.start(r.lab.NS.Agent, "agent", r.agentArgs...); err != nil {
		return err
	}
	wctx, wcancel := context.WithTimeout(r.ctx, 20*time.Second)
	defer wcancel()
	if err := r.agent.WaitLog(wctx, "registered"); err != nil && !r.agent.Running() {
		return fmt.Errorf("the agent exited: %w", err)
	}
	return nil
}

// startClient starts `nlvpn up` (with upFlags) and waits until check
// passes. A client that exits early (e.g. the agent is not registered yet)
// is restarted, within 40 s.
func (r *runner) startClient(verbose bool, check func() error, upFlags ...string) error {
	l := r.lab
	deadline := time.Now().Add(40 * time.Second)
	for attempt := 1; ; attempt++ {
		r.clientN++
		args := append(append(append([]string{"up"}, r.clientTokArgs...), "--gateway", r.gwAddr(),
			"--agent", agentName, "--state-dir", filepath.Join(r.dir, "client"), "--tun", tunName), upFlags...)
		var err error
		r.client, err = r.start(l.NS.Client, fmt.Sprintf("client-%d", r.clientN), args...)
		if err != nil {
			return err
		}
		err = r.poll(time.Until(deadline), r.client, check)
		if err == nil {
			return nil
		}
		if r.client.Running() || r.ctx.Err() != nil || time.Until(deadline) < time.Second {
			return fmt.Errorf("the tunnel did not come up: %w", err)
		}
		// The client gave up early, e.g. the agent was not registered yet.
		if verbose {
			fmt.Printf("    (client exited early: %s; trying again)\n", strings.TrimSpace(tail(r.client.Log(), 1)))
		}
		if !r.agent.Running() {
			return errors.New("the agent exited")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// supports reports whether `nlvpn <cmd> --help` mentions flag.
// tokenArgs writes tok into a 0600 file named name in the run's directory
// and returns the flags that give it to nlvpn: --token-file, as the README
// says, or --token for a binary from before --token-file.
func (r *runner) tokenArgs(tok, name string) ([]string, error) {
	if !r.supports("up", "--token-file") {
		return []string{"--token", tok}, nil
	}
	path := filepath.Join(r.dir, name)
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
		return nil, err
	}
	return []string{"--token-file", path}, nil
}

func (r *runner) supports(cmd, flag string) bool {
	out, _ := exec.Command(r.nlvpn, cmd, "--help").CombinedOutput()
	return strings.Contains(string(out), flag)
}

func short(tok string) string {
	if len(tok) <= 40 {
		return tok
	}
	return tok[:20] + "…" + tok[len(tok)-12:] + fmt.Sprintf(" (%d chars)", len(tok))
}
