//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// lossTcpExt are the Linux TCP counters (TcpExt) that say how a kernel
// sender got through random loss: recoveries, loss probes (TLP), timeouts,
// undos of spurious reductions; and, at a receiver, what it saw out of
// order.
var lossTcpExt = []string{"TCPSackRecovery", "TCPRenoRecovery", "TCPLossProbes", "TCPLossProbeRecovery",
	"TCPTimeouts", "TCPSpuriousRTOs", "TCPFastRetrans", "TCPSlowStartRetrans", "TCPLostRetransmit",
	"TCPLossUndo", "TCPFullUndo", "TCPPartialUndo", "TCPDSACKUndo", "TCPSACKReorder", "TCPDSACKRecv",
	"TCPDSACKOldSent", "TCPDSACKOfoSent", "TCPOFOQueue", "TCPDelivered",
	// A receiver that closed its window or dropped what arrived (the agent's socket to the LAN
	// host, say): no room in its queue, pruned, out of order with no room.
	"TCPToZeroWindowAdv", "TCPRcvQDrop", "PruneCalled", "RcvPruned", "TCPOFODrop", "TCPZeroWindowDrop", "TCPBacklogDrop", "TCPRcvCollapsed"}

// lossDetail is what one loss row is explained by: the TCP counters of the
// namespaces around the tunnel (client, LAN host) and, on nlvpn's paths,
// the agent netstack's TCP counters, before and after the row, and one
// `ss -tin` of the client's and the LAN host's iperf3 sockets taken half
// way through (cwnd, rtt, rto, retrans as the kernel sees them).
type lossDetail struct {
	r      *runner
	p      *benchPath
	before map[string]map[string]int64
	mid    map[string]string
	mu     sync.Mutex
	done   chan struct{}
	wg     sync.WaitGroup
}

func (r *runner) startLossDetail(p *benchPath, secs int) *lossDetail {
	d := &lossDetail{r: r, p: p, before: r.lossCounters(p), mid: map[string]string{}, done: make(chan struct{})}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		select {
		case <-time.After(time.Duration(secs) * time.Second / 2):
		case <-d.done:
			return
		}
		for _, who := range []struct{ name, ns string }{{"client", r.lab.NS.Client}, {"lan", r.lab.NS.LAN}} {
			ctx, cancel := context.WithTimeout(r.ctx, 3*time.Second)
			out, _, err := lab.Run(ctx, who.ns, "ss", "-tin", fmt.Sprintf("( sport = :%d or dport = :%d )", iperfPort, iperfPort))
			cancel()
			if err == nil {
				d.mu.Lock()
				d.mid[who.name] = string(out)
				d.mu.Unlock()
			}
		}
	}()
	return d
}

// print writes the counters that moved during the row, and the mid-run
// socket lines of the data connection (the one with bytes in flight).
func (d *lossDetail) print() {
	close(d.done)
	d.wg.Wait()
	after := d.r.lossCounters(d.p)
	for _, who := range []string{"client", "lan", "agent", "agent-netstack", "agent drops"} {
		a, b := after[who], d.before[who]
		if a == nil || b == nil {
			continue
		}
		var parts []string
		names := lossTcpExt
		if who == "agent-netstack" || who == "agent drops" {
			names = nil
			for k := range a {
				names = append(names, k)
			}
			slices.Sort(names)
		}
		for _, n := range names {
			if v := a[n] - b[n]; v != 0 {
				parts = append(parts, fmt.Sprintf("%s %d", n, v))
			}
		}
		label := who + " TCP"
		if who == "agent drops" {
			if len(parts) == 0 {
				parts = []string{"none"}
			}
			label = who
		}
		fmt.Printf("        %s: %s\n", label, strings.Join(parts, ", "))
	}
	for _, who := range []string{"client", "lan"} {
		for line := range strings.Lines(d.mid[who]) {
			if strings.Contains(line, "cwnd") && strings.Contains(line, "bytes_acked") {
				fmt.Printf("        %s ss: %s\n", who, strings.TrimSpace(line))
			}
		}
	}
}

// lossCounters reads TcpExt of the client's, the agent's and the LAN host's namespaces
// and, on nlvpn's paths, the agent's netstack TCP counters (status "tcp").
func (r *runner) lossCounters(p *benchPath) map[string]map[string]int64 {
	m := map[string]map[string]int64{}
	for _, who := range []struct{ name, ns string }{{"client", r.lab.NS.Client}, {"lan", r.lab.NS.LAN}, {"agent", r.lab.NS.Agent}} {
		if out, _, err := lab.Run(r.ctx, who.ns, "cat", "/proc/net/netstat"); err == nil {
			if ext, err := parseSNMP(out, "TcpExt"); err == nil {
				m[who.name] = ext
			}
		}
	}
	if p.nlvpn {
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		out, _, err := lab.Run(ctx, r.lab.NS.Agent, r.nlvpn, "status", "--json", "--state-dir", filepath.Join(r.dir, "agent"))
		cancel()
		var st struct {
			TCP   map[string]int64 `json:"tcp"`
			Drops map[string]int64 `json:"drops"`
		}
		if err == nil && json.Unmarshal(out, &st) == nil && st.TCP != nil {
			m["agent-netstack"] = st.TCP
			// The agent's own drops beside its TCP's resends: a resend
			// lost inside the agent is a loss the path did not cause.
			m["agent drops"] = st.Drops
		}
	}
	return m
}
