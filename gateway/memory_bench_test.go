//go:build linux

package gateway

import (
	"bufio"
	"context"
	"fmt"
	"io"
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

// BenchmarkGatewayIdleNodes reports what one registered, idle node costs
// the gateway: N nodes (half agents, half clients, each with its own key,
// credential and UDP socket, each a real QUIC connection over 127.0.0.1)
// register with a gateway running as its own process (bin/nlvpn gateway,
// or $NLVPN_BIN), and the gateway's RSS (/proc/PID/status VmRSS) and Go
// heap+stacks after a GC (its pprof endpoint, NLVPN_PPROF) are read before
// and after, with the nodes idle for a keepalive period. The nodes run in
// this process, so only the gateway is measured.
//
// N is 2000, or $NLVPN_BENCH_NODES; less if this process may not open a
// socket per node. With $NLVPN_BENCH_HEAPDIR set, the gateway's heap
// profiles before and after are written there (go tool pprof -base).
// Everything happens once (b.Loop); ns/op means nothing here.
func BenchmarkGatewayIdleNodes(b *testing.B) {
	bin := os.Getenv("NLVPN_BIN")
	if bin == "" {
		bin = filepath.Join("..", "bin", "nlvpn")
	}
	if _, err := os.Stat(bin); err != nil {
		b.Skipf("needs the nlvpn binary at %s (make build, or set NLVPN_BIN): %v", bin, err)
	}
	nodes := 2000
	if s := os.Getenv("NLVPN_BENCH_NODES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("NLVPN_BENCH_NODES=%q: want a positive number", s)
		}
		nodes = n
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < uint64(nodes)+256 {
		if rl.Cur < 512 {
			b.Skipf("open file limit %d is too low for this benchmark", rl.Cur)
		}
		nodes = int(rl.Cur) - 256
		b.Logf("open file limit %d: %d nodes", rl.Cur, nodes)
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

	// Register the nodes a few at a time: the gateway allows 16
	// unauthenticated connections per source address, and every node
	// here comes from 127.0.0.1.
	const parallel = 8
	bn := make([]*benchNode, nodes)
	start := time.Now()
	var wg sync.WaitGroup
	next := make(chan int)
	errs := make(chan error, nodes)
	for range parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				n, err := startBenchNode(auth, gw.addr, info.Pin, i)
				bn[i] = n
				if err != nil {
					errs <- fmt.Errorf("node %d: %w", i, err)
				}
			}
		}()
	}
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
	for i := range nodes {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	registered := time.Since(start)
	regCPU := gw.sample(b).cpu - before.cpu

	// Idle for a keepalive period, so every connection has its timers and
	// buffers as an idle node has them.
	time.Sleep(control.QUICConfig().KeepAlivePeriod + time.Second)
	for i, n := range bn {
		select {
		case err := <-n.runErr:
			b.Fatalf("node %d stopped: %v", i, err)
		default:
		}
	}
	after := gw.sample(b)
	if heapDir != "" {
		gw.saveHeap(b, filepath.Join(heapDir, "gateway-nodes.pprof"))
	}
	for b.Loop() { // the function runs once; the loop measures nothing
	}

	per := func(a, z uint64) float64 { return (float64(z) - float64(a)) / float64(nodes) }
	b.ReportMetric(float64(nodes), "nodes")
	b.ReportMetric(per(before.rss, after.rss), "B/node")
	b.ReportMetric(per(before.heap, after.heap), "heap-B/node")
	b.ReportMetric((float64(after.goroutines)-float64(before.goroutines))/float64(nodes), "goroutines/node")
	b.ReportMetric(0, "ns/op")
	const mib = 1 << 20
	b.Logf("gateway with %d idle nodes: RSS %.1f -> %.1f MiB, Go heap+stacks %.1f -> %.1f MiB (of which stacks %.1f -> %.1f), goroutines %d -> %d, threads %d -> %d; registering them took %v, %v of the gateway's CPU",
		nodes, float64(before.rss)/mib, float64(after.rss)/mib, float64(before.heap)/mib, float64(after.heap)/mib,
		float64(before.stack)/mib, float64(after.stack)/mib, before.goroutines, after.goroutines, before.threads, after.threads,
		registered.Round(time.Millisecond), regCPU.Round(10*time.Millisecond))
}

// gatewayProc is a gateway running as its own process.
type gatewayProc struct {
	cmd   *exec.Cmd
	addr  string // its QUIC address
	pprof string // its net/http/pprof address
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
	p := &gatewayProc{cmd: cmd, pprof: pprofAddr}
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
	var tail []string // its last lines, should it fail
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
	// utime and stime, the 14th and 15th fields, after the command in
	// parentheses; in clock ticks, 100 a second on Linux.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	if i := strings.LastIndexByte(string(stat), ')'); i > 0 {
		if f := strings.Fields(string(stat[i+1:])); len(f) > 13 {
			ut, _ := strconv.ParseUint(f[11], 10, 64)
			st, _ := strconv.ParseUint(f[12], 10, 64)
			s.cpu = time.Duration(ut+st) * 10 * time.Millisecond
		}
	}
	return s
}

func (p *gatewayProc) saveHeap(b *testing.B, path string) {
	b.Helper()
	if err := os.WriteFile(path, []byte(p.get(b, "/debug/pprof/heap?gc=1")), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("gateway heap profile: %s", path)
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

// startBenchNode registers node i (even: an agent, odd: a client) and
// returns once the gateway welcomed it.
func startBenchNode(auth *identity.Key, gwAddr, pin string, i int) (*benchNode, error) {
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
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	n := &benchNode{runErr: make(chan error, 1), tr: &quic.Transport{Conn: uc}, uc: uc}
	cl := control.New(control.Config{Gateway: gwAddr, Pin: pin, Token: tok.Enroll(key.Public()), Key: key, Transport: n.tr, Log: quietLog(),
		OnRelay: func(uint64, []byte) {}})
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() { n.runErr <- cl.Run(ctx) }()
	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
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
