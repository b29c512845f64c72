//go:build linux

package gateway

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
)

// BenchmarkGatewayIdleNodes reports what registered, idle nodes cost the
// gateway (issue 12's goal: 10,000 of them in 1 GiB): N nodes (half agents,
// half clients, each with its own key, credential and UDP socket, each a
// real QUIC connection over loopback) register with a gateway running as
// its own process (bin/nlvpn gateway, or $NLVPN_BIN), then stay idle for
// three keepalive periods. The nodes run in this process, so only the
// gateway is measured:
//   - B/node and heap-B/node: its RSS (/proc/PID/status VmRSS) and its Go
//     heap+stacks after a GC (its pprof endpoint, NLVPN_PPROF), after the
//     idle period less before the nodes came, per node; gw-RSS-MiB the
//     total;
//   - reg/s: nodes registered per second during the ramp, and
//     reg-CPU-ms/node the gateway's CPU per registration;
//   - idle-CPU-ms/s: the gateway's CPU (/proc/PID/stat utime+stime) per
//     second of the idle period, keepalives and all;
//   - node-warnings: lines the nodes logged at warning level (a
//     registration retried, a connection lost and made again): 0 when
//     the gateway kept up.
//
// The CPU figures are noisy on a machine that others share: the gateway
// competes with them, and with this process's nodes, for the CPUs.
//
// The nodes pace themselves rather than loosen the gateway's admission
// limits, which stay at their defaults: they come from four loopback
// addresses (127.0.0.1-4, all local), each with at most 8 registering at
// once, below DefaultMaxUnauthPerSource (16) per source; past
// DefaultRetryAbove (64) unauthenticated in all the gateway would demand a
// Retry, which 32 at once stay below.
//
// N is 10,000, or $NLVPN_BENCH_NODES. Each node needs a socket: the open
// file limit is raised as far as allowed, and N cut to fit, with a log
// line, if it cannot be. With $NLVPN_BENCH_HEAPDIR set, the gateway's heap
// profiles before and after are written there (go tool pprof -base), and
// its goroutines (gateway-nodes-goroutines.txt).
// Nodes reach the gateway over UDP only (control.OverUDP). Everything
// happens once (b.Loop); ns/op means nothing here. At 10,000 it takes
// about 6 minutes on the shared 2 CPUs, most of it the ramp.
func BenchmarkGatewayIdleNodes(b *testing.B) {
	bin := os.Getenv("NLVPN_BIN")
	if bin == "" {
		bin = filepath.Join("..", "bin", "nlvpn")
	}
	if _, err := os.Stat(bin); err != nil {
		b.Skipf("needs the nlvpn binary at %s (make build, or set NLVPN_BIN): %v", bin, err)
	}
	nodes := 10000
	if s := os.Getenv("NLVPN_BENCH_NODES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("NLVPN_BENCH_NODES=%q: want a positive number", s)
		}
		nodes = n
	}
	if limit := raiseOpenFiles(uint64(nodes) + 256); limit < uint64(nodes)+256 {
		if limit < 512 {
			b.Skipf("open file limit %d is too low for this benchmark", limit)
		}
		nodes = int(limit) - 256
		b.Logf("open file limit %d: %d nodes", limit, nodes)
	}

	dir := b.TempDir()
	auth, err := LoadAuthority(dir)
	if err != nil {
		b.Fatal(err)
	}
	gw := startGatewayProc(b, bin, dir)
	info, ok, err := ReadInfoFile(dir)
	if err != nil || !ok {
		b.Fatalf("gateway info: ok=%v err=%v", ok, err)
	}
	heapDir := os.Getenv("NLVPN_BENCH_HEAPDIR")
	time.Sleep(time.Second) // let the fresh process settle
	before := gw.sample(b)
	if heapDir != "" {
		gw.saveHeap(b, filepath.Join(heapDir, "gateway-idle.pprof"))
	}

	// Worker w registers nodes w, w+workers, ... from source w%sources, so
	// no source has more than perSource registering at once.
	const sources, perSource = 4, 8
	const workers = sources * perSource
	bn := make([]*benchNode, nodes)
	b.Cleanup(func() {
		// The nodes say goodbye before the gateway goes (its cleanup was
		// registered first, so it runs after this one).
		for _, n := range bn {
			if n != nil {
				n.cancel()
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for _, n := range bn {
			if n != nil {
				n.stop(deadline)
			}
		}
	})
	nodeLog := &boundedLog{} // the nodes' warnings
	start := time.Now()
	regBefore := gw.cpu(b)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		src := net.IPv4(127, 0, 0, byte(1+w%sources))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < nodes; i += workers {
				n, err := startBenchNode(auth, gw.addr, info.Pin, src, i, nodeLog)
				bn[i] = n
				if err != nil {
					errs <- fmt.Errorf("node %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Errorf("%v", err)
	}
	if b.Failed() {
		b.Fatalf("the nodes' warnings:\n%s\nthe gateway's warnings and refusals:\n%s", nodeLog, gw.log)
	}
	registered := time.Since(start)
	regCPU := gw.cpu(b) - regBefore

	// Idle for three keepalive periods (at least two, as the issue asks),
	// so every connection has its timers and buffers as an idle node has
	// them, and the CPU figure covers keepalives of every node.
	idleStart, idleCPU0 := time.Now(), gw.cpu(b)
	time.Sleep(3 * control.QUICConfig().KeepAlivePeriod)
	idleCPU := gw.cpu(b) - idleCPU0
	idle := time.Since(idleStart)
	for i, n := range bn {
		select {
		case err := <-n.runErr:
			b.Fatalf("node %d stopped: %v\nthe nodes' warnings:\n%s\nthe gateway's warnings and refusals:\n%s", i, err, nodeLog, gw.log)
		default:
		}
	}
	after := gw.sample(b)
	if heapDir != "" {
		gw.saveHeap(b, filepath.Join(heapDir, "gateway-nodes.pprof"))
		gw.saveProfile(b, "/debug/pprof/goroutine?debug=1", filepath.Join(heapDir, "gateway-nodes-goroutines.txt"))
	}
	for b.Loop() { // the function runs once; the loop measures nothing
	}

	per := func(a, z uint64) float64 { return (float64(z) - float64(a)) / float64(nodes) }
	const mib = 1 << 20
	b.ReportMetric(float64(nodes), "nodes")
	b.ReportMetric(per(before.rss, after.rss), "B/node")
	b.ReportMetric(per(before.heap, after.heap), "heap-B/node")
	b.ReportMetric(float64(after.rss)/mib, "gw-RSS-MiB")
	b.ReportMetric((float64(after.goroutines)-float64(before.goroutines))/float64(nodes), "goroutines/node")
	b.ReportMetric(float64(nodes)/registered.Seconds(), "reg/s")
	b.ReportMetric(float64(regCPU)/float64(time.Millisecond)/float64(nodes), "reg-CPU-ms/node")
	b.ReportMetric(float64(idleCPU)/float64(time.Millisecond)/idle.Seconds(), "idle-CPU-ms/s")
	b.ReportMetric(float64(nodeLog.lines()), "node-warnings")
	b.ReportMetric(0, "ns/op")
	b.Logf("gateway with %d idle nodes: RSS %.1f -> %.1f MiB, Go heap+stacks %.1f -> %.1f MiB (of which stacks %.1f -> %.1f), goroutines %d -> %d, threads %d -> %d; registering them took %v (%.0f/s), %v of the gateway's CPU; idle for %v, it used %v of CPU (%.1f ms/s); load average %s",
		nodes, float64(before.rss)/mib, float64(after.rss)/mib, float64(before.heap)/mib, float64(after.heap)/mib,
		float64(before.stack)/mib, float64(after.stack)/mib, before.goroutines, after.goroutines, before.threads, after.threads,
		registered.Round(time.Millisecond), float64(nodes)/registered.Seconds(), regCPU.Round(10*time.Millisecond),
		idle.Round(time.Millisecond), idleCPU.Round(10*time.Millisecond), float64(idleCPU)/float64(time.Millisecond)/idle.Seconds(), loadAverage())
	// After the summary: go test keeps only the first lines of a
	// benchmark's log.
	if w := nodeLog.lines(); w > 0 {
		b.Logf("the nodes logged %d warnings (retried registrations, reconnects):\n%s", w, nodeLog)
	}
}

// raiseOpenFiles raises this process's open file limit to want if it can
// (the hard limit too, which root may), and returns the limit it has.
func raiseOpenFiles(want uint64) uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 0
	}
	if rl.Cur >= want {
		return rl.Cur
	}
	up := rl
	up.Cur = want
	if up.Max < want {
		up.Max = want
	}
	if syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up) != nil && rl.Cur < rl.Max {
		up = rl
		up.Cur = rl.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &up)
	}
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	return rl.Cur
}

// loadAverage is the machine's 1, 5 and 15 minute load, for the log line
// that the CPU figures go with.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// gatewayProc is a gateway running as its own process.
type gatewayProc struct {
	cmd   *exec.Cmd
	addr  string // its QUIC address
	pprof string // its net/http/pprof address
	log   *boundedLog
}

// boundedLog keeps the first lines written to it, and the last ones, and
// counts the rest: what to show when a node or the gateway fails.
type boundedLog struct {
	mu          sync.Mutex
	first, last []string
	n           int
}

const boundedLogLines = 20

func (l *boundedLog) Write(p []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
		l.add(line)
	}
	return len(p), nil
}

func (l *boundedLog) add(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	if len(l.first) < boundedLogLines {
		l.first = append(l.first, line)
		return
	}
	l.last = append(l.last, line)
	if len(l.last) > boundedLogLines {
		l.last = l.last[1:]
	}
}

// lines is the number of lines written so far.
func (l *boundedLog) lines() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

func (l *boundedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := strings.Join(l.first, "\n")
	if skipped := l.n - len(l.first) - len(l.last); skipped > 0 {
		s += fmt.Sprintf("\n(%d lines left out)", skipped)
	}
	if len(l.last) > 0 {
		s += "\n" + strings.Join(l.last, "\n")
	}
	return s
}

var gwListeningRE = regexp.MustCompile(`msg="gateway listening" addr=(\S+)`)

func startGatewayProc(b *testing.B, bin, dir string) *gatewayProc {
	b.Helper()
	// A loopback port for its pprof server: free a moment ago.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	pprofAddr := ln.Addr().String()
	ln.Close()
	cmd := exec.Command(bin, "--log-level", "info", "gateway", "--listen", "127.0.0.1:0", "--state-dir", dir)
	cmd.Env = append(os.Environ(), "NLVPN_PPROF="+pprofAddr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // never outlives the benchmark
	stderr, err := cmd.StderrPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	// Its info lines (one per node registered) are not kept: its
	// warnings and refusals are, to tell why a node failed.
	p := &gatewayProc{cmd: cmd, pprof: pprofAddr, log: &boundedLog{}}
	exited := make(chan struct{})
	b.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	listening := make(chan string, 1)
	var mu sync.Mutex
	var tail []string // its last lines, should it exit
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			if m := gwListeningRE.FindStringSubmatch(line); m != nil {
				select {
				case listening <- m[1]:
				default:
				}
			}
			if !strings.Contains(line, "level=INFO") || strings.Contains(line, "refus") {
				p.log.add(line)
			}
			mu.Lock()
			tail = append(tail, line)
			if len(tail) > 20 {
				tail = tail[1:]
			}
			mu.Unlock()
		}
		io.Copy(io.Discard, stderr)
		cmd.Wait()
		close(exited)
	}()
	select {
	case p.addr = <-listening:
	case <-exited:
		mu.Lock()
		defer mu.Unlock()
		b.Fatalf("gateway exited: %s", strings.Join(tail, "\n"))
	case <-time.After(10 * time.Second):
		b.Fatal("gateway did not start listening in 10 s")
	}
	if ip := net.ParseIP(strings.Split(p.addr, ":")[0]); ip == nil || !ip.IsLoopback() {
		b.Fatalf("gateway listens on %s, not loopback", p.addr)
	}
	return p
}

type gwSample struct {
	rss, heap, stack    uint64 // bytes; heap is HeapInuse+StackInuse after a GC, stack StackInuse
	cpu                 time.Duration
	goroutines, threads int
}

func (p *gatewayProc) sample(b *testing.B) gwSample {
	b.Helper()
	var s gwSample
	// The heap profile in text form runs a GC first (gc=1) and ends with
	// the runtime's MemStats.
	text := p.get(b, "/debug/pprof/heap?debug=1&gc=1")
	var heapInuse, stackInuse uint64
	for _, line := range strings.Split(text, "\n") {
		if v, ok := strings.CutPrefix(line, "# HeapInuse = "); ok {
			heapInuse, _ = strconv.ParseUint(v, 10, 64)
		}
		if v, ok := strings.CutPrefix(line, "# Stack = "); ok { // StackInuse / StackSys
			inuse, _, _ := strings.Cut(v, " ")
			stackInuse, _ = strconv.ParseUint(inuse, 10, 64)
		}
	}
	if heapInuse == 0 || stackInuse == 0 {
		b.Fatal("no HeapInuse or Stack in the gateway's heap profile")
	}
	s.heap, s.stack = heapInuse+stackInuse, stackInuse
	first, _, _ := strings.Cut(p.get(b, "/debug/pprof/goroutine?debug=1"), "\n")
	if _, err := fmt.Sscanf(first, "goroutine profile: total %d", &s.goroutines); err != nil {
		b.Fatalf("goroutine profile: %q: %v", first, err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 3 && f[0] == "VmRSS:" && f[2] == "kB":
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			s.rss = kb << 10
		case len(f) == 2 && f[0] == "Threads:":
			s.threads, _ = strconv.Atoi(f[1])
		}
	}
	if s.rss == 0 {
		b.Fatal("no VmRSS in the gateway's /proc status")
	}
	s.cpu = p.cpu(b)
	return s
}

// cpu is the gateway's CPU time so far: utime and stime, the 14th and 15th
// fields of /proc/PID/stat (after the command in parentheses), in clock
// ticks, 100 a second on Linux.
func (p *gatewayProc) cpu(b *testing.B) time.Duration {
	b.Helper()
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	i := strings.LastIndexByte(string(stat), ')')
	if i < 0 {
		b.Fatalf("/proc/%d/stat: no command", p.cmd.Process.Pid)
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 13 {
		b.Fatalf("/proc/%d/stat: %d fields", p.cmd.Process.Pid, len(f))
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		b.Fatalf("/proc/%d/stat: utime %q stime %q", p.cmd.Process.Pid, f[11], f[12])
	}
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func (p *gatewayProc) saveHeap(b *testing.B, path string) {
	b.Helper()
	p.saveProfile(b, "/debug/pprof/heap?gc=1", path)
}

// saveProfile writes the gateway's pprof endpoint url to path.
func (p *gatewayProc) saveProfile(b *testing.B, url, path string) {
	b.Helper()
	if err := os.WriteFile(path, []byte(p.get(b, url)), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("gateway profile: %s", path)
}

func (p *gatewayProc) get(b *testing.B, path string) string {
	b.Helper()
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + p.pprof + path)
	if err != nil {
		b.Fatalf("gateway pprof: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		b.Fatalf("gateway pprof %s: %s %v", path, resp.Status, err)
	}
	return string(body)
}

// benchNode is one simulated node: a control.Client on its own socket.
type benchNode struct {
	cancel context.CancelFunc
	runErr chan error
	tr     *quic.Transport
	uc     *net.UDPConn
}

// startBenchNode registers node i (even: an agent, odd: a client) from
// address src and returns once the gateway welcomed it.
func startBenchNode(auth *identity.Key, gwAddr, pin string, src net.IP, i int, warnings io.Writer) (*benchNode, error) {
	key, err := identity.Generate()
	if err != nil {
		return nil, err
	}
	c := token.Claims{Role: token.RoleAgent, Name: fmt.Sprintf("bench-agent-%d", i), Expires: time.Now().Add(time.Hour).Unix(), Gateway: gwAddr, Pin: pin}
	if i%2 == 1 {
		c.Role, c.Name, c.Agents = token.RoleClient, fmt.Sprintf("bench-client-%d", i), []string{"*"}
	}
	s, err := token.Issue(auth, c)
	if err != nil {
		return nil, err
	}
	tok, err := token.ParseToken(s)
	if err != nil {
		return nil, err
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: src})
	if err != nil {
		return nil, err
	}
	n := &benchNode{runErr: make(chan error, 1), tr: &quic.Transport{Conn: uc}, uc: uc}
	cl := control.New(control.Config{Gateway: gwAddr, Pin: pin, Token: tok.Enroll(key.Public()), Key: key, Transport: n.tr,
		// UDP only: on a loaded machine a slow handshake would otherwise
		// start TCP beside it (OverAuto), and a node that won over TCP
		// moves back to UDP later, registering twice.
		Over:    control.OverUDP,
		Log:     slog.New(slog.NewTextHandler(warnings, &slog.HandlerOptions{Level: slog.LevelWarn})).With("node", i),
		OnRelay: func(uint64, []byte) {}})
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() { n.runErr <- cl.Run(ctx) }()
	// A node that times out retries by itself, as a real one does; on
	// this shared machine a stall of either process can make it (seen
	// twice in ten runs at 10,000), counted as node-warnings.
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer rcancel()
	if _, err := cl.Ready(rctx); err != nil {
		return n, err
	}
	return n, nil
}

// stop ends the node (Run says goodbye to the gateway) and closes its
// socket, waiting for Run until deadline at most.
func (n *benchNode) stop(deadline time.Time) {
	n.cancel()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case err := <-n.runErr:
		n.runErr <- err
	case <-t.C:
	}
	n.tr.Close()
	n.uc.Close()
}
