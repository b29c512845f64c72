package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
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
	// curl holds the curl flags that send a request along this path (a
	// proxy); socksOnly paths have no route for iperf3 or ping.
	curl      []string
	socksOnly bool
}

// errNA marks a metric that does not apply to a path (iperf3 and ping
// cannot use a SOCKS proxy); it prints as "n/a" and is not a failure.
var errNA = errors.New("not applicable")

// curlSize is the payload of the curl download metric.
const curlSize = 256 << 20

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

	// HTTP data servers for the curl metric, next to the iperf3 servers.
	for _, s := range []struct{ ns, addr string }{{l.NS.LAN, l.LANHost.String()}, {l.NS.GW, l.Gateway.String()}} {
		stop, err := serveData(s.ns, net.JoinHostPort(s.addr, strconv.Itoa(dataPort)))
		if err != nil {
			return fmt.Errorf("data server in %s: %w", s.ns, err)
		}
		defer stop()
	}

	tunnelUp := func() error {
		out, err := lab.Output(r.ctx, l.NS.Client, "ip", "route", "show", "table", "all", l.LANSubnet.String())
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
				if r.gateway == nil {
					say("Starting gateway, agent and client (nlvpn up --direct).")
					return r.startStack(false, tunnelUp, "--direct")
				}
				say("Restarting the client with --direct (peer-to-peer path).")
				r.client.Stop()
				return r.startClient(false, tunnelUp, "--direct")
			},
		})
	}
	if r.supports("up", "--netstack") {
		// The same tunnel with no TUN: a netstack client behind a SOCKS5
		// proxy, on the path the previous column used.
		prev := paths[len(paths)-1]
		var flags []string
		switch prev.name {
		case "direct":
			flags = []string{"--direct"}
		case "relay":
			flags = relayFlags
		}
		paths = append(paths, benchPath{
			name: "socks",
			desc: fmt.Sprintf("nlvpn up --netstack %s: curl --socks5-hostname %s -> userspace netstack -> the %s path -> agent -> LAN host %s (TCP metrics by curl only)",
				strings.Join(flags, " "), socksBenchAddr, prev.name, l.LANHost),
			ns: l.NS.Client, addr: l.LANHost.String(),
			curl:      []string{"--socks5-hostname", socksBenchAddr},
			socksOnly: true,
			setup: func() error {
				say("Replacing the TUN client with a netstack client (nlvpn up --netstack %s: SOCKS5 proxy on %s).", strings.Join(flags, " "), socksBenchAddr)
				r.client.Stop()
				return r.startNetstackClient(flags...)
			},
		})
	}
	metrics := []benchMetric{
		{fmt.Sprintf("curl down %d MiB (MB/s)", curlSize>>20), 1, func(p benchPath) (float64, error) { return r.curlDown(p) }},
		{"TCP up, 1 stream (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 1, false) }},
		{"TCP up, 4 streams (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 4, false) }},
		{"TCP down, 1 stream (Mbit/s)", 0, func(p benchPath) (float64, error) { return r.iperf(p, secs, 1, true) }},
		{"ping RTT avg (ms)", 3, r.pingAvg},
	}

	if r.only != nil {
		var keep []benchPath
		for _, p := range paths {
			if p.name == "raw" || slices.Contains(r.only, p.name) {
				keep = append(keep, p)
			}
		}
		paths = keep
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
			if errors.Is(err, errNA) {
				fmt.Println("n/a")
			} else if err != nil {
				fmt.Printf("error: %v\n", err)
			} else {
				fmt.Printf("%.2f\n", v)
			}
		}
	}

	say("Results (one run, same topology; curl = one HTTP GET of %d MiB, MB = 10^6 bytes; iperf3 -t %d; up = client sends, down = iperf3 -R; ping -c 20 -i 0.2)", curlSize>>20, secs)
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
	// The SOCKS column also against the TUN path it rides on.
	n := len(paths)
	socksVsTUN := n >= 3 && paths[n-1].socksOnly
	if socksVsTUN {
		fmt.Printf(" %12s", paths[n-1].name+"/"+paths[n-2].name)
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
		if socksVsTUN {
			a, b := results[i][n-1], results[i][n-2]
			if a.err != nil || b.err != nil || b.v == 0 {
				fmt.Printf(" %12s", "-")
			} else {
				fmt.Printf(" %12.3f", a.v/b.v)
			}
		}
		fmt.Println()
	}
	var errs []error
	for i := range results {
		for j := range results[i] {
			if err := results[i][j].err; err != nil && !errors.Is(err, errNA) {
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
	if errors.Is(c.err, errNA) {
		return "n/a"
	}
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
	if p.socksOnly {
		return 0, errNA
	}
	args := []string{"iperf3", "-c", p.addr, "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(secs),
		"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "5000"}
	if reverse {
		args = append(args, "-R")
	}
	var profiled sync.WaitGroup
	if r.profileDir != "" && p.name == "direct" && streams == 1 && !reverse {
		for _, who := range []struct{ name, ns string }{{"client", r.lab.NS.Client}, {"agent", r.lab.NS.Agent}} {
			profiled.Add(1)
			go func() {
				defer profiled.Done()
				file := filepath.Join(r.profileDir, who.name+".pprof")
				url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", pprofAddr, max(1, secs-1))
				if _, stderr, err := lab.Run(r.ctx, who.ns, "curl", "-sS", "-f", "-o", file, url); err != nil {
					fmt.Printf("(profile of %s failed: %v %s) ", who.name, err, stderr)
				}
			}()
		}
	}
	out, _, err := lab.Run(r.ctx, p.ns, args...)
	profiled.Wait()
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
	if p.socksOnly {
		return 0, errNA
	}
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

// dataPort is the HTTP data server's port on the LAN host and the gateway host.
const dataPort = 8000

// socksBenchAddr is the netstack client's SOCKS5 proxy in the client namespace.
const socksBenchAddr = "127.0.0.1:1080"

// serveData serves GET /data?size=N (N pseudo-random bytes, capped at
// 1 GiB) from this process on a listener inside ns; stop closes it.
func serveData(ns, addr string) (stop func(), err error) {
	ln, err := lab.Listen(ns, "tcp4", addr)
	if err != nil {
		return nil, err
	}
	block := make([]byte, 1<<20)
	var x uint64 = 0x9e3779b97f4a7c15
	for i := range block {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		block[i] = byte(x)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /data", func(w http.ResponseWriter, req *http.Request) {
		size, err := strconv.ParseInt(req.URL.Query().Get("size"), 10, 64)
		if err != nil || size < 0 || size > 1<<30 {
			http.Error(w, "bad size", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		for size > 0 {
			n := min(size, int64(len(block)))
			if _, err := w.Write(block[:n]); err != nil {
				return
			}
			size -= n
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	return func() { srv.Close() }, nil
}

// curlDown downloads curlSize bytes along p with curl and returns MB/s
// (10^6 bytes per second, as curl's speed_download).
func (r *runner) curlDown(p benchPath) (float64, error) {
	args := []string{"env", "-u", "NO_PROXY", "-u", "no_proxy", "-u", "ALL_PROXY", "-u", "all_proxy", "-u", "http_proxy",
		"curl", "-sS", "-f", "-o", "/dev/null", "--max-time", "120", "-w", "%{size_download} %{speed_download}"}
	if len(p.curl) == 0 {
		args = append(args, "--noproxy", "*")
	}
	args = append(args, p.curl...)
	args = append(args, fmt.Sprintf("http://%s/data?size=%d", net.JoinHostPort(p.addr, strconv.Itoa(dataPort)), curlSize))
	out, _, err := lab.Run(r.ctx, p.ns, args...)
	if err != nil {
		return 0, err
	}
	var size int64
	var speed float64
	if _, err := fmt.Sscan(string(out), &size, &speed); err != nil {
		return 0, fmt.Errorf("parsing curl -w output %q: %v", out, err)
	}
	if size != curlSize {
		return 0, fmt.Errorf("curl got %d bytes, want %d", size, curlSize)
	}
	return speed / 1e6, nil
}

// startNetstackClient starts `nlvpn up --netstack` (SOCKS5 on
// socksBenchAddr, no HTTP proxy) as r.client and waits until a request
// through the proxy reaches the LAN host's data server.
func (r *runner) startNetstackClient(flags ...string) error {
	l := r.lab
	check := func() error {
		ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
		defer cancel()
		_, _, err := lab.Run(ctx, l.NS.Client, "curl", "-sS", "-f", "-o", "/dev/null", "--max-time", "5",
			"--socks5-hostname", socksBenchAddr, fmt.Sprintf("http://%s/data?size=1", net.JoinHostPort(l.LANHost.String(), strconv.Itoa(dataPort))))
		return err
	}
	deadline := time.Now().Add(40 * time.Second)
	for {
		r.clientN++
		args := append([]string{"up", "--netstack", "--socks5", socksBenchAddr, "--http-proxy", "", "--token", r.clientTok, "--gateway", r.gwAddr(),
			"--agent", agentName, "--state-dir", filepath.Join(r.dir, "client-socks")}, flags...)
		var err error
		r.client, err = r.start(l.NS.Client, fmt.Sprintf("client-%d-netstack", r.clientN), args...)
		if err != nil {
			return err
		}
		err = r.poll(time.Until(deadline), r.client, check)
		if err == nil {
			return nil
		}
		if r.client.Running() || r.ctx.Err() != nil || time.Until(deadline) < time.Second {
			return fmt.Errorf("the netstack client's proxy did not work: %w", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
