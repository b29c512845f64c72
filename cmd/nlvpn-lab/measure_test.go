//go:build linux

package main

import (
	"errors"
	"maps"
	"os"
	"slices"
	"testing"
	"time"
)

// A trimmed `iperf3 -c ... -R -J` report (iperf 3.12): the rate and bytes
// are the receiver's, the retransmits the sender's.
const iperfReverse = `{"start":{"test_start":{"protocol":"TCP","num_streams":2,"reverse":1}},
 "intervals":[],
 "end":{"streams":[],
  "sum_sent":{"start":0,"end":1.000371,"seconds":1.000371,"bytes":1749811200,"bits_per_second":13993298086.409943,"retransmits":17,"sender":false},
  "sum_received":{"start":0,"end":1.000311,"seconds":1.000311,"bytes":1742209024,"bits_per_second":13933338923.594763,"sender":false},
  "cpu_utilization_percent":{}}}`

func TestParseIperf(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    iperfRun
		wantErr bool
	}{
		{"reverse run", iperfReverse, iperfRun{Mbps: 13933.338923594763, Bytes: 1742209024, Retransmits: 17}, false},
		{"no retransmits field", `{"end":{"sum_sent":{},"sum_received":{"bytes":1000,"bits_per_second":8000}}}`,
			iperfRun{Mbps: 0.008, Bytes: 1000, Retransmits: -1}, false},
		{"iperf3 error", `{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}`, iperfRun{}, true},
		{"no end", `{"start":{}}`, iperfRun{}, true},
		{"no sum_received", `{"end":{"sum_sent":{"bytes":5}}}`, iperfRun{}, true},
		{"negative bytes", `{"end":{"sum_received":{"bytes":-1,"bits_per_second":1}}}`, iperfRun{}, true},
		{"not JSON", `iperf3: error - unable to connect`, iperfRun{}, true},
		{"empty", ``, iperfRun{}, true},
	}
	for _, tt := range tests {
		checkParse(t, tt.name, parseIperf, tt.in, tt.want, tt.wantErr)
	}
}

// checkParse runs one case of a parser's table: an error exactly when one
// is wanted, and otherwise the wanted value.
func checkParse[T comparable](t *testing.T, name string, parse func([]byte) (T, error), in string, want T, wantErr bool) {
	t.Helper()
	t.Run(name, func(t *testing.T) {
		got, err := parse([]byte(in))
		if (err != nil) != wantErr {
			t.Fatalf("err = %v, wantErr %v", err, wantErr)
		}
		if got != want {
			t.Errorf("got %+v, want %+v", got, want)
		}
	})
}

func TestParseProcStatCPU(t *testing.T) {
	// Fields 14 and 15 (utime, stime) are 250 and 120 ticks here.
	const tail = " S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 120 0 0 20 0 12 0 99999 1234567 890 18446744073709551615"
	tests := []struct {
		name    string
		in      string
		want    time.Duration
		wantErr bool
	}{
		{"plain", "4242 (nlvpn)" + tail, 3700 * time.Millisecond, false},
		{"name with spaces and parens", "4242 (a) b (c))" + tail, 3700 * time.Millisecond, false},
		{"zero", "1 (x) R 0 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0", 0, false},
		{"no parenthesis", "4242 nlvpn" + tail, 0, true},
		{"truncated", "4242 (nlvpn) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250", 0, true},
		{"utime not a number", "4242 (nlvpn) S 1 4242 4242 0 -1 4194560 1000 0 0 0 x 120", 0, true},
		{"negative stime", "4242 (nlvpn) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 -120", 0, true},
		{"absurd", "4242 (nlvpn) S 1 4242 4242 0 -1 4194560 1000 0 0 0 18446744073709551615 0", 0, true},
	}
	for _, tt := range tests {
		checkParse(t, tt.name, parseProcStatCPU, tt.in, tt.want, tt.wantErr)
	}
}

// TestParseMachineCPU: the machine's busy time is user, nice, system, irq
// and softirq; idle, iowait and steal are not counted.
func TestParseMachineCPU(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    machineTimes
		wantErr bool
	}{
		// user 300, nice 10, system 200, idle 5000, iowait 40, irq 5, softirq 85, steal 70
		{"full line", "cpu  300 10 200 5000 40 5 85 70 0 0\ncpu0 150 5 100 2500 20 2 40 35 0 0\n",
			machineTimes{busy: 6 * time.Second, softirq: 850 * time.Millisecond, steal: 700 * time.Millisecond}, false},
		{"old kernel, no steal column", "cpu 100 0 100 900 0 0 0\n", machineTimes{busy: 2 * time.Second}, false},
		{"per-CPU line first", "cpu0 1 2 3 4 5 6 7 8\n", machineTimes{}, true},
		{"too short", "cpu 1 2 3\n", machineTimes{}, true},
		{"not a number", "cpu 1 2 x 4 5 6 7 8\n", machineTimes{}, true},
		{"absurd", "cpu 18446744073709551615 0 0 0 0 0 0 0\n", machineTimes{}, true},
		{"empty", "", machineTimes{}, true},
	}
	for _, tt := range tests {
		checkParse(t, tt.name, parseMachineCPU, tt.in, tt.want, tt.wantErr)
	}
}

// TestMachineCPUMoves: the reader sees this machine's counters move while
// this test spins.
func TestMachineCPUMoves(t *testing.T) {
	before, err := machineCPU()
	if err != nil {
		t.Fatal(err)
	}
	spinUntil(t, "the machine's busy time", func() (time.Duration, error) {
		after, err := machineCPU()
		if err == nil && after.softirq < before.softirq {
			t.Fatalf("softirq went back: %v -> %v", before.softirq, after.softirq)
		}
		return after.busy - before.busy, err
	})
}

// TestProcCPUSelf: the reader sees a real /proc/PID/stat change, not a
// constant, while this test spins.
func TestProcCPUSelf(t *testing.T) {
	before, err := procCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	spinUntil(t, "our CPU time", func() (time.Duration, error) {
		after, err := procCPU(os.Getpid())
		return after - before, err
	})
}

// spinUntil keeps a CPU busy until grown reports 50 ms more CPU time,
// failing the test after 10 s.
func spinUntil(t *testing.T, what string, grown func() (time.Duration, error)) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for x := 0; time.Now().Before(deadline); x++ {
		if x%1_000_000 != 0 {
			continue
		}
		d, err := grown()
		if err != nil {
			t.Fatal(err)
		}
		if d >= 50*time.Millisecond {
			return
		}
	}
	t.Fatalf("%s did not grow by 50 ms in 10 s of spinning", what)
}

func TestParseProcStatusKB(t *testing.T) {
	const status = "Name:\tnlvpn\nVmPeak:\t 1300000 kB\nVmHWM:\t   31744 kB\nVmRSS:\t   30000 kB\nThreads:\t12\n"
	tests := []struct {
		name, in, key string
		want          int64
		wantErr       bool
	}{
		{"VmHWM", status, "VmHWM", 31744, false},
		{"VmRSS", status, "VmRSS", 30000, false},
		{"prefix is not a match", status, "Vm", 0, true},
		{"missing", "Name:\tx\n", "VmHWM", 0, true},
		{"no unit", "VmHWM:\t31744\n", "VmHWM", 0, true},
		{"not a number", "VmHWM:\tlots kB\n", "VmHWM", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStatusKB([]byte(tt.in), tt.key)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("got %d, want %d", got, tt.want)
			}
		})
	}
}

// From a 6.x kernel, trimmed to the lines that matter.
const snmp = `Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 123
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 904417 3 12 901234 11 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
`

func TestParseSNMP(t *testing.T) {
	tests := []struct {
		name, in, proto string
		want            map[string]int64
		wantErr         bool
	}{
		{"Udp, not UdpLite", snmp, "Udp", map[string]int64{"InDatagrams": 904417, "NoPorts": 3, "InErrors": 12, "OutDatagrams": 901234,
			"RcvbufErrors": 11, "SndbufErrors": 0, "InCsumErrors": 0, "IgnoredMulti": 0, "MemErrors": 0}, false},
		{"UdpLite", snmp, "UdpLite", map[string]int64{"InDatagrams": 0, "NoPorts": 0, "InErrors": 0, "OutDatagrams": 0,
			"RcvbufErrors": 0, "SndbufErrors": 0, "InCsumErrors": 0, "IgnoredMulti": 0, "MemErrors": 0}, false},
		{"negative (Tcp MaxConn)", "Tcp: RtoAlgorithm MaxConn\nTcp: 1 -1\n", "Tcp", map[string]int64{"RtoAlgorithm": 1, "MaxConn": -1}, false},
		{"missing protocol", snmp, "Tcp", nil, true},
		{"names only", "Udp: InDatagrams NoPorts\n", "Udp", nil, true},
		{"count mismatch", "Udp: InDatagrams NoPorts\nUdp: 1\n", "Udp", nil, true},
		{"not a number", "Udp: InDatagrams\nUdp: many\n", "Udp", nil, true},
		{"empty lines", "Udp:\nUdp:\n", "Udp", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSNMP([]byte(tt.in), tt.proto)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestDropCounters(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    map[string]float64
		wantErr bool
	}{
		{"client status",
			`{"agent":"miranda","path":"direct","rtt_ms":0.4,"tx_bytes":99,"drops_queue_full":3,"quic_packets_sent":10,"quic_packets_lost":2,"drops_tun_write":0}`,
			map[string]float64{"drops_queue_full": 3, "quic_packets_lost": 2, "drops_tun_write": 0}, false},
		{"drops map and nesting",
			`{"drops":{"gvisor_nic":5,"socket":0},"session":{"Lost":1,"sent":9},"note":"dropped","dropped_list":[1,2]}`,
			map[string]float64{"drops.gvisor_nic": 5, "drops.socket": 0, "session.Lost": 1}, false},
		{"agent netstack sender", `{"tcp":{"timeouts":3,"spurious_rto_recovery":2,"segments_sent":900,"fast_retransmit":0,"retransmits":41},"timeouts":7}`,
			map[string]float64{"tcp.timeouts": 3, "tcp.spurious_rto_recovery": 2, "tcp.fast_retransmit": 0, "tcp.retransmits": 41}, false},
		{"nothing matches", `{"path":"relay","tx_bytes":1}`, map[string]float64{}, false},
		{"not an object", `[{"drops":1}]`, nil, true},
		{"not JSON", `no running tunnel found`, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := dropCounters([]byte(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCounterDelta(t *testing.T) {
	got := counterDelta(map[string]float64{"b": 5, "gone": 7}, map[string]float64{"b": 8, "a": 2})
	want := []namedValue{{"a", 2}, {"b", 3}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("got %v, want %v", got, want)
	}
}

func FuzzParseIperf(f *testing.F) {
	f.Add([]byte(iperfReverse))
	f.Add([]byte(`{"end":{"sum_received":{"bytes":1,"bits_per_second":8}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseIperf(b)
		if err == nil && (r.Bytes < 0 || r.Mbps < 0) {
			t.Fatalf("accepted a negative result: %+v", r)
		}
	})
}

func FuzzParseProcStatCPU(f *testing.F) {
	f.Add([]byte("4242 (a b) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 120 0 0 20 0 12 0"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if d, err := parseProcStatCPU(b); err == nil && d < 0 {
			t.Fatalf("negative CPU time %v", d)
		}
	})
}

func FuzzParseSNMP(f *testing.F) {
	f.Add([]byte(snmp), "Udp")
	f.Fuzz(func(t *testing.T, b []byte, proto string) {
		m, err := parseSNMP(b, proto)
		if err == nil && len(m) == 0 {
			t.Fatal("no error and no counters")
		}
	})
}

func FuzzDropCounters(f *testing.F) {
	f.Add([]byte(`{"drops":{"x":1},"quic_packets_lost":2}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		dropCounters(b)
	})
}

func TestDropSnapDelta(t *testing.T) {
	before := dropSnap{
		status:    map[string]map[string]float64{"client": {"drops_inbound": 4, "quic_packets_lost": 10}},
		statusErr: map[string]error{"client": nil, "agent": errNA},
		udp:       map[string]map[string]int64{"client": {"RcvbufErrors": 7, "InErrors": 9}, "agent": {"RcvbufErrors": 0, "InErrors": 0}},
		udpErr:    map[string]error{"client": nil, "agent": nil},
	}
	after := dropSnap{
		status:    map[string]map[string]float64{"client": {"drops_inbound": 4, "quic_packets_lost": 25}, "agent": {"drops.gvisor": 3}},
		statusErr: map[string]error{"client": nil, "agent": nil},
		udp:       map[string]map[string]int64{"client": {"RcvbufErrors": 12, "InErrors": 9}, "agent": {"RcvbufErrors": 1, "InErrors": 2}},
		udpErr:    map[string]error{"client": nil, "agent": nil},
	}
	rep := before.delta(after)
	if got, want := rep.status["client"].deltas, []namedValue{{"drops_inbound", 0}, {"quic_packets_lost", 15}}; len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("client status delta = %v, want %v", got, want)
	}
	// The agent had no reading before the run: no delta, and not a failure.
	if sd := rep.status["agent"]; sd.deltas != nil || !errors.Is(sd.err, errNA) {
		t.Errorf("agent status = %+v, want n/a", sd)
	}
	for role, want := range map[string][2]float64{"client": {5, 0}, "agent": {1, 2}} {
		got := rep.udp[role]
		if !got["RcvbufErrors"].good() || got["RcvbufErrors"].v != want[0] || !got["InErrors"].good() || got["InErrors"].v != want[1] {
			t.Errorf("%s UDP = %+v, want RcvbufErrors %v InErrors %v", role, got, want[0], want[1])
		}
	}
	// A failed reading shows as an error, not as a zero.
	after.udpErr["agent"] = errors.New("netns gone")
	if c := before.delta(after).udp["agent"]["InErrors"]; c.good() {
		t.Errorf("UDP delta after a failed reading = %+v, want an error", c)
	}
}

func TestParsePing(t *testing.T) {
	const ok = `PING 192.168.77.10 (192.168.77.10) 56(84) bytes of data.

--- 192.168.77.10 ping statistics ---
20 packets transmitted, 20 received, 0% packet loss, time 3805ms
rtt min/avg/max/mdev = 0.488/4.000/45.367/10.036 ms
`
	tests := []struct {
		name    string
		in      string
		lo, avg float64
		wantErr bool
	}{
		{"summary", ok, 0.488, 4.0, false},
		{"all lost", "20 packets transmitted, 0 received, 100% packet loss, time 3805ms\n", 0, 0, true},
		{"min above avg", "rtt min/avg/max/mdev = 5.0/4.0/6.0/0.1 ms\n", 0, 0, true},
		{"malformed number", "rtt min/avg/max/mdev = 1.2.3/4.0/6.0/0.1 ms\n", 0, 0, true},
		{"empty", "", 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lo, avg, err := parsePing(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if lo != tt.lo || avg != tt.avg {
				t.Errorf("got min %v avg %v, want %v %v", lo, avg, tt.lo, tt.avg)
			}
		})
	}
}

// TestMedian: --repeat shows the median of each row's runs; one slow run on
// a shared machine must not move it, and the input order must not matter.
func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{900}, 900},
		{[]float64{1200, 300, 1100}, 1100},       // odd: the middle one
		{[]float64{1000, 1400, 200, 1200}, 1100}, // even: the mean of the middle two
	} {
		in := slices.Clone(tc.in)
		if got := median(tc.in); got != tc.want {
			t.Errorf("median(%v) = %v, want %v", tc.in, got, tc.want)
		}
		if !slices.Equal(in, tc.in) {
			t.Errorf("median reordered its input: %v, was %v", tc.in, in)
		}
	}
	if got := median([]time.Duration{3 * time.Second, time.Second, 2 * time.Second}); got != 2*time.Second {
		t.Errorf("median of durations = %v, want 2s", got)
	}
}

// With --repeat the CPU table shows each figure's median over the runs, so
// one run on a busy moment does not stand for the row; a run that failed
// is left out, and only when every run failed does the cell say so.
func TestMedianCell(t *testing.T) {
	boom := errors.New("no bytes moved")
	for _, tc := range []struct {
		name string
		in   []cell
		want string
	}{
		{"three runs", []cell{measured(5.10, nil), measured(2.63, nil), measured(3.01, nil)}, "3.01"},
		{"a failed run left out", []cell{measured(4.0, nil), measured(0, boom), measured(2.0, nil)}, "3.00"},
		{"every run failed", []cell{measured(0, boom), measured(0, boom)}, "error"},
		{"not applicable", []cell{measured(0, errNA)}, "n/a"},
		{"not measured", nil, "-"},
	} {
		if got := medianCell(tc.in).format(2); got != tc.want {
			t.Errorf("%s: medianCell = %q, want %q", tc.name, got, tc.want)
		}
	}
}
