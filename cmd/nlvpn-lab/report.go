//go:build linux

package main

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// printTable prints rows (the first is the header) with the first column
// left-aligned and the others right-aligned, two spaces apart.
func printTable(rows [][]string) {
	var width []int
	for _, row := range rows {
		for i, s := range row {
			if i >= len(width) {
				width = append(width, 0)
			}
			width[i] = max(width[i], len([]rune(s)))
		}
	}
	for _, row := range rows {
		var b strings.Builder
		b.WriteString("    ")
		for i, s := range row {
			pad := strings.Repeat(" ", width[i]-len([]rune(s)))
			if i == 0 {
				b.WriteString(s + pad)
			} else {
				b.WriteString("  " + pad + s)
			}
		}
		fmt.Println(strings.TrimRight(b.String(), " "))
	}
}

// ratio formats a/b, or "-" when either is missing.
func ratio(a, b cell) string {
	if !a.good() || !b.good() || b.v == 0 {
		return "-"
	}
	return fmt.Sprintf("%.3f", a.v/b.v)
}

func (res *benchResults) has(path string) bool {
	return slices.ContainsFunc(res.paths, func(p *benchPath) bool { return p.name == path })
}

func (res *benchResults) print() {
	say("Results: one run, one topology (client behind a cone NAT, agent behind a cone NAT, LAN host behind the agent).\n"+
		"    Load average (1/5/15 min) at the start: %s, at the end: %s (%d CPUs; other work skews every column).\n"+
		"    Kernel TCP congestion control in the namespaces (every sender but the agent's gVisor netstack): %s.", res.loadStart, res.loadEnd, runtime.NumCPU(), res.kernelCC)
	fmt.Println("    Columns:")
	for _, p := range res.paths {
		fmt.Printf("      %-6s = %s\n", p.name, p.desc)
	}
	fmt.Printf(`    Rows: TCP = iperf3 -t %d, Mbit/s (10^6 bit/s) of payload received; up = the client sends, down = iperf3 -R;
          N streams = iperf3 -P N. ping = average and minimum RTT of one ping -c 100 -i 0.05 to the target.
          %d%% loss = the internet router drops %d%% of the packets it forwards, at random (nftables
          "numgen random mod 100 < %d drop"), so each direction loses %d%%; the relay path crosses
          the router twice each way (client-gateway, gateway-agent) and loses ~%d%%.
    Ratios: wg/raw, direct/wg (the target: >= 1.0, >= 0.8 under loss), relay/direct (>= 0.7);
          for ping the ratio of RTTs (the target is a difference, printed below the table).
`, res.secs, lossPct, lossPct, lossPct, lossPct, 2*lossPct)
	fmt.Println()
	ratios := [][2]string{{"wg", "raw"}, {"direct", "wg"}, {"routed", "wg"}, {"relay", "direct"}}
	head := []string{"metric"}
	for _, p := range res.paths {
		head = append(head, p.name)
	}
	for _, rt := range ratios {
		head = append(head, rt[0]+"/"+rt[1])
	}
	table := [][]string{head}
	for _, row := range res.rows {
		line := []string{row.name}
		cells := res.cells[row.name]
		for _, p := range res.paths {
			line = append(line, cells[p.name].format(row.prec))
		}
		for _, rt := range ratios {
			line = append(line, ratio(cells[rt[0]], cells[rt[1]]))
		}
		table = append(table, line)
	}
	printTable(table)
	if res.repeat > 1 {
		fmt.Printf("    Each row measured %d times on each path, one path after another (the table shows the\n"+
			"    median, and so is each CPU figure; drop counters are from the last time, a loss row's TCP\n"+
			"    counters add up all of them):\n", res.repeat)
		for _, row := range res.rows {
			for _, p := range res.paths {
				if vals := res.samples[row.name][p.name]; len(vals) > 0 {
					s := make([]string, len(vals))
					for i, v := range vals {
						s[i] = strconv.FormatFloat(v, 'f', row.prec, 64)
					}
					fmt.Printf("      %-30s %-6s %s\n", row.name, p.name, strings.Join(s, " "))
				}
			}
		}
	}
	for _, stat := range []string{"avg", "min"} {
		ping := res.cells["ping RTT "+stat+" (ms)"]
		var diffs []string
		for _, p := range []string{"direct", "routed", "relay"} {
			if ping[p].good() && ping["wg"].good() {
				diffs = append(diffs, fmt.Sprintf("%s - wg = %+.3f ms", p, ping[p].v-ping["wg"].v))
			}
		}
		if len(diffs) > 0 {
			fmt.Printf("    ping RTT %s: %s (target: direct - wg <= +0.2 ms)\n", stat, strings.Join(diffs, ", "))
		}
	}

	res.printCPU()
	res.printDrops()
	if res.curl.ok || res.sock.ok {
		say("TUN client vs SOCKS5 (netstack) client on the %s path: one HTTP GET of %d MiB with curl, MB/s (10^6 bytes/s).", res.curlVia, curlSize>>20)
		printTable([][]string{
			{"metric", res.curlVia + " TUN", "socks", "socks/TUN"},
			{fmt.Sprintf("curl down %d MiB (MB/s)", curlSize>>20), res.curl.format(1), res.sock.format(1), ratio(res.sock, res.curl)},
		})
	}
	if s := res.startup; s != nil {
		say("Startup: %d trials of `nlvpn up` (default mode), from the start of the process.", s.n)
		printTable([][]string{
			{"from `nlvpn up` to", "median", "max", "trials"},
			{"first TCP handshake through tunnel", fmtDur(median(s.first)), fmtDur(maxDur(s.first)), fmt.Sprintf("%d/%d", len(s.first), s.n)},
			{"path reported \"direct\"", fmtDur(median(s.direct)), fmtDur(maxDur(s.direct)), fmt.Sprintf("%d/%d", len(s.direct), s.n)},
		})
	}
}

// cpuColumns are the CPU table's columns.
var cpuColumns = append(slices.Clone(roleNames), machineColumn, softirqColumn, busyColumn, stealColumn)

// cpuLossSuffix marks the CPU figures of a run with 2 % loss.
const cpuLossSuffix = ", 2% loss"

func (res *benchResults) printCPU() {
	var table [][]string
	for _, p := range res.paths {
		for _, dir := range append(slices.Clone(runDirs), "up"+cpuLossSuffix, "down"+cpuLossSuffix) {
			runs, ok := res.cpu[p.name+" "+dir]
			if !ok {
				continue
			}
			line := []string{p.name + " " + dir}
			for _, col := range cpuColumns {
				prec := 2
				if col == busyColumn || col == stealColumn {
					prec = 0
				}
				cs := make([]cell, len(runs))
				for i, m := range runs {
					cs[i] = m[col]
				}
				line = append(line, medianCell(cs).format(prec))
			}
			table = append(table, line)
		}
	}
	if len(table) == 0 {
		return
	}
	say("CPU seconds per GB, without and with 2%% loss (x4: four streams): utime+stime of each process (/proc/PID/stat)\n" +
		"    across the iperf3 run, divided by the bytes iperf3 received (GB = 10^9 bytes); wg: the wireguard-go\n" +
		"    ends. machine: the busy time of all CPUs together (/proc/stat: user, nice, system, irq, softirq)\n" +
		"    over the same run, which counts what the roles do not: both iperf3 ends, the kernel's TCP, TUN,\n" +
		"    veth, forwarding and NAT work, and anything else the machine ran; softirq: its softirq part. busy %%:\n" +
		"    that time as a share of all CPUs over the run (its connection setup included); near 100 the rate is\n" +
		"    what the CPUs allow, about their seconds divided by the machine column, and well below it something\n" +
		"    waited. steal %%: time the hypervisor gave this machine's CPUs to another (other work skews the run).")
	printTable(append([][]string{append([]string{"run"}, cpuColumns...)}, table...))
	var rss [][]string
	for _, p := range res.paths {
		if m, ok := res.rss[p.name]; ok {
			line := []string{p.name}
			for _, ro := range roleNames {
				line = append(line, m[ro].format(1))
			}
			rss = append(rss, line)
		}
	}
	if len(rss) > 0 {
		fmt.Println()
		fmt.Println("    Peak resident memory (VmHWM, MiB) of each process after all the runs on its path:")
		printTable(append([][]string{append([]string{"path"}, roleNames...)}, rss...))
	}
}

func (res *benchResults) printDrops() {
	var cols []string
	for _, p := range res.paths {
		for _, dir := range runDirs {
			if _, ok := res.drops[p.name+" "+dir]; ok && p.name != "raw" {
				cols = append(cols, p.name+" "+dir)
			}
		}
	}
	if len(cols) == 0 {
		return
	}
	say("Drop counters across the runs without loss, up and down, one stream and four (x4) (after - before): the TCP sender's\n" +
		"    retransmits (on downloads the LAN host is the sender), every number in\n" +
		"    `nlvpn status --json` whose name has \"drop\" or \"lost\" (client; agent: its own state dir, n/a\n" +
		"    while the agent has no status socket), the agent netstack's TCP timeouts and retransmits (tcp.*: on a\n" +
		"    download it is the tunnel's sender), the gateway's relay counters (its /relay), and the kernel's\n" +
		"    UDP RcvbufErrors and InErrors per namespace, and the kernel's TCP drops and resends (TcpExt) where the\n" +
		"    tunneled TCP leaves nlvpn: the agent's sockets and the LAN host.")
	table := [][]string{append([]string{"counter"}, cols...)}
	line := []string{"TCP retransmits (iperf3 sender)"}
	for _, c := range cols {
		line = append(line, res.drops[c].retrans.format(0))
	}
	table = append(table, line)
	anyNLVPN := slices.ContainsFunc(res.paths, func(p *benchPath) bool {
		return p.nlvpn && (res.drops[p.name+" up"] != nil || res.drops[p.name+" down"] != nil)
	})
	for _, role := range []string{"client", "agent", "gateway"} {
		if !anyNLVPN {
			break
		}
		// The union of the counter names this role reported on any path.
		var names []string
		for _, c := range cols {
			for _, nv := range res.drops[c].status[role].deltas {
				if !slices.Contains(names, nv.name) {
					names = append(names, nv.name)
				}
			}
		}
		slices.Sort(names)
		for _, name := range names {
			line := []string{"nlvpn " + role + ": " + name}
			for _, c := range cols {
				sd, ok := res.drops[c].status[role]
				i := slices.IndexFunc(sd.deltas, func(nv namedValue) bool { return nv.name == name })
				switch {
				case !ok:
					line = append(line, "-")
				case sd.err != nil:
					line = append(line, cell{err: sd.err, ok: true}.format(0))
				case i < 0:
					line = append(line, "-")
				default:
					line = append(line, fmt.Sprintf("%.0f", sd.deltas[i].v))
				}
			}
			table = append(table, line)
		}
		if len(names) == 0 {
			// No counters from this role anywhere: say why, once.
			line := []string{"nlvpn " + role + ": status"}
			for _, c := range cols {
				sd, ok := res.drops[c].status[role]
				switch {
				case !ok:
					line = append(line, "-")
				case sd.err != nil:
					line = append(line, cell{err: sd.err, ok: true}.format(0))
				default:
					line = append(line, "none")
				}
			}
			table = append(table, line)
		}
	}
	for _, role := range roleNames {
		for _, name := range udpCountersShown {
			line := []string{fmt.Sprintf("UDP %s, %s ns", name, role)}
			for _, c := range cols {
				line = append(line, res.drops[c].udp[role][name].format(0))
			}
			table = append(table, line)
		}
	}
	for _, role := range []string{"agent", "lan"} {
		for _, name := range tcpCountersShown {
			line := []string{fmt.Sprintf("TCP %s, %s ns", name, role)}
			for _, c := range cols {
				line = append(line, res.drops[c].udp[role]["TcpExt "+name].format(0))
			}
			table = append(table, line)
		}
	}
	printTable(table)
	for _, c := range cols {
		for role, sd := range res.drops[c].status {
			if sd.err != nil && !errors.Is(sd.err, errNA) {
				fmt.Printf("    (%s, %s status: %v)\n", c, role, sd.err)
			}
		}
	}
}

// startupResult is what startupTrials measured.
type startupResult struct {
	n             int
	first, direct []time.Duration
}
