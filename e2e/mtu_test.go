//go:build linux

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// A path with MTU 1280 (a tunnel somewhere on the way out): `nlvpn up`
// learns it, connects, and a 20 MB download through the tunnel arrives
// intact, on the direct path, on the relay as UDP frames, and on the
// relay's tightest carrier (frames inside the gateway connection's
// DATAGRAMs). Also with the agent behind the small link, with a small
// link that drops big packets without saying so (ICMP blocked: a black
// hole; and the same with --mtu 1280, which needs no second dial), and in
// the netstack (SOCKS5) mode. Every case prints the tunnel MTU the client
// chose and how long it took to register with the gateway.
func TestSmallPathMTU(t *testing.T) {
	const wantMTU = 1168 // 1280 - 28 (IPv4, UDP) - 46 (frame, DATAGRAM) - 38 (DATAGRAM); wire/mtu.go
	for _, c := range []struct {
		name  string
		opts  func(*lab.Options)
		flags []string
		path  string
		setup func(t *testing.T, e *env)
		size  int64
		// fixed: --mtu is given, so the client must not need a second dial.
		fixed bool
		// socks: netstack mode, reached through this SOCKS5 address.
		socks string
	}{
		{name: "client-direct", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--direct"}, path: "direct", size: 20 << 20},
		{name: "client-relay", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--relay"}, path: "relay", size: 20 << 20},
		{name: "client-relay-carrier", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--relay"}, path: "relay", size: 20 << 20,
			setup: func(t *testing.T, e *env) { dropRelayFrames(t, e) }},
		{name: "agent-direct", opts: func(o *lab.Options) { o.AgentUplinkMTU = 1280 }, path: "direct", size: 20 << 20},
		{name: "client-blackhole", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--relay"}, path: "relay", size: 4 << 20,
			setup: func(t *testing.T, e *env) { dropFragNeeded(t, e) }},
		{name: "client-blackhole-mtu-flag", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--relay", "--mtu", "1280"}, path: "relay", size: 4 << 20,
			setup: func(t *testing.T, e *env) { dropFragNeeded(t, e) }, fixed: true},
		{name: "client-netstack", opts: func(o *lab.Options) { o.ClientUplinkMTU = 1280 }, flags: []string{"--direct"}, path: "direct", size: 20 << 20,
			socks: "127.0.0.1:10880"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			opts := coneCone
			c.opts(&opts)
			// The client's setup goes first (the black hole must be there
			// before it dials); the agent is up once newEnv returns.
			e := newEnv(t, opts, false)
			if c.setup != nil {
				c.setup(t, e)
			}
			started := time.Now()
			var via []string // curl's way through the tunnel
			if c.socks == "" {
				e.startClientMode(t, c.flags...)
			} else {
				via = []string{"--socks5-hostname", c.socks}
				args := append(e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir()), c.flags...)
				args = append(args, "--netstack", "--socks5", c.socks, "--http-proxy", "")
				e.client = e.start(t, e.lab.NS.Client, "client", args...)
				e.waitFor(t, readyTimeout, "the SOCKS5 proxy to reach the LAN host", func() error {
					if !e.client.Running() {
						return errStop(fmt.Errorf("client exited with code %d", e.client.ExitCode()))
					}
					out, err := socksCurl(e, 5*time.Second, append(via, fmt.Sprintf("http://%s/health", e.lab.LANHost))...)
					if err == nil && strings.TrimSpace(out) != "ok" {
						err = fmt.Errorf("/health said %q", out)
					}
					return err
				})
			}
			st := e.waitPath(t, c.path, 15*time.Second)
			reg := logLine(e.client.Log(), "registered with gateway")
			t.Logf("%s: tunnel MTU %d, client UDP size %d, registered %s after start; %s", c.name, st.MTU, st.UDPSize,
				logTime(reg).Sub(started).Round(10*time.Millisecond), logLine(e.client.Log(), "next gateway dial"))
			if st.MTU != wantMTU {
				t.Errorf("tunnel MTU %d, want %d for a 1280-byte path", st.MTU, wantMTU)
			}
			if c.socks != "" {
				// no TUN device
			} else if out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "-o", "link", "show", tunName); err != nil || !strings.Contains(out, fmt.Sprintf("mtu %d ", wantMTU)) {
				t.Errorf("TUN device: %q (%v), want mtu %d", out, err, wantMTU)
			}
			if c.fixed {
				if l := logLine(e.client.Log(), "next gateway dial"); !strings.HasPrefix(l, "(no") {
					t.Errorf("--mtu 1280 given, yet the client dialled again: %s", l)
				}
				if reg := logTime(logLine(e.client.Log(), "registered with gateway")).Sub(started); reg > 4*time.Second {
					t.Errorf("--mtu 1280 given, yet registered only %v after start", reg)
				}
			}
			before := e.relayStats(t)
			start := time.Now()
			download := e.download
			if c.socks != "" {
				download = func(t *testing.T, size int64, seed uint64, via ...string) error {
					out := filepath.Join(e.dir, "socks-dl.bin")
					defer os.Remove(out)
					if _, err := socksCurl(e, 120*time.Second, append(via, "-o", out, fmt.Sprintf("http://%s/data?size=%d&seed=%d", e.lab.LANHost, size, seed))...); err != nil {
						return err
					}
					if got, want := fileSHA256(t, out), streamSHA256(seed, size); got != want {
						return fmt.Errorf("sha256 %s, want %s", got, want)
					}
					return nil
				}
			}
			if err := download(t, c.size, 31, via...); err != nil {
				t.Fatalf("%d MB download over a 1280-byte path (%s): %v", c.size>>20, c.path, err)
			}
			t.Logf("%s: %d MB intact in %.1f s", c.name, c.size>>20, time.Since(start).Seconds())
			after := e.relayStats(t)
			if c.name == "client-relay-carrier" {
				carried := (after.Frames - after.UDPFrames) - (before.Frames - before.UDPFrames)
				if carried < uint64(c.size/1200) {
					t.Fatalf("only %d frames rode the gateway connections' DATAGRAMs for %d MB", carried, c.size>>20)
				}
				t.Logf("%s: %d frames in DATAGRAMs", c.name, carried)
			}
			// UDP larger than the tunnel: the client's kernel fragments the
			// request, the agent its answer (the netstack's link is bigger
			// than this session).
			if c.socks == "" {
				udpEcho(t, e, 1400)
			}
		})
	}
}

// socksCurl runs curl in the client's namespace without the harness's
// --noproxy (which would bypass --socks5-hostname too).
func socksCurl(e *env, maxTime time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), maxTime+5*time.Second)
	defer cancel()
	full := append([]string{"curl", "-sS", "-f", "--max-time", fmt.Sprint(int(maxTime.Seconds()))}, args...)
	stdout, stderr, err := lab.Run(ctx, e.lab.NS.Client, full...)
	if err != nil {
		return string(stdout), fmt.Errorf("curl %v: %v: %s", args, err, bytes.TrimSpace(stderr))
	}
	return string(stdout), nil
}

// dropRelayFrames drops relay frames (UDP to and from the gateway's port
// that are not QUIC: the fixed bit 0x40 of the first byte is clear) between
// the client's side and the gateway, so the relay uses its fallback carrier.
func dropRelayFrames(t *testing.T, e *env) {
	t.Helper()
	rules := fmt.Sprintf("table ip nvframes { chain forward { type filter hook forward priority 0; policy accept; "+
		"ip saddr %[1]s ip daddr %[2]s udp dport %[3]d @th,64,8 & 0x40 == 0 drop; "+
		"ip saddr %[2]s ip daddr %[1]s udp sport %[3]d @th,64,8 & 0x40 == 0 drop; }; }", e.lab.ClientPublic, e.lab.Gateway, gwPort)
	nft(t, e.lab.NS.Inet, rules)
}

// dropFragNeeded makes the client's NAT router drop packets too big for its
// uplink without telling anyone (no ICMP "fragmentation needed").
func dropFragNeeded(t *testing.T, e *env) {
	t.Helper()
	nft(t, e.lab.NS.ClientNAT, "table ip nvblackhole { chain output { type filter hook output priority 0; policy accept; icmp type destination-unreachable icmp code frag-needed drop; }; }")
}

func nft(t *testing.T, ns, rules string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, stderr, err := lab.Run(ctx, ns, "nft", rules); err != nil {
		t.Fatalf("nft in %s: %v: %s", ns, err, stderr)
	}
}

// udpEcho sends a UDP datagram of size bytes to the LAN host's echo server
// through the tunnel and wants it back intact (3 tries).
func udpEcho(t *testing.T, e *env, size int) {
	t.Helper()
	c, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dst := netip.AddrPortFrom(e.lab.LANHost, udpEchoPort)
	msg := streamBytes(77, size)
	buf := make([]byte, 2*size)
	for try := 0; try < 3; try++ {
		if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err == nil && bytes.Equal(buf[:n], msg) {
			return
		}
	}
	t.Fatalf("no intact echo of a %d-byte UDP datagram through the tunnel", size)
}

// logTime is the time= of a log line (zero if it has none).
func logTime(line string) time.Time {
	_, rest, ok := strings.Cut(line, "time=")
	if !ok {
		return time.Time{}
	}
	ts, _, _ := strings.Cut(rest, " ")
	tm, _ := time.Parse(time.RFC3339Nano, ts)
	return tm
}

// logLine is the first line of log containing s, or a note that none does.
func logLine(log, s string) string {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return fmt.Sprintf("(no %q line)", s)
}
