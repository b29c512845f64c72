package netstack

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// BenchmarkEgressTCPFlowMemory reports what one established TCP flow
// through the egress costs the agent (heap and goroutine stacks after a
// GC, with 1 KiB echoed each way), the TCP counterpart of
// BenchmarkEgressUDPFlowMemory. The echo server runs in a child process
// (this test binary, TestEgressEchoHelperProcess), so its sockets and
// goroutines are not counted; the simulated client's own gVisor endpoint
// is (it lives in this process, as in the UDP benchmark). It measures a
// fixed number of flows once (b.Loop); ns/op means nothing here. With
// $NLVPN_BENCH_HEAPDIR set, heap profiles before and after are written
// there (go tool pprof -base).
func BenchmarkEgressTCPFlowMemory(b *testing.B) {
	const flows = 1000
	n := egNewTestNet(b, EgressConfig{Limits: EgressLimits{TCPPerClient: flows + 1, TCPTotal: flows + 1}, Logger: slog.New(slog.DiscardHandler)})
	dst := egEchoProcess(b)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	msg := bytes.Repeat([]byte("0123456789abcdef"), 64) // 1 KiB
	conns := make([]*gonet.TCPConn, 0, flows+1)
	b.Cleanup(func() { // before the egress's cleanup closes it
		for _, c := range conns {
			c.Close()
		}
	})
	exchange := func(i int) {
		c, err := n.dialTCPFrom(ctx, egClientV4, dst)
		if err != nil {
			b.Fatalf("flow %d: %v", i, err)
		}
		conns = append(conns, c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(msg); err != nil {
			b.Fatalf("flow %d: %v", i, err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
			b.Fatalf("flow %d: echo %v", i, err)
		}
		c.SetDeadline(time.Time{})
	}
	exchange(-1) // the egress's first flow sets up what every flow shares
	heapDir := os.Getenv("NLVPN_BENCH_HEAPDIR")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	g0 := runtime.NumGoroutine()
	egWriteHeap(b, heapDir, "egress-tcp-before.pprof")
	for i := range flows {
		exchange(i)
	}
	time.Sleep(100 * time.Millisecond) // the last ACKs
	runtime.GC()
	runtime.ReadMemStats(&after)
	g1 := runtime.NumGoroutine()
	egWriteHeap(b, heapDir, "egress-tcp-after.pprof")
	if got := egHeld(n.eg, egClientV4, "tcp_flows"); got != flows+1 {
		b.Fatalf("the egress holds %d TCP flows, want %d", got, flows+1)
	}
	for b.Loop() { // the function runs once; the loop measures nothing
	}
	b.ReportMetric(float64(after.HeapInuse+after.StackInuse-before.HeapInuse-before.StackInuse)/flows, "B/flow")
	b.ReportMetric(float64(g1-g0)/flows, "goroutines/flow")
	b.ReportMetric(0, "ns/op")
	runtime.KeepAlive(conns)
}

// egWriteHeap writes this process's heap profile to dir/name, if dir is set.
func egWriteHeap(b *testing.B, dir, name string) {
	if dir == "" {
		return
	}
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

const egEchoHelperEnv = "NLVPN_EGRESS_ECHO_HELPER"

// egEchoProcess starts TestEgressEchoHelperProcess in a child process and
// returns its loopback TCP echo address. The child ends when its stdin
// closes: at cleanup, or when this process dies.
func egEchoProcess(b *testing.B) netip.AddrPort {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestEgressEchoHelperProcess$")
	cmd.Env = append(os.Environ(), egEchoHelperEnv+"=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("echo helper: %v", err)
	}
	ap, err := netip.ParseAddrPort(string(bytes.TrimSpace([]byte(line))))
	if err != nil || !ap.Addr().IsLoopback() {
		b.Fatalf("echo helper said %q", line)
	}
	return ap
}

// TestEgressEchoHelperProcess is the echo server of
// BenchmarkEgressTCPFlowMemory when run as its child; otherwise it does
// nothing.
func TestEgressEchoHelperProcess(t *testing.T) {
	if os.Getenv(egEchoHelperEnv) != "1" {
		t.Skip("the echo server of BenchmarkEgressTCPFlowMemory, run as its child process")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr())
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}
