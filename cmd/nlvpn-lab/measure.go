//go:build linux

package main

// Parsers and readers for the figures the bench collects besides
// throughput: iperf3's JSON report, a process's CPU time, the kernel's UDP
// counters and the drop counters in `nlvpn status --json`.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// iperfRun is what one iperf3 run reports.
type iperfRun struct {
	Mbps        float64 // received rate, Mbit/s (10^6 bit)
	Bytes       int64   // bytes the receiver got
	Retransmits int64   // TCP retransmits at the sender (-1: not reported)
}

// parseIperf reads `iperf3 -J` output. Whatever the direction, the
// receiving end's sum is the rate and byte count; iperf3 puts the sender's
// retransmits in end.sum_sent (with -R it fetches them from the server).
func parseIperf(data []byte) (iperfRun, error) {
	var res struct {
		Error string `json:"error"`
		End   *struct {
			SumSent struct {
				Retransmits *int64 `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived *struct {
				Bytes         int64   `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(data, &res); err != nil {
		return iperfRun{}, fmt.Errorf("parsing iperf3 -J: %w", err)
	}
	if res.Error != "" {
		return iperfRun{}, fmt.Errorf("iperf3: %s", res.Error)
	}
	if res.End == nil || res.End.SumReceived == nil {
		return iperfRun{}, errors.New("iperf3 -J: no end.sum_received")
	}
	r := res.End.SumReceived
	if r.Bytes < 0 || r.BitsPerSecond < 0 {
		return iperfRun{}, fmt.Errorf("iperf3 -J: negative result (%d bytes, %g bit/s)", r.Bytes, r.BitsPerSecond)
	}
	run := iperfRun{Mbps: r.BitsPerSecond / 1e6, Bytes: r.Bytes, Retransmits: -1}
	if rt := res.End.SumSent.Retransmits; rt != nil {
		run.Retransmits = *rt
	}
	return run, nil
}

// userHZ is the unit of the CPU times in /proc/PID/stat. Linux fixes it
// at 100 for user space on every architecture (sysconf(_SC_CLK_TCK)).
const userHZ = 100

// parseProcStatCPU returns utime+stime (all threads) from the contents of
// /proc/PID/stat. The command name, in parentheses, may itself contain
// spaces and parentheses, so the fields are counted from the last ')'.
func parseProcStatCPU(data []byte) (time.Duration, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("/proc/PID/stat: no ')' after the command name")
	}
	f := strings.Fields(string(data[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/PID/stat: %d fields after the command name, want at least 13", len(f))
	}
	var ticks uint64
	for _, s := range f[11:13] {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/PID/stat: CPU time %q: %v", s, err)
		}
		ticks += n
	}
	if ticks > uint64(1<<62)/uint64(time.Second) {
		return 0, fmt.Errorf("/proc/PID/stat: CPU time of %d ticks is out of range", ticks)
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// procCPU returns the CPU time (user+system) used so far by process pid.
func procCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseProcStatCPU(data)
}

// machineTimes is the whole machine's CPU time, all CPUs together, from
// the "cpu" line of /proc/stat (which network namespaces do not split).
type machineTimes struct {
	busy    time.Duration // user, nice, system, irq and softirq
	softirq time.Duration // of which in softirq: veth, forwarding, the NATs, TUN and socket receive
	steal   time.Duration // the hypervisor gave the CPUs to another machine
}

// parseMachineCPU reads the first line of /proc/stat: "cpu user nice system
// idle iowait irq softirq steal guest guest_nice" in USER_HZ ticks. Idle,
// iowait and steal (time the hypervisor gave to another machine) are not
// work done here; guest time is already in user.
func parseMachineCPU(data []byte) (machineTimes, error) {
	line, _, _ := bytes.Cut(data, []byte{'\n'})
	f := strings.Fields(string(line))
	if len(f) < 8 || f[0] != "cpu" {
		return machineTimes{}, fmt.Errorf("/proc/stat: first line %q is not the \"cpu\" total", line)
	}
	var t [8]uint64 // steal, the 8th, is missing on old kernels
	for i := range min(len(t), len(f)-1) {
		n, err := strconv.ParseUint(f[i+1], 10, 64)
		if err != nil || n > uint64(1<<62)/uint64(time.Second) {
			return machineTimes{}, fmt.Errorf("/proc/stat: CPU time %q is not a tick count in range", f[i+1])
		}
		t[i] = n
	}
	user, nice, system, irq, softirq, steal := t[0], t[1], t[2], t[5], t[6], t[7]
	ticks := func(n uint64) time.Duration { return time.Duration(n) * time.Second / userHZ }
	return machineTimes{busy: ticks(user + nice + system + irq + softirq), softirq: ticks(softirq), steal: ticks(steal)}, nil
}

// machineCPU returns the machine's CPU time used so far.
func machineCPU() (machineTimes, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return machineTimes{}, err
	}
	return parseMachineCPU(data)
}

// parseProcStatusKB returns a "Key:   N kB" field of /proc/PID/status, in kB.
func parseProcStatusKB(data []byte, key string) (int64, error) {
	for line := range strings.Lines(string(data)) {
		name, val, ok := strings.Cut(line, ":")
		if !ok || name != key {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("/proc/PID/status: %s: %q is not \"N kB\"", key, strings.TrimSpace(val))
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, fmt.Errorf("/proc/PID/status: no %s", key)
}

// procPeakRSS returns the peak resident set size (VmHWM) of process pid.
func procPeakRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	kb, err := parseProcStatusKB(data, "VmHWM")
	return kb << 10, err
}

// parseSNMP returns the counters of one protocol ("Udp", "Tcp", ...) from
// /proc/net/snmp, where each protocol has a line of names followed by a
// line of values, both starting with "Proto:".
func parseSNMP(data []byte, proto string) (map[string]int64, error) {
	prefix := proto + ":"
	var lines []string
	for line := range strings.Lines(string(data)) {
		if f := strings.Fields(line); len(f) > 0 && f[0] == prefix {
			lines = append(lines, line)
		}
	}
	if len(lines) != 2 {
		return nil, fmt.Errorf("/proc/net/snmp: %d %q lines, want 2 (names, values)", len(lines), prefix)
	}
	names, vals := strings.Fields(lines[0])[1:], strings.Fields(lines[1])[1:]
	if len(names) != len(vals) || len(names) == 0 {
		return nil, fmt.Errorf("/proc/net/snmp: %s has %d names and %d values", proto, len(names), len(vals))
	}
	out := make(map[string]int64, len(names))
	for i, n := range names {
		v, err := strconv.ParseInt(vals[i], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("/proc/net/snmp: %s %s = %q: %v", proto, n, vals[i], err)
		}
		out[n] = v
	}
	return out, nil
}

// udpCounters reads the UDP counters of namespace ns (/proc/net/snmp shows
// the reading process's namespace).
func udpCounters(ctx context.Context, ns string) (map[string]int64, error) {
	out, _, err := lab.Run(ctx, ns, "cat", "/proc/net/snmp")
	if err != nil {
		return nil, err
	}
	m, err := parseSNMP(out, "Udp")
	if err != nil {
		return nil, err
	}
	// TCP's own drops and repairs (/proc/net/netstat, "TcpExt"), under
	// "TcpExt " names: where a tunneled download's TCP peers lose or
	// resend packets outside nlvpn's own queues.
	if out, _, err := lab.Run(ctx, ns, "cat", "/proc/net/netstat"); err == nil {
		if ext, err := parseSNMP(out, "TcpExt"); err == nil {
			for k, v := range ext {
				m["TcpExt "+k] = v
			}
		}
	}
	return m, nil
}

// netstackSenderCounters are the agent netstack's TCP counters (status
// "tcp") the drop table shows beside the drops: on a download the agent's
// gVisor TCP is the tunnel's sender, and its retransmission timeouts (often
// spurious: a scheduling stall past its minimum RTO, which gVisor detects
// but does not undo) can cost a single stream more than any drop.
var netstackSenderCounters = map[string]bool{
	"tcp.timeouts": true, "tcp.spurious_rto_recovery": true, "tcp.fast_retransmit": true, "tcp.retransmits": true,
}

// dropCounters picks, from one JSON object, every number whose name
// contains "drop" or "lost", at any depth, and the netstackSenderCounters:
// nested objects contribute "outer.inner" names, so an object field
// "drops" (name -> count) gives one entry per name. Other fields are
// ignored.
func dropCounters(data []byte) (map[string]float64, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("parsing status JSON: %w", err)
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("status JSON is a %T, not an object", v)
	}
	out := map[string]float64{}
	var walk func(prefix string, m map[string]any, depth int)
	walk = func(prefix string, m map[string]any, depth int) {
		for k, v := range m {
			name := prefix + k
			switch v := v.(type) {
			case json.Number:
				l := strings.ToLower(name)
				if strings.Contains(l, "drop") || strings.Contains(l, "lost") || netstackSenderCounters[l] {
					if f, err := v.Float64(); err == nil {
						out[name] = f
					}
				}
			case map[string]any:
				// Bounded: status objects are shallow; deeper ones are not counters.
				if depth < 4 {
					walk(name+".", v, depth+1)
				}
			}
		}
	}
	walk("", obj, 0)
	return out, nil
}

// counterDelta returns after-before per name (names only in after count
// from zero), sorted by name.
func counterDelta(before, after map[string]float64) []namedValue {
	out := make([]namedValue, 0, len(after))
	for k, a := range after {
		out = append(out, namedValue{k, a - before[k]})
	}
	slices.SortFunc(out, func(a, b namedValue) int { return strings.Compare(a.name, b.name) })
	return out
}

type namedValue struct {
	name string
	v    float64
}

var rttRE = regexp.MustCompile(`rtt min/avg/max/mdev = ([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+) ms`)

// parsePing returns the minimum and average RTT, in ms, from the summary
// line of iputils ping.
func parsePing(out string) (lo, avg float64, err error) {
	m := rttRE.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("no RTT in ping output: %q", out)
	}
	lo, err1 := strconv.ParseFloat(m[1], 64)
	avg, err2 := strconv.ParseFloat(m[2], 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, 0, fmt.Errorf("ping RTT %q: %v", m[0], err)
	}
	if lo > avg {
		return 0, 0, fmt.Errorf("ping RTT %q: min above avg", m[0])
	}
	return lo, avg, nil
}
