package gateway

import (
	"crypto/tls"
	"io"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/connectproxy"
	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// waitTCP waits until the gateway's TCP listener is up.
func waitTCP(t *testing.T, tg *testGateway) string {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for tg.g.TCPAddr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("no TCP listener")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return tg.g.TCPAddr().String()
}

// A node over TCP registers like one over UDP, has no observed address
// (its peers must not probe its TCP mapping), and relays with a node over
// UDP on the DATAGRAM carrier, both ways, the packets unchanged. When it
// leaves, its stream closes at the gateway.
func TestNodeOverTCP(t *testing.T) {
	tg := startGatewayWith(t, nil)
	tcpAddr := waitTCP(t, tg)
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), over: control.OverTCP, gateway: tcpAddr})
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}}), over: control.OverUDP})
	if w := agent.ready(t); w.Observed.IsValid() {
		t.Fatalf("a node over TCP was given the observed address %v", w.Observed)
	}
	if w := client.ready(t); !w.Observed.IsValid() {
		t.Fatal("a node over UDP has no observed address")
	}
	if got := agent.c.Transport(); got != "tcp" {
		t.Fatalf("agent transport %q, want tcp", got)
	}
	if got := client.c.Transport(); got != "udp" {
		t.Fatalf("client transport %q, want udp", got)
	}
	if a := agent.c.GatewayAddr(); a.IsValid() {
		t.Fatalf("GatewayAddr over TCP = %v: relay frames would be sent as UDP", a)
	}
	r, err := request(t, client, connectMsg("miranda"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Session.PeerObserved.IsValid() {
		t.Fatalf("the client was told to probe %v, the agent's TCP mapping", r.Session.PeerObserved)
	}
	testRelay(t, tg, client, agent, r.Session.ID)
	if n := tg.g.tcpStreams(); n != 1 {
		t.Fatalf("%d TCP streams, want 1", n)
	}
	agent.stop(t)
	deadline := time.Now().Add(3 * time.Second)
	for tg.g.tcpStreams() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the agent's TCP stream outlived it")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// With no answer over UDP (a socket that swallows everything stands on
// the gateway's UDP port number), auto connects over TCP by itself; the
// same through an HTTP CONNECT proxy. A TLS certificate that does not
// match the pin is refused over TCP as over UDP, for good.
func TestAutoFallsBackToTCP(t *testing.T) {
	tg := startGatewayWith(t, func(c *Config) { c.ListenTCP = "127.0.0.1:0" })
	tcpAddr := waitTCP(t, tg)
	_, port, _ := net.SplitHostPort(tcpAddr)
	hole, err := net.ListenPacket("udp", "127.0.0.1:"+port)
	if err != nil {
		t.Skipf("UDP port %s taken: %v", port, err)
	}
	defer hole.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := hole.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	ps := httptest.NewServer(&connectproxy.Server{})
	defer ps.Close()
	proxy, err := connectproxy.Parse(ps.URL)
	if err != nil {
		t.Fatal(err)
	}
	tok := tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}, Uses: 3})
	for _, tc := range []struct {
		name string
		opts nodeOpts
		want string
	}{
		{"auto", nodeOpts{token: tok, gateway: tcpAddr}, "tcp"},
		{"auto via proxy", nodeOpts{token: tok, gateway: tcpAddr, proxy: proxy}, "tcp via proxy " + proxy.Host},
	} {
		start := time.Now()
		n := startNode(t, tg, tc.opts)
		n.ready(t)
		el := time.Since(start)
		t.Logf("%s: registered over %s after %v", tc.name, n.c.Transport(), el.Round(time.Millisecond))
		if got := n.c.Transport(); got != tc.want {
			t.Fatalf("%s: transport %q, want %q", tc.name, got, tc.want)
		}
		if el < 2*time.Second {
			t.Fatalf("%s: over TCP after %v: UDP was not tried first", tc.name, el)
		}
		n.stop(t)
	}
	bad := startNode(t, tg, nodeOpts{token: tok, gateway: tcpAddr, over: control.OverTCP, pin: "sha256:0000"})
	if fe := bad.refused(t); fe.Code != wire.CodeBadRequest {
		t.Fatalf("wrong pin over TCP: %+v", fe)
	}
}

// What a stranger can do on the TCP port is bounded and counted: more
// unregistered connections from one address than --max-unauth-per-source
// are closed at once; bytes that are not TLS end the connection; after
// TLS, a frame length out of range ends it too; and the gateway's metrics
// say so. --listen-tcp off serves no TCP at all.
func TestTCPStrangersBounded(t *testing.T) {
	tg := startGatewayWith(t, func(c *Config) { c.MaxUnauthPerSource = 2 })
	addr := waitTCP(t, tg)
	dial := func() net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	closedSoon := func(c net.Conn, what string) {
		t.Helper()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.Copy(io.Discard, c); err != nil {
			t.Fatalf("%s: the gateway kept the connection: %v", what, err)
		}
	}
	wait := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(3 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("waiting for %s", what)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// Two silent connections hold this source's slots; a third is refused.
	dial()
	dial()
	wait("two pending", func() bool { return tg.g.tcp.Load().Pending() == 2 })
	closedSoon(dial(), "a third connection from one source")
	wait("the per-source refusal counted", func() bool { return tg.g.refusals[reasonPerSourceLimit].Load() == 1 })

	tg2 := startGatewayWith(t, nil)
	addr = waitTCP(t, tg2)
	garbage := dial()
	garbage.Write([]byte("SSH-2.0-OpenSSH_9.6\r\n"))
	closedSoon(garbage, "not TLS")
	wait("the TLS refusal counted", func() bool { return tg2.g.refusals[reasonTCPHandshake].Load() == 1 })

	tc := tls.Client(dial(), &tls.Config{InsecureSkipVerify: true, NextProtos: []string{wire.ALPNGatewayTCP}})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	tc.Write([]byte{0xff, 0xff, 1, 2, 3}) // a 64 KiB frame length
	closedSoon(tc, "a frame length out of range")
	wait("the bad frame counted", func() bool { return tg2.g.TCPStats().BadFrames == 1 })
	mfs := gather(t, tg2.g)
	if v := metricValue(t, mfs, "nlvpn_gateway_tcp_closed_total", "reason", "bad_frame"); v != 1 {
		t.Errorf("nlvpn_gateway_tcp_closed_total{reason=bad_frame} = %v, want 1", v)
	}
	if v := metricValue(t, mfs, "nlvpn_gateway_refused_total", "reason", "tcp_tls_handshake"); v != 1 {
		t.Errorf("nlvpn_gateway_refused_total{reason=tcp_tls_handshake} = %v, want 1", v)
	}

	off := startGatewayWith(t, func(c *Config) { c.ListenTCP = "off" })
	time.Sleep(100 * time.Millisecond)
	if a := off.g.TCPAddr(); a != nil {
		t.Fatalf("--listen-tcp off listens on %v", a)
	}
}
