//go:build linux

package e2e

// The unprivileged client (issue 4): `nlvpn up` without CAP_NET_ADMIN runs
// a gVisor netstack behind SOCKS5 and HTTP proxies; `nlvpn connect` serves
// ssh's ProxyCommand; `nlvpn forward -L` forwards local ports; the agent's
// --allow-loopback. Every client-side nlvpn process here runs as the
// unprivileged user nobody (uid 65534) with no capabilities, through
// setpriv(1).

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/nlvpn/nlvpn/lab"
)

// The unprivileged user the client side runs as.
const (
	nobodyUID = 65534
	nobodyGID = 65534
)

// Proxy addresses inside the client namespace.
const (
	socksAddr     = "127.0.0.1:1080"
	httpProxyAddr = "127.0.0.1:8080"
	authSocksAddr = "127.0.0.1:1081"
)

// lanName is dnsName without the root dot: what a user types.
var lanName = strings.TrimSuffix(dnsName, ".")

// asNobody wraps a command line so it runs as nobody with no capabilities
// at all (and keeps the parent-death signal, which a uid change clears).
func asNobody(args ...string) []string {
	return append([]string{"setpriv", fmt.Sprintf("--reuid=%d", nobodyUID), fmt.Sprintf("--regid=%d", nobodyGID),
		"--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig", "keep"}, args...)
}

// nsEnv is a netstack test environment: the topology with gateway and
// agent (the agent resolving with the LAN host's DNS), plus a directory
// the unprivileged user can use.
type nsEnv struct {
	*env
	pub      string // 0755 directory: binary copy, nobody's home and state dirs
	bin      string // nlvpn, readable and executable by nobody
	home     string
	agentDir string
}

// setAgentResolver makes every process started with `ip netns exec NS`
// (the lab starts them that way) see a resolv.conf naming the LAN host's
// DNS: ip-netns(8) bind-mounts /etc/netns/NS/resolv.conf over
// /etc/resolv.conf. The directory is removed, by exact name, at cleanup.
func setAgentResolver(t *testing.T, ns string, server netip.Addr) {
	t.Helper()
	if ns == "" || strings.ContainsAny(ns, "/.") {
		t.Fatalf("bad namespace name %q", ns)
	}
	dir := filepath.Join("/etc/netns", ns)
	if _, err := os.Stat(dir); err == nil {
		t.Fatalf("%s already exists", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing %s: %v", dir, err)
		}
	})
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte("nameserver "+server.String()+"\noptions timeout:1 attempts:2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// newNetstackEnv builds the topology without a TUN client.
func newNetstackEnv(t *testing.T) *nsEnv {
	t.Helper()
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) not found: cannot run the client unprivileged")
	}
	opts := coneCone
	opts.Prefix = lab.RandomPrefix()
	// Namespace names follow from the prefix (lab.Prepare): set up the
	// agent namespace's resolv.conf before the agent starts. Registered
	// before the lab, so it is removed after the lab is torn down.
	setAgentResolver(t, lab.Prepare(opts).NS.Agent, lab.Prepare(opts).LANHost)

	pub, err := os.MkdirTemp("", "nlvpn-netstack-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	if err := os.Chmod(pub, 0o755); err != nil {
		t.Fatal(err)
	}
	n := &nsEnv{pub: pub, bin: filepath.Join(pub, "nlvpn"), home: filepath.Join(pub, "home")}
	// TestMain builds into a 0700 directory: copy the binary where nobody
	// can run it.
	b, err := os.ReadFile(nlvpnBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	n.nobodyDir(t, "home", 0o755)

	n.env = newEnv(t, opts, false)
	n.agentDir = filepath.Join(n.dir, "agent")
	return n
}

// nobodyDir makes pub/name owned by nobody.
func (n *nsEnv) nobodyDir(t *testing.T, name string, mode os.FileMode) string {
	t.Helper()
	d := filepath.Join(n.pub, name)
	if err := os.MkdirAll(d, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, nobodyUID, nobodyGID); err != nil {
		t.Fatal(err)
	}
	return d
}

func (n *nsEnv) nobodyEnv(extra ...string) []string {
	return append(append(n.procEnv(), "HOME="+n.home, "XDG_CONFIG_HOME="+filepath.Join(n.home, ".config")), extra...)
}

// nodeArgs are the flags every client command needs.
func (n *nsEnv) nodeArgs(stateDir string) []string {
	return []string{"--token", n.clientTok, "--gateway", n.gwAddr(), "--state-dir", stateDir}
}

// startNobody starts `nlvpn args...` as nobody in the client namespace.
func (n *nsEnv) startNobody(t *testing.T, name string, env []string, args ...string) *lab.Process {
	t.Helper()
	n.mu.Lock()
	n.seq++
	logPath := filepath.Join(n.dir, fmt.Sprintf("%02d-%s.log", n.seq, name))
	n.mu.Unlock()
	p, err := n.lab.Start(n.lab.NS.Client, lab.ProcConfig{Name: name, Args: asNobody(append([]string{n.bin}, args...)...),
		Env: n.nobodyEnv(env...), LogPath: logPath})
	if err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
	return p
}

// startUntil starts a long-running nobody process and waits until check
// passes; if the process exits early (e.g. the agent is not registered
// yet) it is started again, all within readyTimeout.
func (n *nsEnv) startUntil(t *testing.T, name string, env []string, check func() error, args ...string) *lab.Process {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		p := n.startNobody(t, name, env, args...)
		err := n.poll(time.Until(deadline), func() error {
			if !p.Running() {
				return errStop(fmt.Errorf("%s exited: %s", name, p.ExitStatus()))
			}
			return check()
		})
		if err == nil {
			return p
		}
		if p.Running() || time.Until(deadline) < time.Second {
			t.Fatalf("%s not ready within %v: %v\nlog:\n%s", name, readyTimeout, err, p.Log())
		}
		t.Logf("%s exited early (%v), retrying; log:\n%s", name, err, p.Log())
		time.Sleep(500 * time.Millisecond)
	}
}

// cmdResult is a finished command.
type cmdResult struct {
	stdout, stderr string
	code           int
	err            error
	took           time.Duration
}

// runIn runs args in ns with stdin, bounded by timeout, and returns its
// output and exit code (-1 if it did not exit by itself).
func runIn(ns string, timeout time.Duration, env []string, stdin io.Reader, args ...string) cmdResult {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = stdin
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	err := cmd.Run()
	r := cmdResult{stdout: o.String(), stderr: e.String(), err: err, took: time.Since(start), code: -1}
	if cmd.ProcessState != nil {
		r.code = cmd.ProcessState.ExitCode()
	}
	return r
}

// proxyCurl runs curl in the client namespace with explicit proxy options
// (and none from the environment); it returns stdout.
func (n *nsEnv) proxyCurl(maxTime time.Duration, args ...string) (string, error) {
	full := append([]string{"env", "-u", "NO_PROXY", "-u", "no_proxy", "-u", "ALL_PROXY", "-u", "all_proxy",
		"-u", "http_proxy", "-u", "https_proxy", "-u", "HTTPS_PROXY",
		"curl", "-sS", "-f", "--max-time", fmt.Sprint(int(maxTime.Seconds()))}, args...)
	r := runIn(n.lab.NS.Client, maxTime+10*time.Second, nil, nil, full...)
	if r.err != nil {
		return r.stdout, fmt.Errorf("curl %v: %v: %s", args, r.err, strings.TrimSpace(r.stderr))
	}
	return r.stdout, nil
}

func (n *nsEnv) socksHealth(addr string) func() error {
	return func() error {
		out, err := n.proxyCurl(5*time.Second, "--socks5-hostname", addr, "http://"+lanName+"/health")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "ok" {
			return fmt.Errorf("unexpected /health body %q", out)
		}
		return nil
	}
}

// procStatus returns the Uid and CapEff lines of /proc/PID/status.
func procStatus(pid int) (uid, capEff string, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return "", "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch k {
		case "Uid":
			uid = strings.TrimSpace(v)
		case "CapEff":
			capEff = strings.TrimSpace(v)
		}
	}
	return uid, capEff, nil
}

// TestNetstack runs the unprivileged client's checks on one cone/cone
// topology; the agent-loopback subtest restarts the agent and runs last.
func TestNetstack(t *testing.T) {
	t.Parallel()
	n := newNetstackEnv(t)
	upDir := n.nobodyDir(t, "up", 0o700)
	// No --netstack: nobody has no CAP_NET_ADMIN, so the client must pick
	// netstack mode by itself.
	up := n.startUntil(t, "client-netstack", nil, n.socksHealth(socksAddr),
		append([]string{"up", "--agent", agentName}, n.nodeArgs(upDir)...)...)
	t.Logf("netstack client up (pid %d)", up.PID())

	t.Run("Unprivileged", func(t *testing.T) {
		uid, capEff, err := procStatus(up.PID())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("client process: Uid %s, CapEff %s", uid, capEff)
		if f := strings.Fields(uid); len(f) < 2 || f[0] != strconv.Itoa(nobodyUID) || f[1] != strconv.Itoa(nobodyUID) {
			t.Errorf("client runs with Uid %q, want %d", uid, nobodyUID)
		}
		if strings.Trim(capEff, "0") != "" {
			t.Errorf("client has capabilities: CapEff %s", capEff)
		}
		var line string
		for _, l := range strings.Split(up.Log(), "\n") {
			if strings.HasPrefix(l, "nlvpn: netstack mode") {
				line = l
				break
			}
		}
		if line == "" {
			t.Fatalf("no line starting \"nlvpn: netstack mode\" in the client's output:\n%s", up.Log())
		}
		t.Logf("%s", line)
		for _, want := range []string{socksAddr, httpProxyAddr, "--socks5-hostname"} {
			if !strings.Contains(line, want) {
				t.Errorf("mode line does not mention %q: %s", want, line)
			}
		}
		if _, err := os.Stat(filepath.Join(upDir, "known_agents")); err != nil {
			t.Errorf("the client did not pin the agent's key in its state dir: %v", err)
		}
		// And it made no TUN device.
		if out, err := lab.Output(context.Background(), n.lab.NS.Client, "ip", "-o", "link", "show"); err == nil && strings.Contains(out, tunName) {
			t.Errorf("a TUN device exists in netstack mode:\n%s", out)
		}
	})

	t.Run("SOCKS5Download50MBByName", func(t *testing.T) {
		n.download50MB(t, 41, "--socks5-hostname", socksAddr)
	})

	t.Run("HTTPProxyDownload50MBByName", func(t *testing.T) {
		n.download50MB(t, 42, "-x", "http://"+httpProxyAddr)
	})

	t.Run("HTTPProxyConnect", func(t *testing.T) {
		// --proxytunnel: CONNECT through the HTTP proxy, by name.
		out, err := n.proxyCurl(30*time.Second, "-p", "-x", "http://"+httpProxyAddr, "http://"+lanName+"/health")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "ok" {
			t.Fatalf("/health via CONNECT: %q", out)
		}
	})

	t.Run("SOCKS5UDPAssociate", func(t *testing.T) {
		socksUDPEcho(t, n.lab.NS.Client, socksAddr, nil, []socksTarget{
			{ip: n.lab.LANHost, port: udpEchoPort},
			{name: lanName, port: udpEchoPort},
		})
	})

	t.Run("SOCKS5Concurrent200", func(t *testing.T) {
		socksConcurrent(t, n, 200, 16<<10)
	})

	t.Run("SOCKS5Hostile", func(t *testing.T) {
		socksHostile(t, n)
	})

	t.Run("SSHProxyCommand", func(t *testing.T) {
		sshViaConnect(t, n)
	})

	t.Run("ForwardTCP", func(t *testing.T) {
		fwdDir := n.nobodyDir(t, "forward", 0o700)
		check := func() error {
			out, err := n.proxyCurl(5*time.Second, "http://127.0.0.1:18080/health")
			if err != nil {
				return err
			}
			if strings.TrimSpace(out) != "ok" {
				return fmt.Errorf("unexpected /health body %q", out)
			}
			return nil
		}
		fwd := n.startUntil(t, "forward", nil, check,
			append([]string{"forward", "-n", agentName, "-L", fmt.Sprintf("127.0.0.1:18080:%s:%d", n.lab.LANHost, httpPort),
				"-L", fmt.Sprintf("18081:%s:%d", lanName, httpPort)}, n.nodeArgs(fwdDir)...)...)
		defer fwd.Stop()
		// The second forward names its target by the LAN-only name.
		const size, seed = 4 << 20, 43
		out := filepath.Join(n.dir, "fwd.bin")
		if _, err := n.proxyCurl(60*time.Second, "-o", out, fmt.Sprintf("http://127.0.0.1:18081/data?size=%d&seed=%d", size, seed)); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(out)
		if got, want := fileSHA256(t, out), streamSHA256(seed, size); got != want {
			t.Fatalf("download through the forward by name: sha256 %s, want %s", got, want)
		}
	})

	t.Run("ForwardUDP", func(t *testing.T) {
		fwdDir := n.nobodyDir(t, "forward-udp", 0o700)
		fwd := n.startNobody(t, "forward-udp", nil,
			append([]string{"forward", "-n", agentName, "-U", fmt.Sprintf("127.0.0.1:17007:%s:%d", n.lab.LANHost, udpEchoPort)}, n.nodeArgs(fwdDir)...)...)
		defer fwd.Stop()
		c, err := lab.ListenUDP(n.lab.NS.Client, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		dst := netip.MustParseAddrPort("127.0.0.1:17007")
		buf := make([]byte, 2048)
		err = n.poll(readyTimeout, func() error {
			if !fwd.Running() {
				return errStop(fmt.Errorf("forward exited: %s\n%s", fwd.ExitStatus(), fwd.Log()))
			}
			msg := []byte("udp-forward-" + strconv.FormatInt(time.Now().UnixNano(), 10))
			c.WriteToUDPAddrPort(msg, dst)
			c.SetReadDeadline(time.Now().Add(time.Second))
			for i := 0; i < 10; i++ {
				k, _, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return err
				}
				if bytes.Equal(buf[:k], msg) {
					return nil
				}
			}
			return errors.New("no matching echo")
		})
		if err != nil {
			t.Fatalf("UDP through forward -U: %v", err)
		}
	})

	connDir := n.nobodyDir(t, "connect", 0o700)
	connect := func(timeout time.Duration, stdin io.Reader, args ...string) cmdResult {
		full := asNobody(append(append([]string{n.bin, "connect"}, n.nodeArgs(connDir)...), args...)...)
		return runIn(n.lab.NS.Client, timeout, n.nobodyEnv(), stdin, full...)
	}

	t.Run("ConnectRefused", func(t *testing.T) {
		r := connect(60*time.Second, nil, "-n", agentName, fmt.Sprintf("%s:1", n.lab.LANHost))
		t.Logf("connect to a closed port: exit %d after %v; stderr: %s", r.code, r.took.Round(time.Millisecond), strings.TrimSpace(r.stderr))
		if r.code <= 0 {
			t.Fatalf("exit code %d, want non-zero (err %v)", r.code, r.err)
		}
		if !strings.Contains(strings.ToLower(r.stderr), "refused") {
			t.Errorf("stderr does not say refused: %q", r.stderr)
		}
	})

	t.Run("ConnectUnknownAgent", func(t *testing.T) {
		r := connect(60*time.Second, nil, "-n", "nosuchagent", fmt.Sprintf("%s:%d", n.lab.LANHost, tcpEchoPort))
		t.Logf("connect to an unknown agent: exit %d after %v; stderr: %s", r.code, r.took.Round(time.Millisecond), strings.TrimSpace(r.stderr))
		if r.code <= 0 {
			t.Fatalf("exit code %d, want non-zero (err %v)", r.code, r.err)
		}
		if !strings.Contains(r.stderr, "nosuchagent") {
			t.Errorf("stderr does not name the agent: %q", r.stderr)
		}
	})

	t.Run("ConnectEcho", func(t *testing.T) {
		data := streamBytes(44, 256<<10)
		r := connect(60*time.Second, bytes.NewReader(data), "-n", agentName, fmt.Sprintf("%s:%d", lanName, tcpEchoPort))
		if r.code != 0 {
			t.Fatalf("exit %d (%v); stderr: %s", r.code, r.err, r.stderr)
		}
		if r.stdout != string(data) {
			t.Fatalf("echo through connect: sent %d bytes, got %d back", len(data), len(r.stdout))
		}
	})

	t.Run("ConnectHangupClosesFlow", func(t *testing.T) {
		connectHangup(t, n, connDir)
	})

	t.Run("AgentLoopback", func(t *testing.T) {
		// A TCP echo on the agent host's own loopback.
		ln, err := lab.Listen(n.lab.NS.Agent, "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() {
					defer c.Close()
					c.SetDeadline(time.Now().Add(time.Minute))
					io.Copy(c, c)
				}()
			}
		}()
		target := ln.Addr().String()
		const msg = "hello agent loopback\n"

		r := connect(60*time.Second, strings.NewReader(msg), "-n", agentName, target)
		t.Logf("without --allow-loopback: exit %d; stderr: %s", r.code, strings.TrimSpace(r.stderr))
		if r.code <= 0 {
			t.Errorf("connect to the agent's loopback %s without --allow-loopback: exit %d, want non-zero; stdout %q", target, r.code, r.stdout)
		}
		if !strings.Contains(strings.ToLower(r.stderr), "refused") {
			t.Errorf("stderr does not say refused: %q", r.stderr)
		}
		if strings.Contains(r.stdout, "hello") {
			t.Errorf("data reached the agent's loopback without --allow-loopback")
		}
		if !strings.Contains(n.agent.Log(), "loopback") {
			t.Errorf("the agent did not log the refused loopback connection")
		}

		// Restart the agent (same state, so the same pinned key) with
		// --allow-loopback.
		n.agent.Stop()
		n.agent = n.start(t, n.lab.NS.Agent, "agent-loopback", "agent", "--token", n.agentTok, "--gateway", n.gwAddr(),
			"--advertise", n.lab.LANSubnet.String(), "--state-dir", n.agentDir, "--allow-loopback")
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := n.agent.WaitLog(ctx, "registered"); err != nil {
			t.Fatalf("agent with --allow-loopback: %v", err)
		}
		err = n.poll(readyTimeout, func() error {
			r = connect(30*time.Second, strings.NewReader(msg), "-n", agentName, target)
			if r.code != 0 {
				return fmt.Errorf("exit %d: %s", r.code, strings.TrimSpace(r.stderr))
			}
			if r.stdout != msg {
				return errStop(fmt.Errorf("echo through the agent's loopback: got %q, want %q", r.stdout, msg))
			}
			return nil
		})
		if err != nil {
			t.Fatalf("connect to the agent's loopback with --allow-loopback: %v", err)
		}
	})
}

// download50MB fetches 50 MB from the LAN host by its LAN-only name
// through a proxy (curl proxy flags in proxyArgs) and checks the sha256.
func (n *nsEnv) download50MB(t *testing.T, seed uint64, proxyArgs ...string) {
	const size = 50 << 20
	out := filepath.Join(n.dir, fmt.Sprintf("download-%d.bin", seed))
	defer os.Remove(out)
	args := append(append([]string{}, proxyArgs...), "-o", out, fmt.Sprintf("http://%s/data?size=%d&seed=%d", lanName, size, seed))
	start := time.Now()
	if _, err := n.proxyCurl(150*time.Second, args...); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if got, want := fileSHA256(t, out), streamSHA256(seed, size); got != want {
		t.Fatalf("sha256 of download %s, want %s", got, want)
	}
	t.Logf("50 MB by name in %v (%.1f MB/s)", took.Round(time.Millisecond), float64(size)/(1<<20)/took.Seconds())
}

// ---------------------------------------------------------------- SOCKS5

type socksTarget struct {
	ip   netip.Addr
	name string
	port uint16
}

func (s socksTarget) String() string {
	if s.name != "" {
		return net.JoinHostPort(s.name, strconv.Itoa(int(s.port)))
	}
	return netip.AddrPortFrom(s.ip, s.port).String()
}

// appendAddr appends a SOCKS5 ATYP/address/port.
func (s socksTarget) appendAddr(b []byte) []byte {
	switch {
	case s.name != "":
		b = append(b, 3, byte(len(s.name)))
		b = append(b, s.name...)
	case s.ip.Is4():
		b = append(b, 1)
		b = append(b, s.ip.AsSlice()...)
	default:
		b = append(b, 4)
		b = append(b, s.ip.AsSlice()...)
	}
	return binary.BigEndian.AppendUint16(b, s.port)
}

// readSocksAddr reads ATYP/address/port.
func readSocksAddr(r io.Reader) (netip.AddrPort, error) {
	var atyp [1]byte
	if _, err := io.ReadFull(r, atyp[:]); err != nil {
		return netip.AddrPort{}, err
	}
	var n int
	switch atyp[0] {
	case 1:
		n = 4
	case 4:
		n = 16
	default:
		return netip.AddrPort{}, fmt.Errorf("reply address type %d", atyp[0])
	}
	b := make([]byte, n+2)
	if _, err := io.ReadFull(r, b); err != nil {
		return netip.AddrPort{}, err
	}
	ip, _ := netip.AddrFromSlice(b[:n])
	return netip.AddrPortFrom(ip, binary.BigEndian.Uint16(b[n:])), nil
}

// socksHandshake does the greeting (with user/password when auth is set)
// and sends a request; it returns the bound address of a success reply.
func socksHandshake(c net.Conn, auth *proxy.Auth, cmd byte, dst socksTarget) (netip.AddrPort, error) {
	method := byte(0)
	if auth != nil {
		method = 2
	}
	if _, err := c.Write([]byte{5, 1, method}); err != nil {
		return netip.AddrPort{}, err
	}
	var sel [2]byte
	if _, err := io.ReadFull(c, sel[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("method selection: %w", err)
	}
	if sel != [2]byte{5, method} {
		return netip.AddrPort{}, fmt.Errorf("method selection % x", sel)
	}
	if auth != nil {
		b := []byte{1, byte(len(auth.User))}
		b = append(b, auth.User...)
		b = append(b, byte(len(auth.Password)))
		b = append(b, auth.Password...)
		if _, err := c.Write(b); err != nil {
			return netip.AddrPort{}, err
		}
		var st [2]byte
		if _, err := io.ReadFull(c, st[:]); err != nil {
			return netip.AddrPort{}, fmt.Errorf("auth status: %w", err)
		}
		if st[1] != 0 {
			return netip.AddrPort{}, fmt.Errorf("auth status % x", st)
		}
	}
	if _, err := c.Write(dst.appendAddr([]byte{5, cmd, 0})); err != nil {
		return netip.AddrPort{}, err
	}
	var h [3]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("reply: %w", err)
	}
	if h[0] != 5 || h[1] != 0 {
		return netip.AddrPort{}, fmt.Errorf("reply % x", h)
	}
	return readSocksAddr(c)
}

// socksUDPEcho does UDP ASSOCIATE on the proxy at addr (sockets in ns) and
// exchanges datagrams with the UDP echo at each target.
func socksUDPEcho(t *testing.T, ns, addr string, auth *proxy.Auth, targets []socksTarget) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ctl, err := lab.DialContext(ctx, ns, "tcp4", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	ctl.SetDeadline(time.Now().Add(60 * time.Second))
	uc, err := lab.ListenUDP(ns, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	local := uc.LocalAddr().(*net.UDPAddr).AddrPort()
	relay, err := socksHandshake(ctl, auth, 3, socksTarget{ip: local.Addr(), port: local.Port()})
	if err != nil {
		t.Fatalf("UDP ASSOCIATE: %v", err)
	}
	if relay.Addr().IsUnspecified() {
		relay = netip.AddrPortFrom(netip.MustParseAddrPort(addr).Addr(), relay.Port())
	}
	t.Logf("UDP relay at %v", relay)
	buf := make([]byte, 65536)
	for i := 0; i < 10; i++ {
		tg := targets[i%len(targets)]
		payload := []byte(fmt.Sprintf("socks-udp-%d-%x", i, streamBytes(uint64(200+i), 32+i*100)))
		pkt := tg.appendAddr([]byte{0, 0, 0})
		pkt = append(pkt, payload...)
		ok := false
		for try := 0; try < 3 && !ok; try++ {
			if _, err := uc.WriteToUDPAddrPort(pkt, relay); err != nil {
				t.Fatal(err)
			}
			uc.SetReadDeadline(time.Now().Add(2 * time.Second))
			for !ok {
				k, _, err := uc.ReadFromUDPAddrPort(buf)
				if err != nil {
					break
				}
				r := bytes.NewReader(buf[:k])
				var hdr [3]byte
				if _, err := io.ReadFull(r, hdr[:]); err != nil || hdr != [3]byte{} {
					t.Errorf("reply header % x", hdr)
					continue
				}
				from, err := readSocksAddr(r)
				if err != nil {
					t.Errorf("reply address: %v", err)
					continue
				}
				got, _ := io.ReadAll(r)
				if bytes.Equal(got, payload) {
					ok = true
					if from.Port() != tg.port || (tg.ip.IsValid() && from.Addr() != tg.ip) {
						t.Errorf("echo to %v came back from %v", tg, from)
					}
				}
			}
		}
		if !ok {
			t.Fatalf("no echo through UDP ASSOCIATE for datagram %d to %v after 3 tries", i, tg)
		}
	}
}

type nsDialer struct{ ns string }

func (d nsDialer) Dial(network, addr string) (net.Conn, error) {
	return lab.DialContext(context.Background(), d.ns, network, addr)
}

func (d nsDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return lab.DialContext(ctx, d.ns, network, addr)
}

// socksConcurrent opens count SOCKS5 connections at once (golang.org/x/net
// SOCKS5 client, sockets in the client namespace) to the LAN host's TCP
// echo, every fourth by name, each with distinct data.
func socksConcurrent(t *testing.T, n *nsEnv, count, size int) {
	d, err := proxy.SOCKS5("tcp4", socksAddr, nil, nsDialer{n.lab.NS.Client})
	if err != nil {
		t.Fatal(err)
	}
	cd := d.(proxy.ContextDialer)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	errs := make(chan error, count)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < count; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			host := n.lab.LANHost.String()
			if i%4 == 0 {
				host = lanName
			}
			errs <- socksEchoOnce(ctx, cd, net.JoinHostPort(host, strconv.Itoa(tcpEchoPort)), streamBytes(uint64(3000+i), size+i))
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
		t.Fatalf("%d of %d SOCKS5 connections failed; first errors: %v", failed, count, first)
	}
}

func socksEchoOnce(ctx context.Context, d proxy.ContextDialer, target string, data []byte) error {
	c, err := d.DialContext(ctx, "tcp", target)
	if err != nil {
		return fmt.Errorf("socks dial %s: %w", target, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	// The x/net SOCKS5 conn hides CloseWrite: write everything and read
	// the same number of bytes back.
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		werr <- err
	}()
	got := make([]byte, len(data))
	k, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read after %d of %d bytes: %w", k, len(data), rerr)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("echo mismatch in %d bytes", len(data))
	}
	return nil
}

// hostileCase is raw bytes sent to a proxy, after which the proxy must
// answer (optionally) and close.
type hostileCase struct {
	name string
	addr string
	send []byte
	// halfClose shuts our write side after sending (a truncated message).
	halfClose bool
	// check inspects everything the proxy sent before closing.
	check func(got []byte) error
}

// expectReply checks the proxy's bytes start with prefix (nil: anything).
func expectPrefix(prefix ...byte) func([]byte) error {
	return func(got []byte) error {
		if !bytes.HasPrefix(got, prefix) {
			return fmt.Errorf("proxy answered % x, want a reply starting % x", got, prefix)
		}
		return nil
	}
}

// expectFailureReply wants the method selection "no auth" (or nothing)
// and then either nothing or a SOCKS5 reply with a non-zero REP.
func expectFailureReply(got []byte) error {
	if len(got) == 0 {
		return nil
	}
	if len(got) < 2 || got[0] != 5 || got[1] != 0 {
		return fmt.Errorf("proxy answered % x, want 05 00 (no auth) first", got)
	}
	if rest := got[2:]; len(rest) >= 2 && rest[1] == 0 {
		return fmt.Errorf("proxy replied success to a bad request: % x", got)
	}
	return nil
}

func socksHostile(t *testing.T, n *nsEnv) {
	authDir := n.nobodyDir(t, "up-auth", 0o700)
	auth := &proxy.Auth{User: "u", Password: "p"}
	// Its own client (own state dir) with credentials on the SOCKS5 proxy
	// and no HTTP proxy.
	ap := n.startUntil(t, "client-auth", []string{"NLVPN_PROXY_PASSWORD=" + auth.Password}, func() error {
		c, err := lab.DialContext(context.Background(), n.lab.NS.Client, "tcp4", authSocksAddr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = socksHandshake(c, auth, 1, socksTarget{ip: n.lab.LANHost, port: tcpEchoPort})
		return err
	}, append([]string{"up", "--netstack", "--agent", agentName, "--socks5", authSocksAddr, "--http-proxy", "", "--proxy-user", auth.User},
		n.nodeArgs(authDir)...)...)
	defer ap.Stop()

	req := func(b ...byte) []byte { return b }
	greet := req(5, 1, 0)
	cases := []hostileCase{
		{name: "SOCKS4", addr: socksAddr, send: req(4, 1, 0, 80, 192, 168, 77, 10, 'x', 0)},
		{name: "HTTPToSOCKS", addr: socksAddr, send: []byte("GET / HTTP/1.0\r\n\r\n")},
		{name: "NoMethods", addr: socksAddr, send: req(5, 0), halfClose: true},
		{name: "TruncatedGreeting", addr: socksAddr, send: req(5, 200, 0, 1), halfClose: true},
		{name: "TruncatedRequest", addr: socksAddr, send: append(greet, 5, 1, 0, 1, 192, 168), halfClose: true, check: expectFailureReply},
		{name: "TruncatedDomain", addr: socksAddr, send: append(greet, 5, 1, 0, 3, 255, 'a', 'b'), halfClose: true, check: expectFailureReply},
		{name: "HugeDomainLength", addr: socksAddr, send: append(append(greet, 5, 1, 0, 3, 255), append(bytes.Repeat([]byte{0xff}, 255), 0, 80)...), check: expectFailureReply},
		{name: "ZeroDomainLength", addr: socksAddr, send: append(greet, 5, 1, 0, 3, 0, 0, 80), check: expectFailureReply},
		{name: "BadRequestVersion", addr: socksAddr, send: append(greet, 4, 1, 0, 1, 192, 168, 77, 10, 0, 80), check: expectFailureReply},
		{name: "BadCommand", addr: socksAddr, send: append(greet, 5, 9, 0, 1, 192, 168, 77, 10, 0, 80), check: expectFailureReply},
		{name: "BadAddressType", addr: socksAddr, send: append(greet, 5, 1, 0, 7, 192, 168, 77, 10, 0, 80), check: expectFailureReply},
		{name: "NoAuthWhenRequired", addr: authSocksAddr, send: greet, check: expectPrefix(5, 0xff)},
		{name: "NoAuthRequestAnyway", addr: authSocksAddr, send: append(greet, 5, 1, 0, 1, 192, 168, 77, 10, 0x23, 0x28), check: expectPrefix(5, 0xff)},
		{name: "WrongPassword", addr: authSocksAddr, send: req(5, 1, 2, 1, 1, 'u', 5, 'w', 'r', 'o', 'n', 'g'), check: expectAuthFailure},
		{name: "WrongUser", addr: authSocksAddr, send: req(5, 1, 2, 1, 1, 'x', 1, 'p'), check: expectAuthFailure},
		{name: "HugeUserLength", addr: authSocksAddr, send: append(req(5, 1, 2, 1, 255), bytes.Repeat([]byte{'u'}, 100)...), halfClose: true, check: expectPrefix(5, 2)},
		{name: "BadAuthVersion", addr: authSocksAddr, send: req(5, 1, 2, 9, 1, 'u', 1, 'p'), check: expectPrefix(5, 2)},
	}
	for _, hc := range cases {
		t.Run(hc.name, func(t *testing.T) {
			got, err := hostileExchange(n.lab.NS.Client, hc)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("proxy sent % x, then closed", got)
			if hc.check != nil {
				if err := hc.check(got); err != nil {
					t.Error(err)
				}
			}
			// A CONNECT success must never follow hostile input.
			if bytes.Contains(got, []byte{5, 0, 0, 1, 192, 168, 77, 10}) {
				t.Errorf("proxy connected on hostile input: % x", got)
			}
		})
	}
	// A slow, idle connection holds nothing up: open one, leave it, and
	// check good clients still work on both proxies.
	idle, err := lab.DialContext(context.Background(), n.lab.NS.Client, "tcp4", socksAddr)
	if err == nil {
		defer idle.Close()
	}
	for _, tc := range []struct {
		addr string
		auth *proxy.Auth
	}{{socksAddr, nil}, {authSocksAddr, auth}} {
		d, err := proxy.SOCKS5("tcp4", tc.addr, tc.auth, nsDialer{n.lab.NS.Client})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err = socksEchoOnce(ctx, d.(proxy.ContextDialer), net.JoinHostPort(lanName, strconv.Itoa(tcpEchoPort)), streamBytes(77, 64<<10))
		cancel()
		if err != nil {
			t.Errorf("good client on %s after the hostile ones: %v", tc.addr, err)
		}
	}
	socksUDPEcho(t, n.lab.NS.Client, authSocksAddr, auth, []socksTarget{{ip: n.lab.LANHost, port: udpEchoPort}})
	if !ap.Running() || !n.agent.Running() {
		t.Fatalf("a process exited: auth client running %v, agent running %v", ap.Running(), n.agent.Running())
	}
}

// expectAuthFailure wants method 2 selected, then a non-zero status.
func expectAuthFailure(got []byte) error {
	if len(got) < 4 || got[0] != 5 || got[1] != 2 || got[3] == 0 {
		return fmt.Errorf("proxy answered % x, want 05 02 then a failed auth status", got)
	}
	return nil
}

// hostileExchange sends hc.send and reads until the proxy closes; a proxy
// that keeps the connection open for 10 s is an error.
func hostileExchange(ns string, hc hostileCase) ([]byte, error) {
	c, err := lab.DialContext(context.Background(), ns, "tcp4", hc.addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(hc.send); err != nil {
		return nil, fmt.Errorf("write: %w", err)
	}
	if hc.halfClose {
		c.(*net.TCPConn).CloseWrite()
	}
	got, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return got, fmt.Errorf("proxy still holds the connection open 10s after bad input (sent % x, got % x)", hc.send, got)
	}
	// A reset is a close too.
	return got, nil
}

// ---------------------------------------------------------------- ssh

// sshViaConnect runs sshd in the LAN namespace and ssh (as nobody, in the
// client namespace) with ProxyCommand `nlvpn connect`.
func sshViaConnect(t *testing.T, n *nsEnv) {
	sshd, err := exec.LookPath("sshd")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/sshd"); err2 != nil {
			t.Skip("sshd not installed (apt-get install openssh-server openssh-client; CI installs it)")
		}
		sshd = "/usr/sbin/sshd"
	}
	for _, tool := range []string{"ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install openssh-client; CI installs it)", tool)
		}
	}
	// sshd's privilege-separation directory; harmless to leave.
	if _, err := os.Stat("/run/sshd"); errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(n.dir, "sshd")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	keygen := func(path string) {
		if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nlvpn-e2e", "-f", path).CombinedOutput(); err != nil {
			t.Fatalf("ssh-keygen: %v\n%s", err, out)
		}
	}
	hostKey := filepath.Join(dir, "host_ed25519")
	keygen(hostKey)
	userDir := n.nobodyDir(t, "ssh", 0o700)
	userKey := filepath.Join(userDir, "id_ed25519")
	keygen(userKey)
	for _, f := range []string{userKey, userKey + ".pub"} {
		if err := os.Chown(f, nobodyUID, nobodyGID); err != nil {
			t.Fatal(err)
		}
	}
	pubKey, err := os.ReadFile(userKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	authKeys := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authKeys, pubKey, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "sshd_config")
	conf := fmt.Sprintf(`ListenAddress %s:22
HostKey %s
PidFile %s
AuthorizedKeysFile %s
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding no
`, n.lab.LANHost, hostKey, filepath.Join(dir, "sshd.pid"), authKeys)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := lab.Output(context.Background(), n.lab.NS.LAN, sshd, "-t", "-f", cfg); err != nil {
		t.Fatalf("sshd -t: %v\n%s", err, out)
	}
	sp, err := n.lab.Start(n.lab.NS.LAN, lab.ProcConfig{Name: "sshd", Args: []string{sshd, "-D", "-e", "-f", cfg},
		LogPath: filepath.Join(n.dir, "sshd.log")})
	if err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, sp)
	n.mu.Unlock()
	defer sp.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := sp.WaitLog(ctx, "Server listening"); err != nil {
		t.Fatalf("sshd: %v\n%s", err, sp.Log())
	}

	connDir := n.nobodyDir(t, "ssh-connect", 0o700)
	proxyCmd := fmt.Sprintf("%s connect -n %s --gateway %s --state-dir %s --token %s %%h:%%p",
		n.bin, agentName, n.gwAddr(), connDir, n.clientTok)
	args := asNobody("ssh", "-F", "/dev/null", "-i", userKey,
		"-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
		"-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30",
		"-o", "ProxyCommand="+proxyCmd, "root@"+n.lab.LANHost.String(), "echo", "nlvpn-ssh-ok", "$((6*7))")
	r := runIn(n.lab.NS.Client, 90*time.Second, n.nobodyEnv(), nil, args...)
	t.Logf("ssh: exit %d after %v; stderr: %s", r.code, r.took.Round(time.Millisecond), strings.TrimSpace(r.stderr))
	if r.code != 0 || strings.TrimSpace(r.stdout) != "nlvpn-ssh-ok 42" {
		t.Fatalf("ssh through nlvpn connect: exit %d (%v), stdout %q, want \"nlvpn-ssh-ok 42\"\nsshd log:\n%s", r.code, r.err, r.stdout, sp.Log())
	}

	// By the LAN-only name as HostName, the way a ~/.ssh/config would.
	args2 := append([]string{}, args...)
	args2[len(args2)-4] = "root@" + lanName
	r = runIn(n.lab.NS.Client, 90*time.Second, n.nobodyEnv(), nil, args2...)
	if r.code != 0 || strings.TrimSpace(r.stdout) != "nlvpn-ssh-ok 42" {
		t.Fatalf("ssh by name through nlvpn connect: exit %d (%v), stdout %q, stderr %s", r.code, r.err, r.stdout, r.stderr)
	}
}

// connectHangup checks that when `nlvpn connect` is killed by SIGHUP (what
// ssh does to its ProxyCommand when it exits) the connection it made on the
// LAN is closed, within a bounded wait, instead of lingering on the agent.
func connectHangup(t *testing.T, n *nsEnv, stateDir string) {
	ln, err := lab.Listen(n.lab.NS.LAN, "tcp4", net.JoinHostPort(n.lab.LANHost.String(), "9100"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	full := asNobody(append(append([]string{n.bin, "connect"}, n.nodeArgs(stateDir)...), "-n", agentName, net.JoinHostPort(n.lab.LANHost.String(), "9100"))...)
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.lab.NS.Client}, full...)...)
	cmd.Env = append(os.Environ(), n.nobodyEnv()...)
	stdin, err := cmd.StdinPipe() // held open: only the signal ends it
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	select {
	case c = <-accepted:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the LAN host saw no connection from nlvpn connect; stderr: %s", stderr.String())
	}
	defer c.Close()
	if _, err := stdin.Write([]byte("before hangup\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if k, err := io.ReadFull(c, buf[:len("before hangup\n")]); err != nil {
		t.Fatalf("data before the hangup: got %q: %v", buf[:k], err)
	}
	// The signal goes to our own child, by PID (ip netns exec and setpriv
	// exec, so it is nlvpn's PID).
	cmd.Process.Signal(syscall.SIGHUP)
	werr := cmd.Wait()
	t.Logf("nlvpn connect after SIGHUP: %v; stderr: %s", werr, strings.TrimSpace(stderr.String()))
	const grace = 60 * time.Second
	c.SetReadDeadline(time.Now().Add(grace))
	k, err := c.Read(buf)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Errorf("the LAN-side connection is still open %v after nlvpn connect was killed by SIGHUP "+
			"(ssh sends SIGHUP to its ProxyCommand when it exits, so every ssh session leaks a connection on the agent's LAN)", grace)
	case err == nil:
		t.Errorf("unexpected data %q on the LAN side after the hangup", buf[:k])
	default:
		t.Logf("LAN-side connection closed after the hangup: %v", err)
	}
}
