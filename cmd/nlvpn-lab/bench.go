//go:build linux

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

const iperfPort = 5201

// lossPct is the random loss, in percent of forwarded packets, that the
// internet router applies for the loss rows.
const lossPct = 2

// benchPath is one column of the bench table: a way from the client
// namespace to a target.
type benchPath struct {
	name string // column header, and its name for --paths
	desc string // one line saying what it measures
	ns   string // namespace the measuring client runs in
	addr string // target address (iperf3 server and ping target)
	// setup prepares the path (e.g. starts the tunnel); nil if none.
	setup func() error
	// teardown undoes setup when the next path must not see it; nil if
	// the next path builds on this one.
	teardown func() error
	// roles lists the processes that carry the path (after setup), for
	// the CPU and memory figures.
	roles func() []role
	// nlvpn: the path is nlvpn's, with `nlvpn status` drop counters.
	nlvpn bool
}

// role is a process carrying a path, named by its place (client, agent,
// gateway).
type role struct {
	name string
	p    *lab.Process
}

var roleNames = []string{"client", "agent", "gateway"}

// runDirs names the runs of a path without loss, in table order: the key
// iperfMeasure files their CPU figures and drop counters under, after the
// path's name.
var runDirs = []string{"up", "down", "up x4", "down x4"}

// The CPU table's columns after the roles: the whole machine's busy time
// per GB (every process, the kernel, and whatever else ran) and its
// softirq part, then that busy time and the hypervisor's steal as shares
// of all CPUs over the run. The raw path's figure is the cost of the two
// iperf3 ends and the links alone, which every tunnel pays too.
const (
	machineColumn = "machine"
	softirqColumn = "softirq"
	busyColumn    = "busy %"
	stealColumn   = "steal %"
)

// errNA marks a figure that does not apply (e.g. an agent without a
// status socket); it prints as "n/a" and is not a failure.
var errNA = errors.New("not applicable")

// curlSize is the payload of the curl download (TUN vs SOCKS) figure.
const curlSize = 128 << 20

type cell struct {
	v   float64
	err error
	ok  bool // measured (false: not measured, printed as "-")
}

func measured(v float64, err error) cell { return cell{v: v, err: err, ok: true} }

// medianCell is the median of the cells measured without error; with none,
// the first of them (an error, or "-" for none at all).
func medianCell(cs []cell) cell {
	var vals []float64
	for _, c := range cs {
		if c.good() {
			vals = append(vals, c.v)
		}
	}
	switch {
	case len(vals) > 0:
		return measured(median(vals), nil)
	case len(cs) > 0:
		return cs[0]
	}
	return cell{}
}

func (c cell) format(prec int) string {
	switch {
	case !c.ok:
		return "-"
	case errors.Is(c.err, errNA):
		return "n/a"
	case c.err != nil:
		return "error"
	}
	return strconv.FormatFloat(c.v, 'f', prec, 64)
}

func (c cell) good() bool { return c.ok && c.err == nil }

// benchRow is one row of the main table.
type benchRow struct {
	name    string
	prec    int  // decimals shown
	loss    bool // measured with lossPct random loss on the internet router
	measure func(p *benchPath) (float64, error)
}

// benchResults is everything one run measured, printed at its end.
type benchResults struct {
	secs  int
	paths []*benchPath // in display order
	rows  []benchRow
	cells map[string]map[string]cell // row name -> path name -> cell (the median of the repeats)

	// repeat is how many times each row was measured on each path
	// (--repeat); samples holds every value, for rows measured more than
	// once: row name -> path name -> Mbit/s or ms, in order.
	repeat  int
	samples map[string]map[string][]float64

	cpu   map[string][]map[string]cell // "path dir" -> each time it ran: role -> CPU s per GB
	rss   map[string]map[string]cell   // path -> role -> peak RSS MiB
	drops map[string]*dropReport       // path -> counters of its 1-stream upload

	curlVia    string // the TUN path the SOCKS client rides
	curl, sock cell   // MB/s

	startup *startupResult

	// The machine's load average (1, 5, 15 min) when the run began and
	// ended: other work on a shared machine skews every column.
	loadStart, loadEnd string

	// pingMin holds, per path, the minimum RTT (ms) of each ping avg run
	// that the min row has not taken yet: with --repeat, run i of the min
	// row reports run i of the avg row.
	pingMin map[string][]float64

	kernelCC string // the namespaces' kernel TCP congestion control
}

// loadAvg returns the first three fields of /proc/loadavg.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

// dropReport holds what was lost during one run without loss on one path.
type dropReport struct {
	retrans cell
	status  map[string]statusDelta // role -> nlvpn status counters
	udp     map[string]map[string]cell
}

type statusDelta struct {
	err    error
	deltas []namedValue
}

func (r *runner) bench(secs, trials, repeat int) error {
	l := r.lab
	res := &benchResults{secs: secs, cells: map[string]map[string]cell{}, cpu: map[string][]map[string]cell{},
		rss: map[string]map[string]cell{}, drops: map[string]*dropReport{}, pingMin: map[string][]float64{},
		repeat: repeat, samples: map[string]map[string][]float64{}}
	r.res = res
	res.loadStart = loadAvg()
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
	nlvpnRoles := func() []role {
		return []role{{"client", r.client}, {"agent", r.agent}, {"gateway", r.gateway}}
	}
	var wg *wgRouter
	defer func() {
		if err := wg.close(); err != nil {
			fmt.Printf("    (wireguard-go teardown: %v)\n", err)
		}
	}()
	// In the order measured; the table shows raw, wg, direct, routed, relay, tcp.
	paths := []*benchPath{
		{
			name: "raw",
			desc: fmt.Sprintf("no tunnel: client ns -> client NAT -> internet router -> gateway host %s (plain TCP/ICMP on the same namespaces and links)", l.Gateway),
			ns:   l.NS.Client, addr: l.Gateway.String(),
		},
		{
			name: "wg",
			desc: fmt.Sprintf("%s (userspace, its own TUN) as a subnet router: client ns -> TUN -> client NAT -> UDP between the public NAT addresses (simultaneous open) -> agent NAT -> agent, forwarding + masquerade -> LAN host %s",
				wgVersion(r.wgGo), l.LANHost),
			ns: l.NS.Client, addr: l.LANHost.String(),
			setup: func() (err error) {
				say("Starting wireguard-go at the client and the agent (subnet router for %s; UDP %d <-> %d through both NATs).", l.LANSubnet, wgClientPort, wgAgentPort)
				wg, err = r.startWG()
				if err == nil {
					fmt.Printf("    %s and %s up; the LAN host answers through them (checked: route, TUN, endpoints, counters)\n", wg.cliIf, wg.agtIf)
				}
				return err
			},
			teardown: func() error {
				err := wg.close()
				wg = nil
				return err
			},
			roles: func() []role {
				if wg == nil {
					return nil
				}
				return []role{{"client", wg.client}, {"agent", wg.agent}}
			},
		},
		{
			name: "relay",
			desc: fmt.Sprintf("nlvpn up %s: client ns -> TUN -> client NAT -> gateway relay -> agent NAT -> agent -> LAN host %s", strings.Join(relayFlags, " "), l.LANHost),
			ns:   l.NS.Client, addr: l.LANHost.String(),
			setup: func() error {
				say("Starting gateway, agent and client (nlvpn up %s: relayed tunnel).", strings.Join(relayFlags, " "))
				return r.startStack(false, tunnelUp, relayFlags...)
			},
			roles: nlvpnRoles,
			nlvpn: true,
		},
	}
	if r.supports("up", "--direct") {
		paths = append(paths, &benchPath{
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
			roles: nlvpnRoles,
			nlvpn: true,
		})
	}
	if r.supports("agent", "--routed") {
		// restartRouted restarts agent and client, the agent with
		// --routed or without, the client on the direct path.
		restartRouted := func(routed bool) error {
			r.setRouted(routed)
			r.client.Stop()
			if err := r.startAgent(); err != nil {
				return err
			}
			return r.startClient(false, tunnelUp, "--direct")
		}
		paths = append(paths, &benchPath{
			name: "routed",
			desc: fmt.Sprintf("nlvpn up --direct, the agent with --routed: client ns -> TUN -> client NAT -> hole-punched UDP -> agent NAT -> agent -> TUN, forwarding + masquerade -> LAN host %s (wg's topology at the agent)", l.LANHost),
			ns:   l.NS.Client, addr: l.LANHost.String(),
			setup: func() error {
				if r.gateway == nil {
					r.setRouted(true)
					say("Starting gateway, agent (--routed) and client (nlvpn up --direct).")
					return r.startStack(false, tunnelUp, "--direct")
				}
				say("Restarting the agent with --routed (the kernel forwards) and the client with --direct.")
				return restartRouted(true)
			},
			teardown: func() error {
				// The paths after this one measure the netstack agent.
				return restartRouted(false)
			},
			roles: nlvpnRoles,
			nlvpn: true,
		})
	}
	if r.supports("up", "--transport") {
		paths = append(paths, &benchPath{
			name: "tcp",
			desc: fmt.Sprintf("nlvpn up %s with UDP dropped at the client NAT: client ns -> TUN -> client NAT -> TCP/TLS to the gateway (QUIC inside) -> relay -> agent NAT (UDP) -> agent -> LAN host %s", strings.Join(relayFlags, " "), l.LANHost),
			ns:   l.NS.Client, addr: l.LANHost.String(),
			setup: func() error {
				if err := l.BlockClientUDP(r.ctx); err != nil {
					return err
				}
				up := func() error {
					if err := tunnelUp(); err != nil {
						return err
					}
					return r.clientTransport("tcp")
				}
				if r.gateway == nil {
					say("Starting gateway, agent and client (nlvpn up %s) with UDP dropped at the client's NAT: the TCP fallback.", strings.Join(relayFlags, " "))
					return r.startStack(false, up, relayFlags...)
				}
				say("Restarting the client (nlvpn up %s) with UDP dropped at the client's NAT: the TCP fallback.", strings.Join(relayFlags, " "))
				r.client.Stop()
				return r.startClient(false, up, relayFlags...)
			},
			teardown: func() error {
				// The next client (socks) starts on UDP again.
				r.client.Stop()
				if err := l.UnblockClientUDP(r.ctx); err != nil {
					return err
				}
				return r.startClient(false, tunnelUp, relayFlags...)
			},
			roles: nlvpnRoles,
			nlvpn: true,
		})
	}
	socks := r.supports("up", "--netstack")

	if r.only != nil {
		known := []string{"raw", "wg", "relay", "direct", "routed", "tcp", "socks"}
		for i, n := range r.only {
			if n == "wireguard-go" {
				r.only[i], n = "wg", "wg"
			}
			if !slices.Contains(known, n) {
				return fmt.Errorf("--paths: unknown path %q (known: %s)", n, strings.Join(known, ","))
			}
		}
		paths = slices.DeleteFunc(paths, func(p *benchPath) bool { return p.name != "raw" && !slices.Contains(r.only, p.name) })
		socks = socks && slices.Contains(r.only, "socks")
	}
	for _, name := range []string{"raw", "wg", "direct", "routed", "relay", "tcp"} {
		if i := slices.IndexFunc(paths, func(p *benchPath) bool { return p.name == name }); i >= 0 {
			res.paths = append(res.paths, paths[i])
		}
	}

	iperfRow := func(streams int, reverse, loss bool) func(*benchPath) (float64, error) {
		return func(p *benchPath) (float64, error) { return r.iperfMeasure(p, secs, streams, reverse, loss) }
	}
	res.rows = []benchRow{
		{name: "TCP up, 1 stream (Mbit/s)", measure: iperfRow(1, false, false)},
		{name: "TCP down, 1 stream (Mbit/s)", measure: iperfRow(1, true, false)},
		{name: "TCP up, 4 streams (Mbit/s)", measure: iperfRow(4, false, false)},
		{name: "TCP down, 4 streams (Mbit/s)", measure: iperfRow(4, true, false)},
		{name: "ping RTT avg (ms)", prec: 3, measure: r.pingAvg},
		{name: "ping RTT min (ms)", prec: 3, measure: r.pingMin},
		{name: fmt.Sprintf("%d%% loss: TCP up, 1 stream", lossPct), loss: true, measure: iperfRow(1, false, true)},
		{name: fmt.Sprintf("%d%% loss: TCP down, 1 stream", lossPct), loss: true, measure: iperfRow(1, true, true)},
	}
	if r.rows != nil {
		res.rows = slices.DeleteFunc(res.rows, func(row benchRow) bool {
			return !slices.ContainsFunc(r.rows, func(w string) bool { return strings.Contains(strings.ToLower(row.name), strings.ToLower(w)) })
		})
	}
	for _, row := range res.rows {
		res.cells[row.name] = map[string]cell{}
	}

	var errs []error
	for _, p := range paths {
		if err := r.ctx.Err(); err != nil {
			return err
		}
		if err := r.measurePath(p); err != nil {
			errs = append(errs, err)
		}
	}
	if socks && r.ctx.Err() == nil {
		if err := r.benchSOCKS(tunnelUp, relayFlags); err != nil {
			errs = append(errs, err)
		}
	}
	if trials > 0 && r.agent != nil && r.ctx.Err() == nil && r.supports("status", "--json") {
		var err error
		res.startup, err = r.startupTrials(trials)
		if err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.ctx.Err(); err != nil {
		return err
	}
	res.loadEnd = loadAvg()
	res.kernelCC = r.kernelCC
	res.print()
	// Each failure once (a path that could not be set up fails every row).
	seen := map[string]bool{}
	for _, err := range errs {
		seen[err.Error()] = true
	}
	for _, row := range res.rows {
		for _, p := range res.paths {
			if c := res.cells[row.name][p.name]; c.ok && c.err != nil && !errors.Is(c.err, errNA) && !seen[c.err.Error()] {
				seen[c.err.Error()] = true
				errs = append(errs, fmt.Errorf("%s on %s: %w", row.name, p.name, c.err))
			}
		}
	}
	return errors.Join(errs...)
}

// measurePath sets p up, measures every row on it (the loss rows with the
// loss applied) and tears it down. A path that cannot be set up gets its
// error in every cell; the run goes on with the next path.
func (r *runner) measurePath(p *benchPath) error {
	res := r.res
	if p.setup != nil {
		if err := p.setup(); err != nil {
			err = fmt.Errorf("setting up path %q: %w", p.name, err)
			fmt.Printf("    %v\n", err)
			for _, row := range res.rows {
				res.cells[row.name][p.name] = measured(0, err)
			}
			return err
		}
	}
	measure := func(row benchRow) {
		if r.ctx.Err() != nil {
			return
		}
		fmt.Printf("    measuring %-30s on %-6s ... ", row.name, p.name)
		var vals []float64
		var c cell
		for i := 0; i < res.repeat && r.ctx.Err() == nil; i++ {
			if i > 0 {
				fmt.Print(", ")
			}
			c = measured(row.measure(p))
			if c.err != nil {
				break
			}
			vals = append(vals, c.v)
			fmt.Printf("%.2f", c.v)
		}
		if c.err == nil && len(vals) > 0 {
			c = measured(median(vals), nil)
			if res.repeat > 1 {
				if res.samples[row.name] == nil {
					res.samples[row.name] = map[string][]float64{}
				}
				res.samples[row.name][p.name] = vals
				fmt.Printf(" (median %.2f)", c.v)
			}
		}
		res.cells[row.name][p.name] = c
		switch {
		case errors.Is(c.err, errNA):
			fmt.Println("n/a")
		case c.err != nil:
			fmt.Printf("error: %v\n", c.err)
		default:
			fmt.Println()
		}
	}
	for _, row := range res.rows {
		if !row.loss {
			measure(row)
		}
	}
	if r.ctx.Err() == nil {
		err := r.withLoss(func() {
			for _, row := range res.rows {
				if row.loss {
					d := r.startLossDetail(p, res.secs)
					measure(row)
					d.print()
				}
			}
		})
		if err != nil {
			for _, row := range res.rows {
				if row.loss {
					res.cells[row.name][p.name] = measured(0, err)
				}
			}
		}
	}
	if p.roles != nil {
		rss := map[string]cell{}
		for _, ro := range p.roles() {
			if ro.p != nil {
				b, err := procPeakRSS(ro.p.PID())
				rss[ro.name] = measured(float64(b)/(1<<20), err)
			}
		}
		res.rss[p.name] = rss
	}
	if p.teardown != nil {
		if err := p.teardown(); err != nil {
			return fmt.Errorf("tearing down path %q: %w", p.name, err)
		}
	}
	return nil
}

// withLoss runs f while the internet router drops lossPct % of the packets
// it forwards, at random, in both directions (a table of its own, deleted
// afterwards by name).
func (r *runner) withLoss(f func()) error {
	ns := r.lab.NS.Inet
	rules := fmt.Sprintf(`table ip nvloss {
	chain forward {
		type filter hook forward priority filter; policy accept;
		numgen random mod 100 < %d drop
	}
}
`, lossPct)
	if err := nftLoad(r.ctx, ns, rules); err != nil {
		return err
	}
	f()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return nftLoad(ctx, ns, "delete table ip nvloss\n")
}

// iperfMeasure runs iperf3 along p and returns Mbit/s. It also charges
// each role's and the machine's CPU time to the bytes moved, and without
// loss it records the drop counters.
func (r *runner) iperfMeasure(p *benchPath, secs, streams int, reverse, loss bool) (float64, error) {
	detail := !loss
	dir := "up"
	if reverse {
		dir = "down"
	}
	if streams != 1 {
		// The drop counters of the four-stream runs get columns of
		// their own: several flows through one tunnel fill its queues
		// as one does not.
		dir += fmt.Sprintf(" x%d", streams)
	}
	cpuKey := p.name + " " + dir
	if loss {
		cpuKey += cpuLossSuffix
	}
	var roles []role
	if p.roles != nil {
		roles = p.roles()
	}
	// Drop counters for the tunnels (raw has no roles and no tunnel), each
	// way.
	drops := detail && p.roles != nil
	var before dropSnap
	if drops {
		before = r.dropSnapshot(p)
	}
	cpu0 := make([]time.Duration, len(roles))
	cpuErr := make([]error, len(roles))
	for i, ro := range roles {
		cpu0[i], cpuErr[i] = procCPU(ro.p.PID())
	}
	mach0, machErr := machineCPU()
	start := time.Now()
	run, err := r.iperf(p, secs, streams, reverse, loss)
	wall := time.Since(start)
	perGB := func(d time.Duration, errs ...error) cell {
		switch {
		case err != nil:
			return measured(0, err)
		case errors.Join(errs...) != nil:
			return measured(0, errors.Join(errs...))
		case run.Bytes == 0:
			return measured(0, errors.New("no bytes moved"))
		}
		return measured(d.Seconds()/(float64(run.Bytes)/1e9), nil)
	}
	cpu := map[string]cell{}
	for i, ro := range roles {
		cpu1, err1 := procCPU(ro.p.PID())
		cpu[ro.name] = perGB(cpu1-cpu0[i], cpuErr[i], err1)
	}
	mach1, machErr1 := machineCPU()
	cpu[machineColumn] = perGB(mach1.busy-mach0.busy, machErr, machErr1)
	cpu[softirqColumn] = perGB(mach1.softirq-mach0.softirq, machErr, machErr1)
	// How busy the CPUs were: near 100 % the rate is what the CPU allows;
	// well below, something waited (a window, a queue, a timer).
	share := func(d time.Duration) cell {
		if e := errors.Join(err, machErr, machErr1); e != nil {
			return measured(0, e)
		}
		return measured(100*d.Seconds()/(wall.Seconds()*float64(runtime.NumCPU())), nil)
	}
	cpu[busyColumn] = share(mach1.busy - mach0.busy)
	cpu[stealColumn] = share(mach1.steal - mach0.steal)
	r.res.cpu[cpuKey] = append(r.res.cpu[cpuKey], cpu)
	if drops {
		after := r.dropSnapshot(p)
		rep := before.delta(after)
		rep.retrans = measured(float64(run.Retransmits), err)
		if err == nil && run.Retransmits < 0 {
			rep.retrans = measured(0, errNA)
		}
		r.res.drops[p.name+" "+dir] = rep
	}
	if err != nil {
		return 0, err
	}
	return run.Mbps, nil
}

// iperf runs iperf3 from p.ns to p.addr. "up" is client → target; reverse
// (-R) is target → client.
func (r *runner) iperf(p *benchPath, secs, streams int, reverse, loss bool) (iperfRun, error) {
	args := []string{"iperf3", "-c", p.addr, "-p", strconv.Itoa(iperfPort), "-t", strconv.Itoa(secs),
		"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "5000"}
	if reverse {
		args = append(args, "-R")
	}
	var profiled sync.WaitGroup
	if r.profileDir != "" && p.name == r.profilePath && streams == r.profileStreams && reverse == r.profileDown && loss == r.profileLoss {
		who := []struct{ name, ns string }{{"client", r.lab.NS.Client}, {"agent", r.lab.NS.Agent}}
		if p.name == "relay" {
			who = append(who, struct{ name, ns string }{"gateway", r.lab.NS.GW})
		}
		for _, who := range who {
			// save writes one of who's pprof endpoints (path and query
			// after /debug/pprof/) to its file in the profile directory.
			save := func(endpoint, suffix string) {
				file := filepath.Join(r.profileDir, who.name+suffix)
				url := fmt.Sprintf("http://%s/debug/pprof/%s", pprofAddr, endpoint)
				if _, stderr, err := lab.Run(r.ctx, who.ns, "curl", "-sS", "-f", "-o", file, url); err != nil {
					fmt.Printf("(%s failed: %v %s) ", filepath.Base(file), err, stderr)
				}
			}
			// The CPU profile, and over the same seconds the allocations
			// (a delta profile: what the garbage collector's share of the
			// CPU profile is paying for).
			for _, k := range []struct{ kind, suffix string }{{"profile", ".pprof"}, {"allocs", ".allocs.pprof"}} {
				profiled.Add(1)
				go func() {
					defer profiled.Done()
					save(fmt.Sprintf("%s?seconds=%d", k.kind, max(1, secs-1)), k.suffix)
				}()
			}
			profiled.Add(1)
			// In the middle of the run, the heap's live objects (at the
			// last collection: what the memory peak is made of), and an
			// execution trace of one second that shows what a CPU profile
			// cannot: where each goroutine waits (go tool trace).
			go func() {
				defer profiled.Done()
				select {
				case <-time.After(time.Duration(secs) * time.Second / 2):
				case <-r.ctx.Done():
					return
				}
				save("heap", ".heap.pprof")
				save("trace?seconds=1", ".trace")
			}()
		}
	}
	var out []byte
	var err error
	for attempt := 0; ; attempt++ {
		out, _, err = lab.Run(r.ctx, p.ns, args...)
		// The server still winding down the last test (its control
		// connection outlived a run under loss) says it is busy: wait and
		// ask again, a few times.
		if attempt >= 3 || !bytes.Contains(out, []byte("the server is busy")) || r.ctx.Err() != nil {
			break
		}
		time.Sleep(2 * time.Second)
	}
	r.iperfDrained(p.ns)
	profiled.Wait()
	run, perr := parseIperf(out)
	if perr != nil {
		// iperf3 -J reports its own errors in the JSON; prefer that.
		if err != nil && !strings.Contains(perr.Error(), "iperf3: ") {
			return iperfRun{}, err
		}
		return iperfRun{}, perr
	}
	return run, err
}

// iperfDrained waits (up to 10 s) until no TCP connection of ns to the
// iperf3 port is still open. iperf3 -c exits once it has the results, while
// its last message to the server (and its FIN) may still be in flight; under
// loss that can take a few resends. If the tunnel is torn down for the next
// path before they arrive, the server waits for them and answers every
// later test with "the server is busy" (a whole path of errors, seen once).
func (r *runner) iperfDrained(ns string) {
	deadline := time.Now().Add(10 * time.Second)
	for r.ctx.Err() == nil && time.Now().Before(deadline) {
		// Every state but listening, closed and TIME-WAIT (whose FIN
		// exchange is done).
		out, err := lab.Output(r.ctx, ns, "ss", "-Htn", "state", "connected", "exclude", "time-wait",
			fmt.Sprintf("dport = :%d", iperfPort))
		if err != nil || strings.TrimSpace(out) == "" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// dropSnap is one reading of the drop counters: nlvpn status per role, and
// the kernel's UDP counters per namespace.
type dropSnap struct {
	status    map[string]map[string]float64
	statusErr map[string]error
	udp       map[string]map[string]int64
	udpErr    map[string]error
}

// udpCountersShown are the kernel's UDP counters of packets the socket
// layer dropped (receive buffer full; any receive error).
var udpCountersShown = []string{"RcvbufErrors", "InErrors"}

// tcpCountersShown are the kernel's TCP counters shown for the namespaces
// whose sockets carry the tunneled TCP outside nlvpn (the agent's own
// sockets to the LAN host, and the LAN host's): receive-queue drops and
// pruning at the agent, loss probes, spurious timeouts and duplicate-SACKs
// (resends that were not needed) at either end.
var tcpCountersShown = []string{"TCPRcvQDrop", "PruneCalled", "TCPBacklogDrop", "TCPLossProbes", "TCPSpuriousRTOs", "TCPDSACKRecv", "TCPDSACKOldSent"}

// tcpNames are tcpCountersShown under the names udpCounters gives them.
func tcpNames() []string {
	var ns []string
	for _, n := range tcpCountersShown {
		ns = append(ns, "TcpExt "+n)
	}
	return ns
}

func (r *runner) dropSnapshot(p *benchPath) dropSnap {
	l := r.lab
	s := dropSnap{status: map[string]map[string]float64{}, statusErr: map[string]error{},
		udp: map[string]map[string]int64{}, udpErr: map[string]error{}}
	if p.nlvpn {
		for _, who := range []struct{ role, ns, dir string }{
			{"client", l.NS.Client, filepath.Join(r.dir, "client")},
			{"agent", l.NS.Agent, filepath.Join(r.dir, "agent")},
		} {
			ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
			out, _, err := lab.Run(ctx, who.ns, r.nlvpn, "status", "--json", "--state-dir", who.dir)
			cancel()
			if err != nil {
				// No status socket (yet) for this role.
				s.statusErr[who.role] = fmt.Errorf("%w: %v", errNA, err)
				continue
			}
			s.status[who.role], s.statusErr[who.role] = dropCounters(out)
		}
	}
	if p.nlvpn {
		// The gateway's relay counters (drops by reason, its UDP write
		// queue's among them), from its metrics endpoint.
		ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
		out, _, err := lab.Run(ctx, l.NS.GW, "curl", "-sS", "-f", "--noproxy", "*", "--max-time", "3", "http://"+gwMetricsAddr+"/relay")
		cancel()
		if err != nil {
			s.statusErr["gateway"] = fmt.Errorf("%w: %v", errNA, err)
		} else {
			s.status["gateway"], s.statusErr["gateway"] = dropCounters(out)
		}
	}
	for _, who := range []struct{ role, ns string }{{"client", l.NS.Client}, {"agent", l.NS.Agent}, {"gateway", l.NS.GW}, {"lan", l.NS.LAN}} {
		s.udp[who.role], s.udpErr[who.role] = udpCounters(r.ctx, who.ns)
	}
	return s
}

// delta turns two readings into a report of what changed between them.
func (s dropSnap) delta(after dropSnap) *dropReport {
	rep := &dropReport{status: map[string]statusDelta{}, udp: map[string]map[string]cell{}}
	for role, a := range after.status {
		b, ok := s.status[role]
		if !ok {
			rep.status[role] = statusDelta{err: fmt.Errorf("%w: no reading before the run", errNA)}
			continue
		}
		rep.status[role] = statusDelta{deltas: counterDelta(b, a)}
	}
	for role, err := range after.statusErr {
		if err != nil {
			rep.status[role] = statusDelta{err: err}
		}
	}
	for role, a := range after.udp {
		m := map[string]cell{}
		b := s.udp[role]
		for _, name := range append(udpCountersShown, tcpNames()...) {
			err := errors.Join(s.udpErr[role], after.udpErr[role])
			if err == nil && b == nil {
				err = errors.New("no reading before the run")
			}
			m[name] = measured(float64(a[name]-b[name]), err)
		}
		rep.udp[role] = m
	}
	return rep
}

// pingAvg returns the average RTT in ms of ping -c 100 -i 0.05 and keeps
// the minimum for pingMin (the average of an idle ping includes waking
// sleeping threads and CPUs, which a loaded VM makes slow and erratic).
// 100 pings, not 20: issue 7's target is 0.2 ms over wireguard-go, and 20
// samples on a shared machine moved the difference by more than that from
// run to run. (An interval under 0.2 s needs root, which the bench has.)
func (r *runner) pingAvg(p *benchPath) (float64, error) {
	out, err := lab.Output(r.ctx, p.ns, "ping", "-c", "100", "-i", "0.05", "-W", "2", "-q", p.addr)
	if err != nil {
		return 0, err
	}
	lo, avg, err := parsePing(out)
	if err != nil {
		return 0, err
	}
	r.res.pingMin[p.name] = append(r.res.pingMin[p.name], lo)
	return avg, nil
}

// pingMin returns the minimum RTT of the oldest pingAvg run on p it has
// not reported yet.
func (r *runner) pingMin(p *benchPath) (float64, error) {
	vals := r.res.pingMin[p.name]
	if len(vals) == 0 {
		return 0, errors.New("no ping run")
	}
	r.res.pingMin[p.name] = vals[1:]
	return vals[0], nil
}

// benchSOCKS compares a curl download through the TUN client with the
// same download through a netstack client's SOCKS5 proxy on the same nlvpn
// path (direct if measured, else relay).
func (r *runner) benchSOCKS(tunnelUp func() error, relayFlags []string) error {
	l, res := r.lab, r.res
	var flags []string
	res.curlVia = "relay"
	if r.supports("up", "--direct") && (r.only == nil || slices.Contains(r.only, "direct")) {
		flags, res.curlVia = []string{"--direct"}, "direct"
	} else {
		flags = relayFlags
	}
	stop, err := serveData(l.NS.LAN, net.JoinHostPort(l.LANHost.String(), strconv.Itoa(dataPort)))
	if err != nil {
		return fmt.Errorf("data server in %s: %w", l.NS.LAN, err)
	}
	defer stop()
	if r.client == nil || !r.client.Running() {
		say("Starting gateway, agent and client (nlvpn up %s) for the SOCKS comparison.", strings.Join(flags, " "))
		if err := r.startStack(false, tunnelUp, flags...); err != nil {
			res.curl = measured(0, err)
			return err
		}
	}
	fmt.Printf("    measuring curl down %d MiB through the TUN client (%s) ... ", curlSize>>20, res.curlVia)
	res.curl = measured(r.curlDown(l.NS.Client, l.LANHost.String(), nil))
	fmt.Println(res.curl.format(1))
	say("Replacing the TUN client with a netstack client (nlvpn up --netstack %s: SOCKS5 proxy on %s).", strings.Join(flags, " "), socksBenchAddr)
	r.client.Stop()
	if err := r.startNetstackClient(flags...); err != nil {
		res.sock = measured(0, err)
		return err
	}
	fmt.Printf("    measuring curl down %d MiB through the SOCKS5 proxy ... ", curlSize>>20)
	res.sock = measured(r.curlDown(l.NS.Client, l.LANHost.String(), []string{"--socks5-hostname", socksBenchAddr}))
	fmt.Println(res.sock.format(1))
	return errors.Join(res.curl.err, res.sock.err)
}

// dataPort is the HTTP data server's port on the LAN host.
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

// curlDown downloads curlSize bytes from addr's data server with curl
// (extra flags: e.g. a proxy) and returns MB/s (10^6 bytes per second, as
// curl's speed_download).
func (r *runner) curlDown(ns, addr string, extra []string) (float64, error) {
	args := []string{"env", "-u", "NO_PROXY", "-u", "no_proxy", "-u", "ALL_PROXY", "-u", "all_proxy", "-u", "http_proxy",
		"curl", "-sS", "-f", "-o", "/dev/null", "--max-time", "120", "-w", "%{size_download} %{speed_download}"}
	if len(extra) == 0 {
		args = append(args, "--noproxy", "*")
	}
	args = append(args, extra...)
	args = append(args, fmt.Sprintf("http://%s/data?size=%d", net.JoinHostPort(addr, strconv.Itoa(dataPort)), curlSize))
	out, _, err := lab.Run(r.ctx, ns, args...)
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
		args := append([]string{"up", "--netstack", "--socks5", socksBenchAddr, "--http-proxy", ""}, r.clientTokArgs...)
		args = append(append(args, "--gateway", r.gwAddr(),
			"--agent", agentName, "--state-dir", filepath.Join(r.dir, "client-socks")), flags...)
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
