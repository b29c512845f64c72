package control

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// testGateway is one gateway of a fake cluster: it registers every node
// that says hello (giving back the overlay address the node asks for, or
// 100.64.0.7), says it serves pings unless noPings, answers them while
// answerPings is set, and counts those it gets.
type testGateway struct {
	ln          *quic.Listener
	addr        string
	noPings     atomic.Bool
	answerPings atomic.Bool
	pings       atomic.Int64
	hellos      chan *wire.Hello
	mu          sync.Mutex
	conns       []*quic.Conn
}

// testCluster starts n gateways that share one key, as a cluster's do,
// and returns them with the pin that verifies all of them.
func testCluster(t *testing.T, n int) ([]*testGateway, string) {
	t.Helper()
	cert := gatewayCert(t)
	var gws []*testGateway
	for range n {
		ln := listenAsGateway(t, cert)
		g := &testGateway{ln: ln, addr: ln.Addr().String(), hellos: make(chan *wire.Hello, 16)}
		g.answerPings.Store(true)
		t.Cleanup(g.stop)
		go g.serve()
		gws = append(gws, g)
	}
	return gws, identity.Fingerprint(cert.Leaf)
}

func (g *testGateway) serve() {
	for {
		qc, err := g.ln.Accept(context.Background())
		if err != nil {
			return
		}
		g.mu.Lock()
		g.conns = append(g.conns, qc)
		g.mu.Unlock()
		go func() {
			st, err := qc.AcceptStream(context.Background())
			if err != nil {
				return
			}
			m, err := wire.ReadMessage(st)
			if err != nil || m.Type != wire.TypeHello {
				qc.CloseWithError(1, "no hello")
				return
			}
			overlay := m.Hello.Overlay
			if !overlay.IsValid() {
				overlay = netip.MustParseAddr("100.64.0.7")
			}
			select {
			case g.hellos <- m.Hello:
			default:
			}
			ch := wire.NewChannel(st)
			w := &wire.Welcome{Name: "alice", Role: "client", Overlay: overlay, Features: []string{wire.FeaturePing}}
			if g.noPings.Load() {
				w.Features = nil
			}
			ch.Write(&wire.Message{Type: wire.TypeWelcome, Welcome: w})
			for {
				m, err := wire.ReadMessage(st)
				if err != nil {
					return
				}
				if m.Type == wire.TypePing {
					g.pings.Add(1)
				}
				if m.Type == wire.TypePing && g.answerPings.Load() {
					ch.Write(&wire.Message{Type: wire.TypePing, ID: m.ID})
				}
			}
		}()
	}
}

// stop takes the gateway away as a crash would: its connections close and
// nothing answers at its address any more.
func (g *testGateway) stop() {
	g.ln.Close()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, qc := range g.conns {
		qc.CloseWithError(0, "gateway stopping")
	}
	g.conns = nil
}

// clusterNode is a node given the gateways gws (the first as Gateway),
// verified with pin.
func clusterNode(t *testing.T, pin string, gws ...string) *Client {
	t.Helper()
	return newNode(t, Config{Gateway: gws[0], Gateways: gws[1:], Pin: pin})
}

// runClusterClient runs a node configured with every gateway of gws.
func runClusterClient(t *testing.T, gws []*testGateway, pin string) (*Client, context.CancelFunc) {
	t.Helper()
	var addrs []string
	for _, g := range gws {
		addrs = append(addrs, g.addr)
	}
	return runNode(t, clusterNode(t, pin, addrs...))
}

// runNode runs c until the test ends (at most 30 s) and returns once it
// registered.
func runNode(t *testing.T, c *Client) (*Client, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	if _, err := c.Ready(ctx); err != nil {
		t.Fatalf("node never registered: %v", err)
	}
	return c, cancel
}

// waitFor polls cond until it holds or 15 s pass (a bound, not a measure).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func gatewayOf(gws []*testGateway, addr string) int {
	for i, g := range gws {
		if g.addr == addr {
			return i
		}
	}
	return -1
}

// A token may name a gateway that is down: the node registers with the
// one that answers, at once, instead of waiting on the first.
func TestRegistersWithTheGatewayThatAnswers(t *testing.T) {
	gws, pin := testCluster(t, 2)
	dead, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}) // nobody answers here
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	gws[0].stop()
	c := clusterNode(t, pin, dead.LocalAddr().String(), gws[0].addr, gws[1].addr)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	defer cancel()
	go c.Run(ctx)
	if _, err := c.Ready(ctx); err != nil {
		t.Fatalf("not registered while gateway %s answers: %v", gws[1].addr, err)
	}
	if got := c.Gateway(); got != gws[1].addr {
		t.Fatalf("registered with %q, want the only one answering, %s", got, gws[1].addr)
	}
}

// When its gateway goes away, the node moves to another gateway of the
// network by itself and keeps its overlay address.
func TestFailsOverToAnotherGateway(t *testing.T) {
	gws, pin := testCluster(t, 3)
	c, _ := runClusterClient(t, gws, pin)
	first := gatewayOf(gws, c.Gateway())
	if first < 0 {
		t.Fatalf("registered with %q, not one of the cluster", c.Gateway())
	}
	<-gws[first].hellos
	gen := c.Generation()
	gws[first].stop()
	waitFor(t, "registration with another gateway", func() bool { return c.Generation() > gen && c.Gateway() != "" })
	now := gatewayOf(gws, c.Gateway())
	if now < 0 || now == first {
		t.Fatalf("after gateway %d went away the node is on %q", first, c.Gateway())
	}
	h := <-gws[now].hellos
	if h.Overlay != netip.MustParseAddr("100.64.0.7") {
		t.Fatalf("the node asked the new gateway for overlay %v, want its old 100.64.0.7", h.Overlay)
	}
}

// MoveTo takes the node to the gateway named (the agent's), refuses a
// gateway that sends the node to itself or an address that is none, and
// after a gateway that did not answer, says so at once for a while.
func TestMoveTo(t *testing.T) {
	gws, pin := testCluster(t, 2)
	c, _ := runClusterClient(t, gws, pin)
	cur := gatewayOf(gws, c.Gateway())
	other := gws[1-cur].addr
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	if err := c.MoveTo(ctx, c.Gateway()); err == nil {
		t.Fatal("MoveTo the gateway the node is on succeeded")
	}
	if err := c.MoveTo(ctx, "not-an-address"); err == nil {
		t.Fatal("MoveTo a malformed address succeeded")
	}
	gen := c.Generation()
	if err := c.MoveTo(ctx, other); err != nil {
		t.Fatalf("MoveTo %s: %v", other, err)
	}
	if c.Gateway() != other || c.Generation() == gen {
		t.Fatalf("after MoveTo(%s): on %q, generation %d (was %d)", other, c.Gateway(), c.Generation(), gen)
	}

	dead, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Close()
	err = c.MoveTo(ctx, dead.LocalAddr().String())
	if !errors.Is(err, ErrGatewayDown) {
		t.Fatalf("MoveTo a gateway that does not answer: %v, want ErrGatewayDown", err)
	}
	if gatewayOf(gws, c.Gateway()) < 0 {
		t.Fatalf("after a move that failed the node is on %q, not back on the cluster", c.Gateway())
	}
	gen = c.Generation()
	if err := c.MoveTo(ctx, dead.LocalAddr().String()); !errors.Is(err, ErrGatewayDown) || c.Generation() != gen {
		t.Fatalf("second MoveTo the dead gateway: %v, generation %d (was %d); want ErrGatewayDown and no reconnect", err, c.Generation(), gen)
	}
}

// Suspect tells a gateway that has stopped answering (its QUIC still
// acknowledges, so the idle timeout never ends the connection) from one
// that is alive: only the first makes the node reconnect.
func TestSuspect(t *testing.T) {
	gws, pin := testCluster(t, 2)
	c, _ := runClusterClient(t, gws, pin)
	gen := c.Generation()
	c.Suspect()
	time.Sleep(checkWait + 500*time.Millisecond)
	if c.Generation() != gen {
		t.Fatalf("the node reconnected although its gateway answered the ping")
	}
	cur := gatewayOf(gws, c.Gateway())
	gws[cur].answerPings.Store(false)
	c.lastCheck.Store(0) // the pacing is tested below
	c.Suspect()
	waitFor(t, "a reconnect after an unanswered ping", func() bool { return c.Generation() > gen && c.Gateway() != "" })

	// Pacing: a second suspicion within checkEvery sends no ping.
	gen = c.Generation()
	for _, g := range gws {
		g.answerPings.Store(false)
	}
	c.lastCheck.Store(time.Now().UnixNano())
	c.Suspect()
	time.Sleep(checkWait + 500*time.Millisecond)
	if c.Generation() != gen {
		t.Fatal("Suspect pinged again within checkEvery")
	}
}

// With a heartbeat (agents), a gateway that stops answering is left
// without any relay traffic to show it.
func TestHeartbeatLeavesASilentGateway(t *testing.T) {
	gws, pin := testCluster(t, 2)
	c, _ := runNode(t, newNode(t, Config{Gateway: gws[0].addr, Gateways: []string{gws[1].addr}, Pin: pin, Heartbeat: checkEvery}))
	first := gatewayOf(gws, c.Gateway())
	gen := c.Generation()
	gws[first].answerPings.Store(false)
	waitFor(t, "a reconnect after the gateway went silent", func() bool { return c.Generation() > gen && c.Gateway() != "" })
}

// A gateway that does not list FeaturePing in its welcome (an older
// version, which may close the control stream on a message it does not
// know) gets no pings: neither the agent's heartbeat nor Suspect's. Its
// own keepalives and idle timeout still tell whether it is there.
func TestNoPingsToAGatewayWithoutThem(t *testing.T) {
	gws, pin := testCluster(t, 1)
	gws[0].noPings.Store(true)
	c, _ := runNode(t, newNode(t, Config{Gateway: gws[0].addr, Pin: pin, Heartbeat: checkEvery}))
	gen := c.Generation()
	c.Suspect()
	// Two heartbeat periods and a ping's wait: a node that pinged would
	// have done so (and, unanswered, left the gateway) by now.
	time.Sleep(2*checkEvery + checkWait)
	if n := gws[0].pings.Load(); n != 0 {
		t.Fatalf("the node sent %d pings to a gateway that does not serve them", n)
	}
	if c.Generation() != gen {
		t.Fatal("the node left a gateway that does not serve pings")
	}
}

// The counterpart: a gateway that lists FeaturePing gets the heartbeat.
func TestHeartbeatPingsAGatewayThatServesThem(t *testing.T) {
	gws, pin := testCluster(t, 1)
	runNode(t, newNode(t, Config{Gateway: gws[0].addr, Pin: pin, Heartbeat: checkEvery}))
	waitFor(t, "a heartbeat ping", func() bool { return gws[0].pings.Load() > 0 })
}
