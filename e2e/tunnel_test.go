//go:build linux

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

var coneCone = lab.Options{ClientNAT: lab.Cone, AgentNAT: lab.Cone}

// TestRelayedTunnel shares one cone/cone topology across the data-path
// checks, on the relay (--relay where the binary has it); the last subtest
// stops the client and checks it cleaned up.
func TestRelayedTunnel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, true, relayOnly...)

	t.Run("HTTPDownload50MB", func(t *testing.T) {
		const size = 50 << 20
		const seed = 1
		out := filepath.Join(e.dir, "download.bin")
		if _, err := e.curl(150*time.Second, "-o", out, fmt.Sprintf("http://%s/data?size=%d&seed=%d", e.lab.LANHost, size, seed)); err != nil {
			t.Fatalf("curl: %v", err)
		}
		got := fileSHA256(t, out)
		os.Remove(out)
		if want := streamSHA256(seed, size); got != want {
			t.Fatalf("sha256 of download %s, want %s", got, want)
		}
	})

	t.Run("HTTPUpload", func(t *testing.T) {
		if err := e.upload(t, 8<<20, 2); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("UDPEcho", func(t *testing.T) {
		c, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		dst := netip.AddrPortFrom(e.lab.LANHost, udpEchoPort)
		buf := make([]byte, 2048)
		for i := 0; i < 20; i++ {
			msg := []byte(fmt.Sprintf("udp-echo-%d-%x", i, streamBytes(uint64(100+i), 16+i*50)))
			ok := false
			// UDP may drop; up to 3 tries per message, each bounded.
			for try := 0; try < 3 && !ok; try++ {
				if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				for {
					n, from, err := c.ReadFromUDPAddrPort(buf)
					if err != nil {
						break
					}
					if from.Addr().Unmap() != dst.Addr() || from.Port() != dst.Port() {
						t.Errorf("reply from %v, want %v", from, dst)
					}
					if bytes.Equal(buf[:n], msg) {
						ok = true
						break
					}
				}
			}
			if !ok {
				t.Fatalf("no echo for UDP message %d after 3 tries", i)
			}
		}
	})

	t.Run("DNSQuery", func(t *testing.T) {
		c, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		const id = 0x4e56
		q, err := dnsQuery(id, dnsName)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1500)
		var lastErr error
		for try := 0; try < 3; try++ {
			c.WriteToUDPAddrPort(q, netip.AddrPortFrom(e.lab.LANHost, dnsPort))
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				lastErr = err
				continue
			}
			a, err := parseDNSA(buf[:n], id)
			if err != nil {
				t.Fatalf("DNS answer: %v", err)
			}
			if a != e.lab.LANHost {
				t.Fatalf("%s resolved to %v, want %v", dnsName, a, e.lab.LANHost)
			}
			return
		}
		t.Fatalf("no DNS answer: %v", lastErr)
	})

	t.Run("Ping", func(t *testing.T) {
		out, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "3", "-W", "5", e.lab.LANHost.String())
		if err != nil {
			t.Fatalf("ping through the tunnel: %v\n%s", err, out)
		}
		t.Logf("%s", lastLines(out, 2))
	})

	t.Run("Concurrent200TCP", func(t *testing.T) {
		concurrentTCP(t, e, 200, 32<<10)
	})

	t.Run("RelayCarriesOnlyCiphertext", func(t *testing.T) {
		relayCiphertextOnly(t, e)
	})

	t.Run("GarbageUDPToGateway", func(t *testing.T) {
		garbageToGateway(t, e)
	})

	t.Run("ClientExitLeavesNothing", func(t *testing.T) {
		// While up, the TUN's inbound filter is in place (its own table).
		inboundTable := "nlvpn-inbound-" + tunName
		if out, err := lab.Output(context.Background(), e.lab.NS.Client, "nft", "list", "table", "inet", inboundTable); err != nil || !strings.Contains(out, "established,related") {
			t.Errorf("no inbound filter for %s while the client runs: %v\n%s", tunName, err, out)
		}
		if err := e.client.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if !e.client.Wait(15 * time.Second) {
			t.Fatalf("client still running 15s after SIGTERM")
		}
		t.Logf("client after SIGTERM: %s", e.client.ExitStatus())
		ctx := context.Background()
		if out, err := lab.Output(ctx, e.lab.NS.Client, "ip", "link", "show", tunName); err == nil {
			t.Errorf("%s still exists after the client exited:\n%s", tunName, out)
		}
		out, err := lab.Output(ctx, e.lab.NS.Client, "ip", "route", "show", "table", "all")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(out, "\n") {
			if strings.Contains(line, "192.168.77.") || strings.Contains(line, tunName) || strings.HasPrefix(line, "100.") {
				t.Errorf("route left behind after the client exited: %s", line)
			}
		}
		if out, err := lab.Output(ctx, e.lab.NS.Client, "nft", "list", "table", "inet", inboundTable); err == nil {
			t.Errorf("the inbound filter's table is left behind after the client exited:\n%s", out)
		}
		rules, _ := lab.Output(ctx, e.lab.NS.Client, "ip", "rule", "show")
		if strings.Contains(rules, "5228") || strings.Contains(rules, "0x4e4c") {
			t.Errorf("policy rules left behind after the client exited:\n%s", rules)
		}
	})
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// concurrentTCP opens n connections to the LAN host's TCP echo at once
// (sockets created in the client namespace), sends distinct data on each
// and checks every byte comes back.
func concurrentTCP(t *testing.T, e *env, n, size int) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	target := fmt.Sprintf("%s:%d", e.lab.LANHost, tcpEchoPort)
	errs := make(chan error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs <- echoOnce(ctx, e.lab.NS.Client, target, streamBytes(uint64(1000+i), size+i))
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	failed := 0
	var first []error
	for err := range errs {
		if err != nil {
			failed++
			if len(first) < 5 {
				first = append(first, err)
			}
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d connections failed; first errors: %v", failed, n, first)
	}
}

func echoOnce(ctx context.Context, ns, target string, data []byte) error {
	c, err := lab.DialContext(ctx, ns, "tcp4", target)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), rerr)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("echo mismatch: sent %d bytes, got %d", len(data), len(got))
	}
	return nil
}

// relayCiphertextOnly captures UDP in the gateway namespace during a
// transfer each way and checks no plaintext appears in the capture.
func relayCiphertextOnly(t *testing.T, e *env) {
	// The relay under test forwards frames as UDP datagrams through the
	// gateway's port: the capture must see that relay, not the fallback.
	e.waitRelayUDP(t)
	udpBefore := e.relayStats(t).UDPFrames
	defer func() {
		if n := e.relayStats(t).UDPFrames - udpBefore; n < 2*(2<<20)/1500 {
			t.Errorf("the relay forwarded only %d UDP frames during the capture's transfers", n)
		}
	}()
	const marker = "NLVPN-PLAINTEXT-MARKER-7f3c9a1e5b2d4c6e"
	const size = 2 << 20
	const downSeed, upSeed = 31, 32
	pcap := filepath.Join(e.dir, "gw.pcap")
	td := e.capture(t, e.lab.NS.GW, pcap, "udp")

	// Download: plaintext flows LAN host → agent → relay → client.
	out := filepath.Join(e.dir, "marked.bin")
	url := fmt.Sprintf("http://%s/data?size=%d&seed=%d&marker=%s", e.lab.LANHost, size, downSeed, marker)
	if _, err := e.curl(60*time.Second, "-H", "X-Marker: "+marker, "-o", out, url); err != nil {
		td.Stop()
		t.Fatalf("curl: %v", err)
	}
	if got, want := fileSHA256(t, out), streamSHA256(downSeed, size); got != want {
		t.Errorf("download corrupted")
	}
	// Upload: plaintext flows client → relay → agent → LAN host.
	in := filepath.Join(e.dir, "up.bin")
	up := streamBytes(upSeed, size)
	copy(up[size/2:], marker)
	os.WriteFile(in, up, 0o644)
	if _, err := e.curl(60*time.Second, "--data-binary", "@"+in, fmt.Sprintf("http://%s/upload", e.lab.LANHost)); err != nil {
		td.Stop()
		t.Fatalf("curl upload: %v", err)
	}
	td.Stop()
	capture, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("capture in the gateway namespace: %d bytes", len(capture))
	if len(capture) < size {
		t.Fatalf("capture has %d bytes, less than the %d-byte payload: did the relay carry the traffic?", len(capture), size)
	}
	if bytes.Contains(capture, []byte(marker)) {
		t.Errorf("the plaintext marker appears in the gateway's traffic")
	}
	down := streamBytes(downSeed, size)
	rng := rand.New(rand.NewPCG(1, 2))
	leaks := 0
	for i := 0; i < 64; i++ {
		for _, p := range [][]byte{down, up} {
			off := rng.IntN(len(p) - 32)
			if bytes.Contains(capture, p[off:off+32]) {
				leaks++
			}
		}
	}
	if leaks > 0 {
		t.Errorf("%d of 128 plaintext 32-byte windows appear in the gateway's traffic", leaks)
	}
}

// garbageToGateway sends 1000 random datagrams (some shaped like QUIC long
// and short headers) to the gateway's port from the client namespace, then
// checks the gateway still runs and the tunnel still works.
func garbageToGateway(t *testing.T, e *env) {
	c, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := e.lab.GatewayAddrPort(gwPort)
	rng := rand.New(rand.NewPCG(42, 43))
	buf := make([]byte, 1400)
	for i := 0; i < 1000; i++ {
		n := 1 + rng.IntN(len(buf))
		for j := range buf[:n] {
			buf[j] = byte(rng.UintN(256))
		}
		switch i % 4 {
		case 0: // QUIC v1 long header, Initial
			buf[0] = 0xc0 | buf[0]&0x0f
			if n >= 5 {
				copy(buf[1:5], []byte{0, 0, 0, 1})
			}
		case 1: // short header
			buf[0] = 0x40 | buf[0]&0x3f
		}
		if _, err := c.WriteToUDPAddrPort(buf[:n], dst); err != nil {
			t.Fatal(err)
		}
		if i%100 == 99 {
			time.Sleep(20 * time.Millisecond) // pace: 1000 datagrams over ~0.2 s
		}
	}
	time.Sleep(time.Second)
	if !e.gateway.Running() {
		t.Fatalf("gateway exited after garbage datagrams (code %d)", e.gateway.ExitCode())
	}
	if err := e.poll(20*time.Second, e.httpHealth); err != nil {
		t.Fatalf("tunnel broken after garbage datagrams: %v", err)
	}
}

// TestGatewayRestart stops the gateway mid-session and starts it again with
// the same state; agent and client must reconnect by themselves. The client
// stays on the relay (--relay where available), so traffic flowing again
// proves both re-registered with the new gateway process.
func TestGatewayRestart(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, true, relayOnly...)
	old := e.gateway
	old.Stop()
	t.Logf("gateway stopped with SIGTERM: %s", old.ExitStatus())
	if err := e.httpHealth(); err == nil {
		t.Logf("note: traffic still flowed right after the gateway stopped")
	}
	e.startGateway(t)
	const resume = 45 * time.Second
	if err := e.poll(resume, e.httpHealth); err != nil {
		t.Fatalf("traffic did not resume within %v after the gateway restart: %v", resume, err)
	}
	if !e.agent.Running() || !e.client.Running() {
		t.Fatalf("agent running %v, client running %v after gateway restart", e.agent.Running(), e.client.Running())
	}
	// And a real transfer works on the new relay session.
	const size, seed = 4 << 20, 5
	out := filepath.Join(e.dir, "after-restart.bin")
	if _, err := e.curl(60*time.Second, "-o", out, fmt.Sprintf("http://%s/data?size=%d&seed=%d", e.lab.LANHost, size, seed)); err != nil {
		t.Fatalf("download after restart: %v", err)
	}
	if got, want := fileSHA256(t, out), streamSHA256(seed, size); got != want {
		t.Fatalf("download after restart corrupted")
	}
}
