package gateway

import (
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
