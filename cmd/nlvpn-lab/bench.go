package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

const iperfPort = 5201

// benchPath is one column of the bench table: a way from the client
// namespace to a target. Add a path (direct, SOCKS, ...) by appending one.
type benchPath struct {
	name string // column header
	desc string // one line saying what it measures
	ns   string // namespace the measuring client runs in
	addr string // target address (iperf3 server and ping target)
	// setup prepares the path (e.g. starts the tunnel); nil if none.
	setup func() error
}

// benchMetric is one row of the bench table.
type benchMetric struct {
	name    string
	prec    int // decimals shown
	measure func(p benchPath) (float64, error)
}

type cell struct {
	v   float64
	err error
}

func (r *runner) bench(secs, trials int) error {
	l := r.lab
	say("Building the namespace topology (prefix %s, client %v NAT, agent %v NAT).", l.Prefix, l.Opts.ClientNAT, l.Opts.AgentNAT)
	if err := r.build(); err != nil {
		return err
	}
	// iperf3 servers: on the LAN host (tunnel target) and on the gateway
	// host (raw target).
	for _, s := range []struct{ ns, addr string }{{l.NS.LAN, l.LANHost.String()}, {l.NS.GW, l.Gateway.String()}} {
		p, err := r.lab.Start(s.ns, lab.ProcConfig{Name: "iperf3-server", Args: []string{"iperf3", "-s", "-B", s.addr, "-p", strconv.Itoa(iperfPort)}})
		if err != nil {
			return err
		}
		r.procs = append(r.procs, p)
		if err := r.poll(10*time.Second, p, r.listening(s.ns, "tcp", iperfPort)); err != nil {
			return fmt.Errorf("iperf3 server in %s: %w", s.ns, err)
		}
	}

	tunnelUp := func() error {
		out, err := lab.Output(r.ctx, l.NS.Client, "ip", "route", "show", l.LANSubnet.String())
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("no route to %s yet", l.LANSubnet)
		}
		_, err = lab.Output(r.ctx, l.NS.Client, "ping", "-c", "1", "-W", "2", l.LANHost.String())
		return err
	}
	// Binaries from before the direct path have neither flag; their only
	// path is the relay.
	var relayFlags []string
	if r.supports("up", "--relay") {
		relayFlags = []string{"--relay"}
	}
	paths := []benchPath{
		{
			name: "raw",
			desc: fmt.Sprintf("no tunnel: client ns -> client NAT -> internet router -> gateway host %s (plain TCP/ICMP on the same namespaces and links)", l.Gateway),
			ns:   l.NS.Client, addr: l.Gateway.String(),
		},
		{
			name: "relay",
			desc: fmt.Sprintf("nlvpn up %s: client ns -> TUN -> client NAT -> gateway relay -> agent NAT -> agent -> LAN host %s", strings.Join(relayFlags, " "), l.LANHost),
			ns:   l.NS.Client, addr: l.LANHost.String(),
			setup: func() error {
				say("Starting gateway, agent and client (nlvpn up %s: relayed tunnel).", strings.Join(relayFlags, " "))
				return r.startStack(false, tunnelUp, relayFlags...)
			},
		},
	}
	if r.supports("up", "--direct") {
		paths = append(paths, benchPath{
			name: "direct",
			desc: fmt.Sprintf("nlvpn up --direct: client ns -> TUN -> client NAT -> hole-punched UDP -> agent NAT -> agent -> LAN host %s", l.LANHost),
			ns:   l.NS.Client, addr: l.LANHost.String(),
			setup: func() error {
				say("Restarting the client with --direct (peer-to-peer path).")
				r.client.Stop()
				return r.startClient(false, tunnelUp, "--direct")
			},
		})
	}
	metrics := []benchMetric{
		{"TCP up, 1 stream (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 1, false) }},
		{"TCP up, 4 streams (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 4, false) }},
		{"TCP down, 1 stream (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 1, true) }},
		{"ping RTT avg (ms)", 3, r.pingAvg},
	}

	results := make([][]cell, len(metrics))
	for i := range results {
		results[i] = make([]cell, len(paths))
	}
	for j, p := range paths {
		if p.setup != nil {
			if err := p.setup(); err != nil {
				return fmt.Errorf("setting up path %q: %w", p.name, err)
			}
		}
		for i, m := range metrics {
			if err := r.ctx.Err(); err != nil {
				return err
			}
			fmt.Printf("    measuring %-28s on %-6s ... ", m.name, p.name)
			v, err := m.measure(p)
			results[i][j] = cell{v, err}
			if err != nil {
				fmt.Printf("error: %v\n", err)
			} else {
				fmt.Printf("%.2f\n", v)
			}
		}
	}

	say("Results (one run, same topology; iperf3 -t %d; up = client sends, down = iperf3 -R; ping -c 20 -i 0.2)", secs)
	for _, p := range paths {
		fmt.Printf("    %-6s = %s\n", p.name, p.desc)
	}
	fmt.Println()
	// Metric names left-aligned, numbers right-aligned.
	fmt.Printf("    %-30s", "metric")
	for _, p := range paths {
		fmt.Printf(" %10s", p.name)
	}
	for _, p := range paths[1:] {
		fmt.Printf(" %12s", p.name+"/"+paths[0].name)
	}
	fmt.Println()
	for i, m := range metrics {
		fmt.Printf("    %-30s", m.name)
		for j := range paths {
			fmt.Printf(" %10s", fmtCell(results[i][j], m.prec))
		}
		base := results[i][0]
		for j := 1; j < len(paths); j++ {
			c := results[i][j]
			if c.err != nil || base.err != nil || base.v == 0 {
				fmt.Printf(" %12s", "-")
			} else {
				fmt.Printf(" %12.3f", c.v/base.v)
			}
		}
		fmt.Println()
	}
	var errs []error
	for i := range results {
		for j := range results[i] {
			if results[i][j].err != nil {
				errs = append(errs, fmt.Errorf("%s on %s: %w", metrics[i].name, paths[j].name, results[i][j].err))
			}
		}
	}
	if trials > 0 && r.supports("status", "--json") {
		if err := r.startupTrials(trials); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func fmtCell(c cell, prec int) string {
	if c.err != nil {
		return "error"
	}
	return strconv.FormatFloat(c.v, 'f', prec, 64)
}

// iperfResult is the part of `iperf3 -J` output we use.
type iperfResult struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_sent"`
		SumReceived struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
}

// iperf runs iperf3 from p.ns to p.addr and returns the received rate in Mbit/s.
// "up" is client → target; reverse (-R) is target → client.
func (r *runner) iperf(p benchPath, secs, streams int, reverse bool) (float64, error) {
	args := []string{"iperf3", "-c", p.addr, "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(secs),
		"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "5000"}
	if reverse {
		args = append(args, "-R")
	}
	out, _, err := lab.Run(r.ctx, p.ns, args...)
	var res iperfResult
	if jerr := json.Unmarshal(out, &res); jerr != nil {
		if err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("parsing iperf3 -J: %v", jerr)
	}
	if res.Error != "" {
		return 0, fmt.Errorf("iperf3: %s", res.Error)
	}
	if err != nil {
		return 0, err
	}
	return res.End.SumReceived.BitsPerSecond / 1e6, nil
}

var rttRE = regexp.MustCompile(`= ([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+) ms`)

// pingAvg returns the average RTT in ms of ping -c 20 -i 0.2.
func (r *runner) pingAvg(p benchPath) (float64, error) {
	out, err := lab.Output(r.ctx, p.ns, "ping", "-c", "20", "-i", "0.2", "-W", "2", "-q", p.addr)
	if err != nil {
		return 0, err
	}
	m := rttRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no RTT in ping output: %q", out)
	}
	return strconv.ParseFloat(m[2], 64)
}
