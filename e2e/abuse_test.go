//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/wire"
)

const (
	// floodTun is the flooding client's TUN device. It owns the routes to
	// the LAN, so every program in the client namespace sends through the
	// flooder; the honest client runs a netstack behind its SOCKS5 proxy.
	floodTun = "nvflood"
	// floodMin is how long the flood lasts at least; it goes on while the
	// flooded download runs, up to floodMax (the flooder's own bound).
	floodMin = 10 * time.Second
	floodMax = 45 * time.Second
	// abuseDownload is the honest client's transfer, unloaded and flooded.
	abuseDownload = 20 << 20
	// agentRSSBound is the agent's memory under the flood. The issue's
	// measurement before the bounds: +390 MiB for 3,000 UDP datagrams.
	agentRSSBound = 200 << 20
	// idleCPUBound is the CPU a process may use in idleWindow once the
	// flood is over: a spinning goroutine would use all of it.
	idleCPUBound = 300 * time.Millisecond
	idleWindow   = 2 * time.Second
	// attackerNice is the CPU priority of mallory's processes. They stand
	// for other machines: on this shared one they take the CPU the nodes
	// under test leave, so that the figures measure the agent and the
	// relay rather than this machine's scheduler.
	attackerNice = "19"
)

// blackhole is an address in the advertised subnet that nobody answers:
// the agent has a neighbour entry for it, so its SYNs leave, to a MAC
// address no host has, and its dials wait for their timeout.
var blackhole = netip.MustParseAddr("192.168.77.99")

// TestAbuseFloodingClient: while alice downloads 20 MB through the agent,
// mallory (a second client, her own credential) floods the same agent for
// 10 s or more: more TCP connections than her bound, then new UDP
// 5-tuples to the LAN host as fast as she can send them, SYNs to a
// blackholed address, connects with fresh keys, garbage datagrams at the
// gateway's and the agent's ports and garbage packets through her tunnel.
// Alice's download completes intact (its speed unloaded and flooded is
// printed, not asserted: the machine is shared); the agent's RSS stays
// under agentRSSBound; its status shows mallory's bounds hit and counted,
// on her sessions, none on alice's; mallory never holds more than her
// bounds; afterwards she holds nothing and agent and gateway are back to
// idle CPU.
//
// Not parallel: the flood takes every CPU it can get, which would starve
// other tests and disturb this one's figures.
func TestAbuseFloodingClient(t *testing.T) {
	// The agent has a public address (no NAT in front of it), so garbage
	// from anyone reaches its port: the worst case for it. Behind a NAT,
	// strangers' datagrams would stop at the NAT's firewall.
	e := newEnv(t, lab.Options{ClientNAT: lab.Cone, AgentNAT: lab.None}, false)
	ctx := context.Background()
	if _, err := lab.Output(ctx, e.lab.NS.Agent, "ip", "neigh", "replace", blackhole.String(),
		"lladdr", "02:00:5e:00:53:99", "dev", "lan0", "nud", "permanent"); err != nil {
		t.Fatal(err)
	}
	agentPort := e.agentObservedPort(t)

	// alice: the env's client token, netstack mode behind SOCKS5.
	aliceDir := filepath.Join(e.dir, "alice")
	alice := e.start(t, e.lab.NS.Client, "alice", "up", "--netstack", "--socks5", socksAddr, "--http-proxy", "",
		"--token-file", e.tokenFile(e.clientTok), "--gateway", e.gwAddr(), "--agent", agentName,
		"--state-dir", aliceDir, "--relay")
	e.waitFor(t, readyTimeout, "alice's tunnel", func() error {
		if !alice.Running() {
			return errStop(fmt.Errorf("alice's client exited: %s", alice.ExitStatus()))
		}
		_, err := e.socksDownload(1024, 1, 5*time.Second)
		return err
	})

	// mallory: her own credential, enough uses for her fresh keys.
	const reconnects = 10
	malloryTok := e.tokenFile(e.token(t, "--client", "mallory", "--allow-agent", agentName, "--uses", strconv.Itoa(reconnects+2)))
	malloryDir := filepath.Join(e.dir, "mallory")
	mallory := e.startCmd(t, e.lab.NS.Client, "mallory", "nice", "-n", attackerNice, nlvpnBin, "up", "--tun", floodTun,
		"--token-file", malloryTok, "--gateway", e.gwAddr(), "--agent", agentName, "--state-dir", malloryDir, "--relay")
	e.waitFor(t, readyTimeout, "mallory's tunnel", func() error {
		if !mallory.Running() {
			return errStop(fmt.Errorf("mallory's client exited: %s", mallory.ExitStatus()))
		}
		return e.httpHealth() // curl in the client namespace: through her TUN
	})
	mst, err := clientStatusAt(e.lab.NS.Client, malloryDir)
	if err != nil {
		t.Fatal(err)
	}
	malloryID, err := strconv.ParseUint(mst.Session, 16, 64)
	if err != nil {
		t.Fatalf("mallory's session %q: %v", mst.Session, err)
	}

	unloaded, err := e.socksDownload(abuseDownload, 91, 120*time.Second)
	if err != nil {
		t.Fatalf("unloaded download: %v", err)
	}
	t.Logf("unloaded: %d MB in %v, %.1f MB/s", abuseDownload>>20, unloaded.Round(time.Millisecond), mbps(unloaded))
	before := e.agentStatus(t)
	relayBefore := e.relayStats(t)

	// Watch the agent's memory and status for the whole flood.
	watch := e.watchAgent(t)
	spec := floodSpec{
		Max:          floodMax,
		HoldTCP:      netip.AddrPortFrom(e.lab.LANHost, tcpEchoPort),
		HoldTCPCount: 600,
		HoldFor:      3 * time.Second,
		UDPTo:        e.lab.LANHost,
		UDPCount:     5_000_000,
		SYNTo:        blackhole,
		SYNCount:     100_000,
		Garbage:      []netip.AddrPort{e.lab.GatewayAddrPort(gwPort), netip.AddrPortFrom(e.lab.AgentPublic, agentPort)},
		Session:      malloryID,
		GarbageCount: 200_000,
		RawTo:        e.lab.LANHost,
		RawCount:     50_000,
	}
	procs := []*lab.Process{e.agent, e.gateway, alice, mallory}
	cpu0 := cpuOf(t, procs)
	floodStart := time.Now()
	flooder := e.startFlooder(t, spec)
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = flooder.WaitLog(fctx, "flooding")
	cancel()
	if err != nil {
		t.Fatalf("flooder: %v\n%s", err, flooder.Log())
	}
	rssHeld, _ := procRSS(e.agent.PID())
	var fresh freshStats
	freshDone := make(chan struct{})
	go func() {
		defer close(freshDone)
		e.freshConnects(flooder, malloryTok, reconnects, &fresh)
	}()

	// Let the flood reach the bounds, then download under it.
	time.Sleep(2 * time.Second)
	dlBefore, dlStart := e.agentStatus(t), time.Now()
	flooded, dlErr := e.socksDownload(abuseDownload, 92, 150*time.Second)
	dlAfter, dlTook := e.agentStatus(t), time.Since(dlStart)
	if rest := floodMin - time.Since(floodStart); rest > 0 {
		time.Sleep(rest)
	}
	flooder.Signal(syscall.SIGTERM)
	if !flooder.Wait(10 * time.Second) {
		t.Fatalf("the flooder did not stop 10 s after SIGTERM")
	}
	if flooder.ExitCode() != 0 {
		t.Errorf("the flooder failed (%s):\n%s", flooder.ExitStatus(), flooder.Log())
	}
	floodTook := time.Since(floodStart)
	<-freshDone
	cpu1 := cpuOf(t, procs)
	w := watch()
	counts, err := flooderCounts(flooder)
	if err != nil {
		t.Fatal(err)
	}
	after := e.agentStatus(t)
	relayAfter := e.relayStats(t)

	t.Logf("flood for %v: %d TCP connections held (%d refused), %d UDP datagrams (%.0f/s), %d SYNs, %d garbage datagrams, %d garbage packets; %d of %d fresh-key connects",
		floodTook.Round(100*time.Millisecond), counts.TCPHeld, counts.TCPRefused, counts.UDP, float64(counts.UDP)/floodTook.Seconds(),
		counts.SYN, counts.Garbage, counts.Raw, fresh.ok.Load(), fresh.ok.Load()+fresh.failed.Load())
	for _, msg := range fresh.errs {
		t.Log(msg)
	}
	if dlErr != nil {
		t.Fatalf("alice's download under the flood: %v", dlErr)
	}
	t.Logf("flooded: %d MB in %v, %.1f MB/s; flooded/unloaded = %.2f", abuseDownload>>20, flooded.Round(time.Millisecond),
		mbps(flooded), mbps(flooded)/mbps(unloaded))
	t.Logf("during the flooded download, agent limited: %v, drops: %v", perSecond(dlBefore.Limited, dlAfter.Limited, dlTook),
		perSecond(dlBefore.Drops, dlAfter.Drops, dlTook))
	t.Logf("agent during the flood: max RSS %.1f MiB (bound %d MiB; %.1f MiB before, %.1f MiB holding mallory's TCP connections), max %d fds; gateway max RSS %.1f MiB",
		float64(w.maxRSS)/(1<<20), agentRSSBound>>20, float64(w.rss0)/(1<<20), float64(rssHeld)/(1<<20), w.maxFDs, float64(w.gwMaxRSS)/(1<<20))
	t.Logf("CPU during the flood (%d CPUs, %v): agent %v, gateway %v, alice %v, mallory's client %v and flooder %v (nice %s), this test process (LAN servers) %v",
		runtime.NumCPU(), floodTook.Round(100*time.Millisecond), cpu1[0]-cpu0[0], cpu1[1]-cpu0[1], cpu1[2]-cpu0[2], cpu1[3]-cpu0[3],
		counts.CPU.Round(10*time.Millisecond), attackerNice, (cpu1[4] - cpu0[4]).Round(10*time.Millisecond))
	t.Logf("agent limited: %v", diffCounts(before.Limited, after.Limited))
	t.Logf("agent drops: %v", diffCounts(before.Drops, after.Drops))
	t.Logf("agent denied: %v; netstack TCP retransmits +%d, timeouts +%d", diffCounts(before.Denied, after.Denied),
		after.TCPRetransmits-before.TCPRetransmits, after.TCPTimeouts-before.TCPTimeouts)
	t.Logf("relay: drop_unknown_session +%d, drop_not_endpoint +%d", relayAfter.DropUnknown-relayBefore.DropUnknown,
		relayAfter.DropNotEndpoint-relayBefore.DropNotEndpoint)
	for _, name := range []string{"alice", "mallory"} {
		if c := w.clients[name]; c != nil {
			t.Logf("agent status for %s: max held %v, max limited %v (%d status samples)", name, c.held, c.limited, w.samples)
		}
	}
	for _, s := range after.Sessions {
		if s.Client == "alice" {
			t.Logf("agent's session with alice: quic lost %d of %d sent", s.QUICPacketsLost, s.QUICPacketsSent)
		}
	}
	if ast, err := clientStatusAt(e.lab.NS.Client, aliceDir); err == nil {
		t.Logf("alice's client: quic lost %d of %d, drops %v", ast.QUICPacketsLost, ast.QUICPacketsSent, nonZero(ast.Drops))
	}

	if w.maxRSS >= agentRSSBound {
		t.Errorf("the agent's RSS reached %.1f MiB under the flood, bound %d MiB", float64(w.maxRSS)/(1<<20), agentRSSBound>>20)
	}
	if w.err != nil {
		t.Errorf("watching the agent: %v", w.err)
	}
	if !e.agent.Running() || !e.gateway.Running() || !alice.Running() {
		t.Fatalf("after the flood: agent running %v, gateway running %v, alice running %v",
			e.agent.Running(), e.gateway.Running(), alice.Running())
	}
	// Each of mallory's bounds was hit and counted (while she holds 512
	// TCP flows her SYNs are refused as flows, then as dials), on her
	// sessions, never on alice's.
	resources := []string{"udp_flows", "tcp_flows", "dials"}
	for _, k := range resources {
		if after.Limited[k] <= before.Limited[k] {
			t.Errorf("the agent's limited[%s] did not grow under the flood: %v", k, after.Limited)
		}
	}
	m, a := w.clients["mallory"], w.clients["alice"]
	if m == nil {
		t.Fatalf("no agent status sample showed a session of mallory's")
	}
	for _, k := range resources {
		if m.limited[k] == 0 {
			t.Errorf("mallory's sessions never showed limited %s > 0: %v", k, m.limited)
		}
	}
	// What she held stayed within the agent's defaults (per client; each
	// of her fresh keys is a client of its own, far below them).
	for k, bound := range map[string]int{"udp_flows": 256, "dials": 64, "tcp_flows": 512} {
		if m.held[k] > bound {
			t.Errorf("mallory held %d %s, more than the bound %d", m.held[k], k, bound)
		}
	}
	if a != nil && len(a.limited) != 0 {
		t.Errorf("alice's session shows refusals: %v (mallory's flood was counted against her)", a.limited)
	}

	// Afterwards: mallory's flows and dials are given back (UDP flows end
	// 10 s after their only datagram, dials at their 10 s timeout), and
	// agent and gateway are idle.
	var cpuA, cpuG time.Duration
	drained := time.Now()
	e.waitFor(t, 40*time.Second, "every flow given back and agent and gateway idle", func() error {
		st := e.agentStatus(t)
		for _, s := range st.Sessions {
			for k, n := range s.Flows {
				if n > 0 {
					return fmt.Errorf("%s's session %s still holds %d %s", s.Client, s.Session, n, k)
				}
			}
		}
		a0, g0 := procCPU(t, e.agent.PID()), procCPU(t, e.gateway.PID())
		time.Sleep(idleWindow)
		cpuA, cpuG = procCPU(t, e.agent.PID())-a0, procCPU(t, e.gateway.PID())-g0
		if cpuA > idleCPUBound || cpuG > idleCPUBound {
			return fmt.Errorf("CPU in %v: agent %v, gateway %v (bound %v)", idleWindow, cpuA, cpuG, idleCPUBound)
		}
		return nil
	})
	t.Logf("idle %v after the flood: CPU in %v: agent %v, gateway %v (bound %v each)",
		time.Since(drained).Round(100*time.Millisecond), idleWindow, cpuA, cpuG, idleCPUBound)
	if _, err := e.socksDownload(1<<20, 93, 30*time.Second); err != nil {
		t.Fatalf("alice's tunnel after the flood: %v", err)
	}
}

func mbps(d time.Duration) float64 { return float64(abuseDownload) / (1 << 20) / d.Seconds() }

// socksDownload fetches size bytes of stream(seed) from the LAN host
// through alice's SOCKS5 proxy, checks them and returns how long curl
// took for the transfer.
func (e *env) socksDownload(size int64, seed uint64, maxTime time.Duration) (time.Duration, error) {
	out := filepath.Join(e.dir, fmt.Sprintf("socks-%d.bin", seed))
	defer os.Remove(out)
	url := fmt.Sprintf("http://%s/data?size=%d&seed=%d", e.lab.LANHost, size, seed)
	r := runIn(e.lab.NS.Client, maxTime+10*time.Second, nil, nil, "env", "-u", "NO_PROXY", "-u", "no_proxy", "-u", "ALL_PROXY", "-u", "all_proxy",
		"curl", "-sS", "-f", "--max-time", fmt.Sprint(int(maxTime.Seconds())), "--socks5", socksAddr,
		"-w", "%{time_total}", "-o", out, url)
	if r.err != nil {
		return 0, fmt.Errorf("curl: %v: %s", r.err, strings.TrimSpace(r.stderr))
	}
	secs, err := strconv.ParseFloat(strings.TrimSpace(r.stdout), 64)
	if err != nil {
		return 0, fmt.Errorf("curl's time_total %q: %v", r.stdout, err)
	}
	if got, want := fileSHA256(e.t, out), streamSHA256(seed, size); got != want {
		return 0, fmt.Errorf("sha256 %s, want %s", got, want)
	}
	return time.Duration(secs * float64(time.Second)), nil
}

// agentObservedPort is the agent's UDP port as the gateway sees it (from
// the agent's "registered" log line).
func (e *env) agentObservedPort(t *testing.T) uint16 {
	t.Helper()
	for _, line := range strings.Split(e.agent.Log(), "\n") {
		if !strings.Contains(line, "registered with gateway") {
			continue
		}
		_, v, ok := strings.Cut(line, "observed=")
		if !ok {
			continue
		}
		ap, err := netip.ParseAddrPort(strings.Fields(v)[0])
		if err == nil {
			return ap.Port()
		}
	}
	t.Fatalf("no observed address in the agent's log:\n%s", e.agent.Log())
	return 0
}

// freshStats counts the fresh-key connects and keeps why they failed
// (logged by the test: the connects may outlive a failed test).
type freshStats struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
}

// freshConnects runs `nlvpn connect` to the LAN host's TCP echo, each
// time with a new state directory (a new key enrolled with mallory's
// token), one after the other, up to count times or until the flooder
// has stopped.
func (e *env) freshConnects(flooder *lab.Process, tokFile string, count int, st *freshStats) {
	for i := range count {
		if !flooder.Running() {
			return
		}
		r := runIn(e.lab.NS.Client, 20*time.Second, e.procEnv(), nil, "nice", "-n", attackerNice, nlvpnBin, "connect", "-n", agentName, "--relay",
			"--token-file", tokFile, "--gateway", e.gwAddr(), "--state-dir", filepath.Join(e.dir, fmt.Sprintf("mallory-key%d", i)),
			netip.AddrPortFrom(e.lab.LANHost, tcpEchoPort).String())
		if r.code == 0 {
			st.ok.Add(1)
		} else {
			st.failed.Add(1)
			st.mu.Lock()
			st.errs = append(st.errs, fmt.Sprintf("fresh-key connect %d: exit %d after %v: %s", i, r.code, r.took.Round(time.Millisecond), lastLines(r.stderr, 2)))
			st.mu.Unlock()
		}
	}
}

// abuseAgentStatus is the part of the agent's `nlvpn status --json` read here.
type abuseAgentStatus struct {
	Sessions []struct {
		Client          string            `json:"client"`
		Session         string            `json:"session"`
		QUICPacketsSent uint64            `json:"quic_packets_sent"`
		QUICPacketsLost uint64            `json:"quic_packets_lost"`
		Flows           map[string]int    `json:"flows"`
		Limited         map[string]uint64 `json:"limited"`
	} `json:"sessions"`
	Drops   map[string]uint64 `json:"drops"`
	Denied  map[string]uint64 `json:"denied"`
	Limited map[string]uint64 `json:"limited"`
	Egress  string            `json:"egress"`
	// The netstack's loss recovery, all clients.
	TCPRetransmits uint64 `json:"tcp_retransmits"`
	TCPTimeouts    uint64 `json:"tcp_timeouts"`
}

func (e *env) agentStatus(t *testing.T) abuseAgentStatus {
	t.Helper()
	st, err := e.agentStatusErr()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (e *env) agentStatusErr() (abuseAgentStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st abuseAgentStatus
	stdout, _, err := lab.Run(ctx, e.lab.NS.Agent, nlvpnBin, "status", "--json", "--state-dir", e.agentStateDir())
	if err != nil {
		return st, fmt.Errorf("agent status: %w", err)
	}
	if err := json.Unmarshal(stdout, &st); err != nil {
		return st, fmt.Errorf("agent status --json printed %q: %v", stdout, err)
	}
	return st, nil
}

// abuseClientStatus is the part of a client's `nlvpn status --json` read here.
type abuseClientStatus struct {
	Session         string            `json:"session"`
	QUICPacketsSent uint64            `json:"quic_packets_sent"`
	QUICPacketsLost uint64            `json:"quic_packets_lost"`
	Drops           map[string]uint64 `json:"drops"`
}

func clientStatusAt(ns, stateDir string) (abuseClientStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st abuseClientStatus
	stdout, _, err := lab.Run(ctx, ns, nlvpnBin, "status", "--json", "--state-dir", stateDir)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(stdout, &st); err != nil {
		return st, fmt.Errorf("status --json printed %q: %v", stdout, err)
	}
	return st, nil
}

// clientWatch is the most one client name was seen to hold and to have
// refused, per resource, over all its sessions.
type clientWatch struct {
	held    map[string]int
	limited map[string]uint64
}

type agentWatch struct {
	rss0, maxRSS, gwMaxRSS int64
	maxFDs                 int
	samples                int
	clients                map[string]*clientWatch
	err                    error
}

// watchAgent samples the agent's RSS and open files every 100 ms and its
// status every 500 ms (a client's per-session counts exist only while it
// holds something) until the returned function is called, which returns
// what was seen.
func (e *env) watchAgent(t *testing.T) func() agentWatch {
	t.Helper()
	pid, gwPID := e.agent.PID(), e.gateway.PID()
	w := agentWatch{clients: map[string]*clientWatch{}}
	var err error
	if w.rss0, err = procRSS(pid); err != nil {
		t.Fatal(err)
	}
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			if rss, err := procRSS(pid); err != nil {
				w.err = err
			} else {
				w.maxRSS = max(w.maxRSS, rss)
			}
			if rss, err := procRSS(gwPID); err == nil {
				w.gwMaxRSS = max(w.gwMaxRSS, rss)
			}
			if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
				w.maxFDs = max(w.maxFDs, len(fds))
			}
			if i%5 == 0 {
				if st, err := e.agentStatusErr(); err == nil {
					w.samples++
					for _, s := range st.Sessions {
						c := w.clients[s.Client]
						if c == nil {
							c = &clientWatch{held: map[string]int{}, limited: map[string]uint64{}}
							w.clients[s.Client] = c
						}
						for k, n := range s.Flows {
							c.held[k] = max(c.held[k], n)
						}
						for k, n := range s.Limited {
							if n > 0 {
								c.limited[k] = max(c.limited[k], n)
							}
						}
					}
				}
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	end := func() agentWatch {
		once.Do(func() { close(stop) })
		<-done
		return w
	}
	t.Cleanup(func() { end() }) // should the test end before it calls end
	return end
}

// procRSS returns VmRSS of process pid, in bytes.
func procRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS in kB", pid)
}

// procCPU returns the user+system CPU time process pid has used, from
// /proc/PID/stat (fields 14 and 15, in USER_HZ = 100 ticks per second on
// Linux, counted after the command name, which may hold spaces).
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		t.Fatalf("/proc/%d/stat: %q", pid, b)
	}
	var ticks int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("/proc/%d/stat: %q", pid, b)
		}
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// cpuOf returns the CPU time each of procs has used, and this process's
// own last.
func cpuOf(t *testing.T, procs []*lab.Process) []time.Duration {
	t.Helper()
	var out []time.Duration
	for _, p := range procs {
		out = append(out, procCPU(t, p.PID()))
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	return append(out, time.Duration(ru.Utime.Nano()+ru.Stime.Nano()))
}

// diffCounts returns after-before for the counters that changed, sorted.
func diffCounts(before, after map[string]uint64) string {
	var out []string
	for k, v := range after {
		if d := v - before[k]; d != 0 {
			out = append(out, fmt.Sprintf("%s +%d", k, d))
		}
	}
	sort.Strings(out)
	return "[" + strings.Join(out, ", ") + "]"
}

// perSecond returns after-before per second of d for the counters that
// changed, sorted.
func perSecond(before, after map[string]uint64, d time.Duration) string {
	var out []string
	for k, v := range after {
		if n := v - before[k]; n != 0 {
			out = append(out, fmt.Sprintf("%s %.0f/s", k, float64(n)/d.Seconds()))
		}
	}
	sort.Strings(out)
	return "[" + strings.Join(out, ", ") + "]"
}

func nonZero(m map[string]uint64) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// ---------------------------------------------------------------- flooder

// The flooder is this test binary run again, inside the flooding client's
// namespace, as its own process (so that its busy loops share neither a
// Go scheduler with the LAN servers of the test process nor their CPU
// priority): `E2E-BINARY nlvpn-e2e-flood SPEC-JSON`. Every part stops at
// its count, and all of them at SIGTERM or after spec.Max. It prints
// "flooding" once its TCP connections are open and the rest has begun,
// and its counts as JSON on the last line.

const floodArg = "nlvpn-e2e-flood"

func init() {
	if len(os.Args) == 3 && os.Args[1] == floodArg {
		os.Exit(floodMain(os.Args[2]))
	}
}

// floodSpec is what the flooder sends where, and how much at most.
type floodSpec struct {
	Max time.Duration
	// HoldTCP: up to HoldTCPCount connections, held for HoldFor.
	HoldTCP      netip.AddrPort
	HoldTCPCount int64
	HoldFor      time.Duration
	// UDPTo: small datagrams to every port from 1024 on, from 32 sockets.
	UDPTo    netip.Addr
	UDPCount int64
	// SYNTo: non-blocking connects to ports 1-1000.
	SYNTo    netip.Addr
	SYNCount int64
	// Garbage: random datagrams to each address, some shaped as QUIC or
	// as frames (for random sessions and for Session, the flooder's own).
	Garbage      []netip.AddrPort
	Session      uint64
	GarbageCount int64
	// RawTo: malformed IPv4 packets from a raw socket.
	RawTo    netip.Addr
	RawCount int64
}

// floodCounts is what the flooder sent, and the CPU it used.
type floodCounts struct {
	TCPHeld, TCPRefused, UDP, SYN, Garbage, Raw int64
	CPU                                         time.Duration
}

// startFlooder starts the flooder in the client namespace at attackerNice.
func (e *env) startFlooder(t *testing.T, spec floodSpec) *lab.Process {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	return e.startCmd(t, e.lab.NS.Client, "flooder", "nice", "-n", attackerNice, exe, floodArg, string(js))
}

// flooderCounts reads the counts the flooder printed last.
func flooderCounts(p *lab.Process) (floodCounts, error) {
	var c floodCounts
	lines := strings.Split(strings.TrimSpace(p.Log()), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &c); err != nil {
		return c, fmt.Errorf("flooder (%s) printed no counts: %v\n%s", p.ExitStatus(), err, p.Log())
	}
	return c, nil
}

// floodMain is the flooder process: it runs the flood of specJSON (a
// floodSpec) and returns its exit code.
func floodMain(specJSON string) int {
	var spec floodSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "flooder:", err)
		return 2
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, spec.Max)
	defer cancel()
	var c struct{ tcpHeld, tcpRefused, udp, syn, garbage, raw atomic.Int64 }
	var wg sync.WaitGroup
	var errs []error
	var emu sync.Mutex
	run := func(name string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil {
				emu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
				emu.Unlock()
			}
		}()
	}
	// First more TCP connections than the bound: the SYNs to the blackhole
	// would take all the dials, and the UDP flood fills the tunnel.
	opened := make(chan struct{})
	run("TCP hold", func() error {
		return holdTCP(ctx, spec.HoldTCP, spec.HoldTCPCount, spec.HoldFor, opened, &c.tcpHeld, &c.tcpRefused)
	})
	select {
	case <-opened:
	case <-ctx.Done():
	}
	fmt.Println("flooding")
	run("UDP", func() error { return floodUDP(ctx, spec.UDPTo, spec.UDPCount, &c.udp) })
	run("SYN", func() error { return floodSYN(ctx, spec.SYNTo, spec.SYNCount, &c.syn) })
	run("garbage", func() error { return floodGarbage(ctx, spec.Garbage, spec.Session, spec.GarbageCount, &c.garbage) })
	run("raw", func() error { return floodRawGarbage(ctx, spec.RawTo, spec.RawCount, &c.raw) })
	wg.Wait()
	for _, err := range errs {
		fmt.Fprintln(os.Stderr, "flooder:", err)
	}
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	js, _ := json.Marshal(floodCounts{TCPHeld: c.tcpHeld.Load(), TCPRefused: c.tcpRefused.Load(), UDP: c.udp.Load(),
		SYN: c.syn.Load(), Garbage: c.garbage.Load(), Raw: c.raw.Load(), CPU: time.Duration(ru.Utime.Nano() + ru.Stime.Nano())})
	fmt.Println(string(js))
	if len(errs) > 0 {
		return 1
	}
	return 0
}

// holdTCP opens up to limit connections to target, 16 at a time, closes
// opened when it has tried them all, and holds those that connected for
// holdFor (or until ctx ends): more than the agent lets one client have
// (beyond it, the agent answers with a RST).
func holdTCP(ctx context.Context, target netip.AddrPort, limit int64, holdFor time.Duration, opened chan<- struct{}, held, refused *atomic.Int64) error {
	var mu sync.Mutex
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{Timeout: 5 * time.Second}
			for next.Add(1) <= limit && ctx.Err() == nil {
				c, err := d.DialContext(ctx, "tcp4", target.String())
				if err != nil {
					refused.Add(1)
					continue
				}
				held.Add(1)
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(opened)
	select {
	case <-ctx.Done():
	case <-time.After(holdFor):
	}
	return nil
}

// floodUDP sends small datagrams to dst from 32 sockets, each to ports
// 1024 and up in turn, as fast as the sockets take them: every datagram is
// a new 5-tuple for the agent until the pattern repeats (after 32 x 64,000
// of them). It stops after limit datagrams or when ctx ends.
func floodUDP(ctx context.Context, dst netip.Addr, limit int64, n *atomic.Int64) error {
	var conns []*net.UDPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 32 {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{})
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	payload := []byte("nlvpn-abuse-flood")
	for i := int64(0); i < limit; i++ {
		if i%1024 == 0 && ctx.Err() != nil {
			break
		}
		port := uint16(1024 + (i/int64(len(conns)))%64000)
		// Errors (a full TUN queue, ICMP errors of earlier datagrams) are
		// the flooder's problem.
		conns[i%int64(len(conns))].WriteToUDPAddrPort(payload, netip.AddrPortFrom(dst, port))
		n.Add(1)
	}
	return nil
}

// floodSYN starts non-blocking TCP connects to dst (ports 1 to 1000 in
// turn), 50 every 10 ms, keeping the last 256 sockets open (their kernel
// retransmits SYNs too) and closing older ones (which sends nothing). It
// stops after limit connects or when ctx ends.
func floodSYN(ctx context.Context, dst netip.Addr, limit int64, n *atomic.Int64) error {
	var ring [256]int
	for i := range ring {
		ring[i] = -1
	}
	defer func() {
		for _, fd := range ring {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}()
	sa := &unix.SockaddrInet4{Addr: dst.As4()}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for i := int64(0); i < limit; {
		for j := 0; j < 50 && i < limit; j, i = j+1, i+1 {
			slot := i % int64(len(ring))
			if ring[slot] >= 0 {
				unix.Close(ring[slot])
				ring[slot] = -1
			}
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			ring[slot] = fd
			sa.Port = int(1 + i%1000)
			if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
				return fmt.Errorf("connect: %w", err)
			}
			n.Add(1)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
	return nil
}

// floodGarbage sends datagrams to targets from 8 sockets, 1,000 every
// 100 ms, until limit or ctx ends: QUIC-looking Initials and short
// headers, relay, direct and probe frames (for random sessions and for
// the flooder's own, id) and plain random bytes.
func floodGarbage(ctx context.Context, targets []netip.AddrPort, id uint64, limit int64, n *atomic.Int64) error {
	var conns []*net.UDPConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 8 {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{})
		if err != nil {
			return err
		}
		conns = append(conns, c)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	buf := make([]byte, 1400)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for i := int64(0); i < limit; {
		for j := 0; j < 1000 && i < limit; j, i = j+1, i+1 {
			size := 1 + rng.IntN(len(buf))
			for k := range buf[:size] {
				buf[k] = byte(rng.Uint32())
			}
			switch shape := rng.IntN(6); shape {
			case 0: // QUIC v1 Initial, padded as a real one is
				size = max(size, 1200)
				buf[0] = 0xc0 | buf[0]&0x0f
				copy(buf[1:5], []byte{0, 0, 0, 1})
			case 1: // QUIC short header
				buf[0] = 0x40 | buf[0]&0x3f
			case 2, 3, 4:
				kind := []byte{wire.FrameRelay, wire.FrameDirect, wire.FrameProbe}[shape-2]
				sid := rng.Uint64()
				if rng.IntN(2) == 0 {
					sid = id
				}
				size = max(size, wire.FrameHeaderLen)
				h := wire.FrameHeader(kind, sid)
				copy(buf, h[:])
			} // 5: random bytes
			conns[i%int64(len(conns))].WriteToUDPAddrPort(buf[:size], targets[rng.IntN(len(targets))])
			n.Add(1)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
	return nil
}

// floodRawGarbage writes malformed IPv4 packets (random protocols,
// truncated TCP and UDP headers, fragments that never complete, random
// options) to dst from a raw socket, which routes them into the flooder's
// TUN: what a client can put into its tunnel. 500 every 100 ms, until
// limit or ctx ends.
func floodRawGarbage(ctx context.Context, dst netip.Addr, limit int64, n *atomic.Int64) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	rng := rand.New(rand.NewPCG(7, 7))
	sa := &unix.SockaddrInet4{Addr: dst.As4()}
	buf := make([]byte, 600)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for i := int64(0); i < limit; {
		for j := 0; j < 500 && i < limit; j, i = j+1, i+1 {
			ihl := 5
			if i%7 == 0 {
				ihl = 5 + rng.IntN(11) // random options
			}
			size := ihl*4 + rng.IntN(len(buf)-ihl*4)
			for k := range buf[:size] {
				buf[k] = byte(rng.Uint32())
			}
			buf[0] = 0x40 | byte(ihl)
			protos := []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_ICMP, byte(rng.Uint32())}
			buf[9] = protos[i%4]
			switch i % 3 {
			case 0: // a first fragment whose rest never comes
				binary.BigEndian.PutUint16(buf[6:], 0x2000)
			case 1: // a whole packet (with a truncated or random header)
				binary.BigEndian.PutUint16(buf[6:], 0)
			} // 2: random flags and offset
			buf[8] = 64
			clear(buf[10:16])            // checksum and source: the kernel's
			copy(buf[16:20], sa.Addr[:]) // the destination routes it into the TUN
			if err := unix.Sendto(fd, buf[:size], 0, sa); err != nil && !errors.Is(err, unix.ENOBUFS) && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("sendto: %w", err)
			}
			n.Add(1)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
	return nil
}
