//go:build linux

package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// requireLab skips the test when this machine cannot build namespaces.
func requireLab(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("lab tests need root (network namespaces, nftables); run as root, e.g. in CI")
	}
	if err := Check(); err != nil {
		t.Skipf("cannot build the namespace lab here: %v", err)
	}
}

func newLab(t *testing.T, opts Options) *Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("lab.New(%+v): %v", opts, err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

// observer is a TCP+UDP listener in the gw namespace that reports the
// source address of what it receives.
type observer struct {
	tcp  net.Listener
	udp  []*net.UDPConn
	seen chan netip.AddrPort
}

func newObserver(t *testing.T, l *Lab, tcpPort int, udpPorts ...int) *observer {
	t.Helper()
	o := &observer{seen: make(chan netip.AddrPort, 64)}
	ln, err := Listen(l.NS.GW, "tcp4", fmt.Sprintf("%s:%d", l.Gateway, tcpPort))
	if err != nil {
		t.Fatal(err)
	}
	o.tcp = ln
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.seen <- c.RemoteAddr().(*net.TCPAddr).AddrPort()
			c.Write([]byte("hello\n"))
			c.Close()
		}
	}()
	for _, p := range udpPorts {
		uc, err := ListenUDP(l.NS.GW, net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.Gateway, uint16(p))))
		if err != nil {
			t.Fatal(err)
		}
		o.udp = append(o.udp, uc)
		t.Cleanup(func() { uc.Close() })
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := uc.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				o.seen <- netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
				uc.WriteToUDPAddrPort(buf[:n], from)
			}
		}()
	}
	return o
}

func (o *observer) next(t *testing.T) netip.AddrPort {
	t.Helper()
	select {
	case ap := <-o.seen:
		return ap
	case <-time.After(5 * time.Second):
		t.Fatal("observer saw nothing within 5s")
		return netip.AddrPort{}
	}
}

func TestLabVariants(t *testing.T) {
	requireLab(t)
	cases := []struct {
		name string
		opts Options
	}{
		{"cone-cone", Options{ClientNAT: Cone, AgentNAT: Cone}},
		{"symmetric-symmetric", Options{ClientNAT: Symmetric, AgentNAT: Symmetric}},
		{"none-cone", Options{ClientNAT: None, AgentNAT: Cone}},
		{"none-none", Options{ClientNAT: None, AgentNAT: None}},
		{"samelan", Options{ClientNAT: Cone, SameLAN: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, tc.opts)
			checkLab(t, l)
			if err := l.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := l.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			left, err := ListNamespaces(l.Prefix)
			if err != nil {
				t.Fatal(err)
			}
			if len(left) != 0 {
				t.Fatalf("namespaces left after Close: %v", left)
			}
		})
	}
}

func checkLab(t *testing.T, l *Lab) {
	ctx := context.Background()
	t.Logf("prefix %s, namespaces %v", l.Prefix, l.Namespaces())
	for _, ns := range l.Namespaces() {
		out, err := Output(ctx, ns, "ip", "-br", "link", "show", "lo")
		if err != nil || !strings.Contains(out, "UP") {
			t.Errorf("lo not up in %s: %q %v", ns, out, err)
		}
	}

	obs := newObserver(t, l, 7000, 7001, 7002)

	// ICMP and TCP from both nodes to the gateway; the gateway sees the
	// public (NAT WAN) address, never 10.x.
	for _, side := range []struct {
		name, ns string
		pub      netip.Addr
	}{{"client", l.NS.Client, l.ClientPublic}, {"agent", l.NS.Agent, l.AgentPublic}} {
		if out, err := Output(ctx, side.ns, "ping", "-c", "1", "-W", "3", l.Gateway.String()); err != nil {
			t.Errorf("%s cannot ping gateway: %v\n%s", side.name, err, out)
		}
		c, err := DialContext(ctx, side.ns, "tcp4", fmt.Sprintf("%s:7000", l.Gateway))
		if err != nil {
			t.Fatalf("%s cannot reach gateway TCP: %v", side.name, err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		if string(b) != "hello\n" {
			t.Errorf("%s: got %q from gateway", side.name, b)
		}
		if got := obs.next(t).Addr(); got != side.pub {
			t.Errorf("%s: gateway saw source %v, want public %v", side.name, got, side.pub)
		}
	}

	// UDP mapping: one socket to two gateway ports.
	c, err := ListenUDP(l.NS.Client, &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	local := uint16(c.LocalAddr().(*net.UDPAddr).Port)
	var mapped []netip.AddrPort
	for _, port := range []uint16{7001, 7002} {
		if _, err := c.WriteToUDPAddrPort([]byte("x"), l.GatewayAddrPort(port)); err != nil {
			t.Fatal(err)
		}
		mapped = append(mapped, obs.next(t))
	}
	t.Logf("client UDP local port %d mapped to %v (NAT %v)", local, mapped, l.Opts.ClientNAT)
	for _, m := range mapped {
		if m.Addr() != l.ClientPublic {
			t.Errorf("UDP source seen by gateway %v, want %v", m.Addr(), l.ClientPublic)
		}
	}
	switch {
	case l.Opts.ClientNAT == Symmetric:
		if mapped[0].Port() == local && mapped[1].Port() == local {
			t.Errorf("symmetric NAT kept the source port %d", local)
		}
	default: // none, cone, same-LAN cone
		if mapped[0].Port() != local || mapped[1].Port() != local {
			t.Errorf("cone/none: source port %d not kept: %v", local, mapped)
		}
	}

	// The LAN host is reachable from the agent only.
	lanLn, err := Listen(l.NS.LAN, "tcp4", fmt.Sprintf("%s:8080", l.LANHost))
	if err != nil {
		t.Fatal(err)
	}
	defer lanLn.Close()
	go func() {
		for {
			c, err := lanLn.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	lanTarget := fmt.Sprintf("%s:8080", l.LANHost)
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	ac, err := DialContext(dctx, l.NS.Agent, "tcp4", lanTarget)
	cancel()
	if err != nil {
		t.Errorf("agent cannot reach LAN host: %v", err)
	} else {
		ac.Close()
	}
	for _, from := range []string{l.NS.Client, l.NS.GW} {
		dctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		c, err := DialContext(dctx, from, "tcp4", lanTarget)
		cancel()
		if err == nil {
			c.Close()
			t.Errorf("LAN host reachable by TCP from %s", from)
		}
		if _, err := Output(ctx, from, "ping", "-c", "1", "-W", "1", l.LANHost.String()); err == nil {
			t.Errorf("LAN host answers ping from %s", from)
		}
	}

	if l.Opts.ClientNAT != Symmetric && l.Opts.AgentNAT != Symmetric {
		checkPunchAndBlock(t, l, obs)
	} else if l.Opts.ClientNAT == Symmetric && l.Opts.AgentNAT == Symmetric {
		if a, c := punchOnce(t, l, "sym"); a+c != 0 {
			t.Errorf("naive punch through symmetric/symmetric NAT got through (%d, %d packets)", a, c)
		}
	}
}

// punchOnce has client and agent send to each other's public address at
// fixed ports and returns how many datagrams each side received.
func punchOnce(t *testing.T, l *Lab, tag string) (agentGot, clientGot int) {
	const cport, aport = 43000, 44000
	cc, err := ListenUDP(l.NS.Client, &net.UDPAddr{Port: cport})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ac, err := ListenUDP(l.NS.Agent, &net.UDPAddr{Port: aport})
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	for i := 0; i < 10; i++ {
		cc.WriteToUDPAddrPort([]byte(tag), netip.AddrPortFrom(l.AgentPublic, aport))
		ac.WriteToUDPAddrPort([]byte(tag), netip.AddrPortFrom(l.ClientPublic, cport))
		time.Sleep(50 * time.Millisecond)
	}
	drain := func(c *net.UDPConn) int {
		n := 0
		buf := make([]byte, 100)
		for {
			c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
				return n
			}
			n++
		}
	}
	return drain(ac), drain(cc)
}

// checkPunchAndBlock simulates a hole punch between client and agent, then
// checks BlockDirect stops direct UDP but not UDP to the gateway.
func checkPunchAndBlock(t *testing.T, l *Lab, obs *observer) {
	ctx := context.Background()
	const cport, aport = 41000, 42000
	cc, err := ListenUDP(l.NS.Client, &net.UDPAddr{Port: cport})
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ac, err := ListenUDP(l.NS.Agent, &net.UDPAddr{Port: aport})
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	// Where each side aims: the peer's cone mapping (ports kept), or its
	// LAN address when both share a LAN.
	cDst := netip.AddrPortFrom(l.AgentPublic, aport)
	aDst := netip.AddrPortFrom(l.ClientPublic, cport)
	if l.Opts.SameLAN {
		cDst = netip.AddrPortFrom(l.AgentAddr, aport)
		aDst = netip.AddrPortFrom(l.ClientAddr, cport)
	}
	var mu sync.Mutex
	got := map[string]int{}
	recv := func(name string, c *net.UDPConn) {
		buf := make([]byte, 100)
		for {
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			mu.Lock()
			got[name+":"+string(buf[:n])]++
			mu.Unlock()
		}
	}
	go recv("client", cc)
	go recv("agent", ac)
	count := func(k string) int { mu.Lock(); defer mu.Unlock(); return got[k] }

	punch := func(tag string) {
		for i := 0; i < 10; i++ {
			cc.WriteToUDPAddrPort([]byte(tag), cDst)
			ac.WriteToUDPAddrPort([]byte(tag), aDst)
			time.Sleep(50 * time.Millisecond)
		}
		time.Sleep(300 * time.Millisecond)
	}
	punch("p1")
	if count("agent:p1") == 0 || count("client:p1") == 0 {
		t.Fatalf("hole punch failed: %v", got)
	}
	if err := l.BlockDirect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.BlockDirect(ctx); err != nil {
		t.Fatalf("BlockDirect twice: %v", err)
	}
	punch("p2")
	if n := count("agent:p2") + count("client:p2"); n != 0 {
		t.Errorf("direct UDP passed while blocked: %v", got)
	}
	// The gateway is still reachable over UDP.
	if _, err := cc.WriteToUDPAddrPort([]byte("gw"), l.GatewayAddrPort(7001)); err != nil {
		t.Fatal(err)
	}
	if ap := obs.next(t); ap.Addr() != l.ClientPublic {
		t.Errorf("gateway saw %v while blocked", ap)
	}
	if err := l.UnblockDirect(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.UnblockDirect(ctx); err != nil {
		t.Fatalf("UnblockDirect twice: %v", err)
	}
	punch("p3")
	if count("agent:p3") == 0 || count("client:p3") == 0 {
		t.Errorf("direct UDP still blocked after UnblockDirect: %v", got)
	}
}

func TestProcessStop(t *testing.T) {
	requireLab(t)
	l := newLab(t, Options{ClientNAT: Cone, AgentNAT: Cone})
	p, err := l.Start(l.NS.GW, ProcConfig{Name: "sleeper", Args: []string{"sh", "-c", "echo started; exec sleep 60"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.WaitLog(ctx, "started"); err != nil {
		t.Fatal(err)
	}
	// The process really runs inside the namespace.
	out, err := Output(ctx, l.NS.GW, "ip", "-br", "addr", "show", "wan0")
	if err != nil || !strings.Contains(out, l.Gateway.String()) {
		t.Fatalf("gw namespace: %q %v", out, err)
	}
	p.Stop()
	if p.Running() {
		t.Fatal("still running after Stop")
	}
	// A process that ignores SIGTERM is killed.
	q, err := l.Start(l.NS.GW, ProcConfig{Name: "stubborn", Args: []string{"sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := q.WaitLog(ctx, "ready"); err != nil {
		t.Fatal(err)
	}
	q.Stop()
	if q.Running() {
		t.Fatal("stubborn still running")
	}
	e, err := l.Start(l.NS.GW, ProcConfig{Name: "exit3", Args: []string{"sh", "-c", "exit 3"}})
	if err != nil {
		t.Fatal(err)
	}
	if !e.Wait(10 * time.Second) {
		t.Fatal("exit3 did not exit")
	}
	if e.ExitCode() != 3 {
		t.Fatalf("exit code %d, want 3", e.ExitCode())
	}
}

func TestCloseAfterPartialBuild(t *testing.T) {
	requireLab(t)
	l := Prepare(Options{ClientNAT: Cone, AgentNAT: Cone})
	ctx, cancel := context.WithCancel(context.Background())
	// Close concurrently with Build: Build must stop, Close must remove
	// whatever was created.
	done := make(chan error, 1)
	go func() { done <- l.Build(ctx) }()
	time.Sleep(30 * time.Millisecond)
	l.Close()
	cancel()
	<-done
	l.Close()
	left, err := ListNamespaces(l.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Fatalf("left after Close: %v", left)
	}
}
