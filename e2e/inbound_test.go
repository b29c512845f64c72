//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// The test here runs a compromised agent: the real one built with the
// nlvpn_misbehave tag (agent/misbehave.go), which, once a client is
// connected, sends TCP SYNs into the session toward a port on the client's
// overlay address, from its own overlay address and from an address in
// its advertised subnet: sources the client takes packets from. In TUN
// mode the client's inbound filter must refuse them; with --accept-inbound
// they reach the client's kernel, which answers them (the control that
// shows the test can fail).

// inboundPort is the port the client machine listens on.
const inboundPort = 7777

// startMisbehavingAgent replaces the env's agent by the misbehaving build
// in mode, on the same state, token and subnet, and waits until it has
// registered.
func (e *env) startMisbehavingAgent(t *testing.T, mode string, extraEnv ...string) {
	t.Helper()
	bin := misbehavingBinary(t)
	e.agent.Stop()
	p, err := e.lab.Start(e.lab.NS.Agent, lab.ProcConfig{Name: "agent-" + mode,
		Args: []string{bin, "agent", "--token-file", e.tokenFile(e.agentTok), "--gateway", e.gwAddr(),
			"--advertise", e.lab.LANSubnet.String(), "--state-dir", e.agentStateDir()},
		Env:     append(append(e.procEnv(), "NLVPN_MISBEHAVE="+mode), extraEnv...),
		LogPath: filepath.Join(e.dir, "agent-"+mode+".log")})
	if err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	e.agent = p
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := p.WaitLog(ctx, "registered"); err != nil {
		t.Fatalf("misbehaving agent: %v", err)
	}
}

// tcpSeen counts, in a capture, the SYNs that came to port, the SYN-ACKs
// that answered them and the resets that came back, and the SYNs' source
// addresses.
type tcpSeen struct {
	syn, synAck, rst int
	synFrom          map[string]int
}

var tcpdumpLine = regexp.MustCompile(`IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): Flags \[([^\]]*)\]`)

// readTCP reads pcap (it may still be written to: tcpdump -U) with tcpdump.
func readTCP(t *testing.T, pcap string, port int) tcpSeen {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "tcpdump", "-r", pcap, "-n").Output()
	if err != nil && len(out) == 0 {
		// An empty file in the making reads as an error too.
		return tcpSeen{synFrom: map[string]int{}}
	}
	seen := tcpSeen{synFrom: map[string]int{}}
	p := strconv.Itoa(port)
	for _, m := range tcpdumpLine.FindAllStringSubmatch(string(out), -1) {
		switch {
		case m[5] == "S" && m[4] == p:
			seen.syn++
			seen.synFrom[m[1]]++
		case m[5] == "S." && m[2] == p:
			seen.synAck++
		case strings.HasPrefix(m[5], "R") && m[4] == p:
			seen.rst++
		}
	}
	return seen
}

// nftRefused sums the packet counters of the client's inbound filter
// table, read with nft in the client's namespace.
func (e *env) nftRefused(t *testing.T) (uint64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := lab.Output(ctx, e.lab.NS.Client, "nft", "list", "table", "inet", "nlvpn-inbound-"+tunName)
	if err != nil {
		return 0, fmt.Errorf("nft list table: %v: %s", err, out)
	}
	var n uint64
	for _, m := range regexp.MustCompile(`counter packets (\d+)`).FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseUint(m[1], 10, 64)
		n += v
	}
	return n, nil
}

// inboundStatus is what the client's status says about packets from the
// agent: refused by the inbound filter, and dropped as not from the
// agent's addresses.
func (e *env) inboundStatus(t *testing.T) (refused, foreign uint64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stdout, _, err := lab.Run(ctx, e.lab.NS.Client, nlvpnBin, "status", "--json", "--state-dir", e.clientStateDir())
	if err != nil {
		t.Fatalf("client status: %v", err)
	}
	var st struct {
		InboundRefused uint64 `json:"inbound_refused"`
		DropsForeign   uint64 `json:"drops_foreign"`
	}
	if err := json.Unmarshal(stdout, &st); err != nil {
		t.Fatalf("client status --json printed %q: %v", stdout, err)
	}
	return st.InboundRefused, st.DropsForeign
}

// TestAgentCannotConnectIntoClient: an agent that sends TCP SYNs into the
// session, toward a port the client machine listens on, from its overlay
// address and from its advertised subnet, opens no connection: the TUN
// client's inbound filter drops them (nft counter, the client's status and
// its 10 s log report all count them), the listener accepts nothing and
// the client's kernel answers none. The same agent against a client with
// --accept-inbound gets SYN-ACKs back: what the filter stops does arrive.
func TestAgentCannotConnectIntoClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.startMisbehavingAgent(t, "agent-connect-client", "NLVPN_MISBEHAVE_PORT="+strconv.Itoa(inboundPort))

	// Something to connect to on the client machine, on every address.
	ln, err := lab.Listen(e.lab.NS.Client, "tcp4", net.JoinHostPort("0.0.0.0", strconv.Itoa(inboundPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			c.Close()
		}
	}()
	agentLANSrc := e.lab.LANSubnet.Masked().Addr().Next().String()

	// Shields up (the default).
	pcap := filepath.Join(e.dir, "inbound-refused.pcap")
	td := e.capture(t, e.lab.NS.Client, pcap, "tcp", "port", strconv.Itoa(inboundPort))
	e.client = e.startClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	err = e.client.WaitLog(ctx, "refused connections from the agent's side")
	cancel()
	if err != nil {
		t.Fatalf("the client did not report refused connections within 15 s: %v\n%s", err, e.client.Log())
	}
	var reported uint64
	if m := regexp.MustCompile(`refused connections from the agent's side.*packets=(\d+)`).FindStringSubmatch(e.client.Log()); m != nil {
		reported, _ = strconv.ParseUint(m[1], 10, 64)
	}
	nftN, err := e.nftRefused(t)
	if err != nil {
		t.Fatal(err)
	}
	refused, foreign := e.inboundStatus(t)
	e.client.Stop()
	td.Stop()
	shut := readTCP(t, pcap, inboundPort)
	t.Logf("without --accept-inbound: SYNs on the client's TUN %d (by source %v), SYN-ACKs %d, accepted %d; "+
		"refused: first log report %d, nft counter %d, status inbound_refused %d; drops_foreign %d",
		shut.syn, shut.synFrom, shut.synAck, accepted.Load(), reported, nftN, refused, foreign)
	if reported == 0 || nftN == 0 || refused == 0 {
		t.Errorf("refused packets: log report %d, nft counter %d, status %d; want all > 0", reported, nftN, refused)
	}
	if shut.syn == 0 {
		t.Errorf("no SYN from the agent reached the client's TUN: the test tests nothing")
	}
	if shut.synFrom[agentLANSrc] == 0 {
		t.Errorf("no SYN from the agent's subnet (%s) reached the client's TUN: %v", agentLANSrc, shut.synFrom)
	}
	if len(shut.synFrom) < 2 {
		t.Errorf("SYNs from %d sources, want the agent's overlay address and its subnet: %v", len(shut.synFrom), shut.synFrom)
	}
	if shut.synAck != 0 || accepted.Load() != 0 {
		t.Errorf("the client machine answered the agent's SYNs: %d SYN-ACKs, %d connections accepted", shut.synAck, accepted.Load())
	}
	if foreign != 0 {
		t.Errorf("drops_foreign %d: the client dropped the agent's packets before its filter, not by it", foreign)
	}

	// The control: with --accept-inbound the same SYNs are answered.
	e.upFlags = append(e.upFlags, "--accept-inbound")
	pcap2 := filepath.Join(e.dir, "inbound-accepted.pcap")
	td2 := e.capture(t, e.lab.NS.Client, pcap2, "tcp", "port", strconv.Itoa(inboundPort))
	e.client = e.startClient(t)
	if _, err := e.nftRefused(t); err == nil {
		t.Error("the inbound filter table exists with --accept-inbound")
	}
	var open tcpSeen
	err = e.poll(10*time.Second, func() error {
		if open = readTCP(t, pcap2, inboundPort); open.synAck < 5 || len(open.synFrom) < 2 {
			return errors.New("not yet")
		}
		return nil
	})
	td2.Stop()
	open = readTCP(t, pcap2, inboundPort)
	// The agent sends nothing after its SYNs: its netstack resets what
	// the client answers, so no connection completes (accepted stays 0).
	t.Logf("with --accept-inbound: SYNs on the client's TUN %d (by source %v), SYN-ACKs %d, resets back %d, accepted %d",
		open.syn, open.synFrom, open.synAck, open.rst, accepted.Load())
	if err != nil {
		t.Fatalf("with --accept-inbound the client machine answered %d of %d SYNs (from %v) within 10 s, want >= 5 from both sources",
			open.synAck, open.syn, open.synFrom)
	}
	if strings.Contains(e.client.Log(), "refused connections from the agent's side") {
		t.Errorf("the client with --accept-inbound reports refused connections:\n%s", e.client.Log())
	}
}
