package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// startGatewayWith is startGateway in a fresh directory with the config
// adjusted by set; it takes a testing.TB so that fuzz targets can share one
// gateway.
func startGatewayWith(tb testing.TB, set func(*Config)) *testGateway {
	tb.Helper()
	return startGatewayIn(tb, tb.TempDir(), set)
}

// dialFrom opens a QUIC connection to the gateway from a fresh socket on
// the loopback address from, with a valid node certificate, and nothing
// more: what a stranger with a script does.
func dialFrom(t *testing.T, tg *testGateway, from string) (*quic.Conn, error) {
	t.Helper()
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	cert, err := key.Certificate()
	if err != nil {
		t.Fatal(err)
	}
	ip := net.ParseIP(from)
	if ip == nil || !ip.IsLoopback() {
		t.Fatalf("dialFrom %q: tests stay on loopback", from)
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: ip})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: uc}
	t.Cleanup(func() { tr.Close(); uc.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	qc, err := tr.Dial(ctx, tg.g.Addr(), &tls.Config{
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		NextProtos: []string{wire.ALPNGateway}, InsecureSkipVerify: true,
		VerifyPeerCertificate: identity.VerifyPin(tg.g.Pin()),
	}, control.QUICConfig())
	if err == nil {
		t.Cleanup(func() { qc.CloseWithError(0, "") })
	}
	return qc, err
}

// holdFrom opens n connections from one address at once.
func holdFrom(t *testing.T, tg *testGateway, from string, n int) []*quic.Conn {
	t.Helper()
	conns := make([]*quic.Conn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { conns[i], errs[i] = dialFrom(t, tg, from) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("connection %d of %d from %s: %v", i+1, n, from, err)
		}
	}
	return conns
}

// waitFor polls cond for up to 5 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// provenFrom is how many connections from ip the gateway has accepted
// and not yet admitted or closed.
func (a *admission) provenFrom(ip string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.src[netip.PrefixFrom(netip.MustParseAddr(ip), 32)]
	if c == nil {
		return 0
	}
	return c.proven
}

func wantRefused(t *testing.T, err error) {
	t.Helper()
	var te *quic.TransportError
	if !errors.As(err, &te) || te.ErrorCode != quic.ConnectionRefused {
		t.Fatalf("dial = %v (%T), want CONNECTION_REFUSED", err, err)
	}
}

// TestUnauthenticatedLimits: connections that never say hello are bounded
// per source and in total; the next one is refused at its first packet,
// with a counter, while an honest node from elsewhere still registers; and
// the slots come back when those connections go.
func TestUnauthenticatedLimits(t *testing.T) {
	tests := []struct {
		name        string
		set         func(*Config)
		holders     int
		holderFrom  string
		probeFrom   string
		reason      reason
		honestWhile bool // an honest node from 127.0.0.1 registers while the holders hold
	}{
		{"17th from one source", nil, DefaultMaxUnauthPerSource, "127.0.0.2", "127.0.0.2", reasonPerSourceLimit, true},
		{"configured per source", func(c *Config) { c.MaxUnauthPerSource = 3 }, 3, "127.0.0.2", "127.0.0.2", reasonPerSourceLimit, true},
		{"total", func(c *Config) { c.MaxUnauth = 4 }, 4, "127.0.0.2", "127.0.0.3", reasonTotalLimit, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tg := startGatewayWith(t, tt.set)
			conns := holdFrom(t, tg, tt.holderFrom, tt.holders)
			// The holders count as proven once the gateway accepted them.
			waitFor(t, "the gateway accepted the holders", func() bool { return tg.g.adm.provenFrom(tt.holderFrom) == tt.holders })
			before := tg.g.refusals[tt.reason].Load()
			_, err := dialFrom(t, tg, tt.probeFrom)
			wantRefused(t, err)
			// Per Initial packet refused: a ClientHello may span two.
			if got := tg.g.refusals[tt.reason].Load() - before; got == 0 {
				t.Errorf("the %s counter did not count the refusal", tt.reason)
			}
			if tt.honestWhile {
				startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan}).ready(t)
			}
			for _, qc := range conns {
				qc.CloseWithError(0, "")
			}
			waitFor(t, "the holders' slots came back", func() bool { return tg.g.adm.unauthenticated() == 0 })
			if _, err := dialFrom(t, tg, tt.probeFrom); err != nil {
				t.Fatalf("dial after the holders left: %v", err)
			}
			startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"*"}})}).ready(t)
		})
	}
}

// TestRetryUnderLoad: an idle gateway costs an honest node no extra round
// trip; under load (more unauthenticated connections than RetryAbove, or
// always if set so) new connections must echo a Retry first, and honest
// nodes still register.
func TestRetryUnderLoad(t *testing.T) {
	tests := []struct {
		name      string
		set       func(*Config)
		holders   int
		wantRetry bool
	}{
		{"idle", nil, 0, false},
		{"always", func(c *Config) { c.RetryAbove = -1 }, 0, true},
		{"below threshold", func(c *Config) { c.RetryAbove = 3 }, 2, false},
		{"at threshold", func(c *Config) { c.RetryAbove = 2 }, 2, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tg := startGatewayWith(t, tt.set)
			if tt.holders > 0 {
				holdFrom(t, tg, "127.0.0.2", tt.holders)
			}
			before := tg.g.adm.retries.Load()
			startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan}).ready(t)
			if got := tg.g.adm.retries.Load() - before; (got > 0) != tt.wantRetry {
				t.Errorf("%d Retries demanded of the honest node, want Retry: %v", got, tt.wantRetry)
			}
		})
	}
}

// TestSpoofedInitialsDoNotLockOutSource: Initials with a victim's address
// forged (they never complete a handshake) fill that source's slots, yet
// the victim, which proves its address with the Retry, still gets in.
func TestSpoofedInitialsDoNotLockOutSource(t *testing.T) {
	tg := startGatewayWith(t, nil)
	victim := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 2), Port: 4242}
	for range DefaultMaxUnauthPerSource {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		if _, err := tg.g.adm.admit(ctx, &quic.ClientInfo{RemoteAddr: victim}); err != nil {
			t.Fatalf("spoofed Initial refused below the limit: %v", err)
		}
	}
	before := tg.g.adm.retries.Load()
	if _, err := dialFrom(t, tg, "127.0.0.2"); err != nil {
		t.Fatalf("the real owner of the address is locked out: %v", err)
	}
	if tg.g.adm.retries.Load() == before {
		t.Error("no Retry demanded of a source at its limit")
	}
}

// TestHelloDeadline: a connection that does not come to its hello is
// closed by the gateway within helloTimeout of its handshake, and its slot
// comes back.
func TestHelloDeadline(t *testing.T) {
	tests := []struct {
		name string
		send []byte // on a control stream; nil: open none
	}{
		{"no stream", nil},
		{"half a length", []byte{0, 0}},
		{"half a hello", frame(`{"type":"hello","hello":{"tok`)[:20]},
	}
	tg := startGatewayWith(t, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := tg.g.refusals[reasonHelloTimeout].Load()
			qc, err := dialFrom(t, tg, "127.0.0.2")
			if err != nil {
				t.Fatal(err)
			}
			if tt.send != nil {
				st, err := qc.OpenStream()
				if err != nil {
					t.Fatal(err)
				}
				if _, err := st.Write(tt.send); err != nil {
					t.Fatal(err)
				}
			}
			// Generous, and not derived from helloTimeout: the point is
			// that the gateway hangs up within seconds, where it used to
			// wait 10 s for the stream and 10 s more for the hello.
			const bound = 6 * time.Second
			select {
			case <-qc.Context().Done():
			case <-time.After(bound):
				t.Fatalf("the gateway kept a connection without a hello open for more than %v", bound)
			}
			var ae *quic.ApplicationError
			if err := context.Cause(qc.Context()); !errors.As(err, &ae) || !ae.Remote {
				t.Fatalf("connection ended by %v, want the gateway closing it", err)
			}
			if got := tg.g.refusals[reasonHelloTimeout].Load() - before; got != 1 {
				t.Errorf("hello_timeout counter went up by %d, want 1", got)
			}
			waitFor(t, "the slot came back", func() bool { return tg.g.adm.unauthenticated() == 0 })
		})
	}
}

// TestOneStreamPerNode: a node may open the one stream it uses, its
// control stream, and no more.
func TestOneStreamPerNode(t *testing.T) {
	tg := startGatewayWith(t, nil)
	qc, err := dialFrom(t, tg, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := qc.OpenStream(); err != nil {
		t.Fatalf("control stream: %v", err)
	}
	if _, err := qc.OpenStream(); !errors.As(err, new(*quic.StreamLimitReachedError)) {
		t.Fatalf("second stream: err = %v, want the stream limit", err)
	}
	if _, err := qc.OpenUniStream(); !errors.As(err, new(*quic.StreamLimitReachedError)) {
		t.Fatalf("unidirectional stream: err = %v, want the stream limit", err)
	}
}

// TestSourceOf: the per-source limit counts IPv4 addresses and IPv6 /64s.
func TestSourceOf(t *testing.T) {
	tests := []struct{ addr, want string }{
		{"192.0.2.7:1", "192.0.2.7/32"},
		{"[::ffff:192.0.2.7]:1", "192.0.2.7/32"},
		{"[2001:db8:1:2:3:4:5:6]:1", "2001:db8:1:2::/64"},
		{"[fe80::1%eth0]:1", "fe80::/64"},
	}
	for _, tt := range tests {
		ua, err := net.ResolveUDPAddr("udp", tt.addr)
		if err != nil {
			t.Fatal(err)
		}
		if got := sourceOf(ua); got != netip.MustParsePrefix(tt.want) {
			t.Errorf("sourceOf(%s) = %v, want %s", tt.addr, got, tt.want)
		}
	}
}

// TestProvenPastPending: a source's pending connections that turn out real
// (their handshakes complete) do not take it past its limit next to the
// proven ones admitted meanwhile: the one that would is closed.
func TestProvenPastPending(t *testing.T) {
	var refused []reason
	a := newAdmission(Config{MaxUnauthPerSource: 3}, func(r reason, _ net.Addr) { refused = append(refused, r) })
	from := &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	admit := func(verified bool) *ticket {
		t.Helper()
		c, err := a.admit(ctx, &quic.ClientInfo{RemoteAddr: from, AddrVerified: verified})
		if err != nil {
			t.Fatalf("admit(verified %v): %v", verified, err)
		}
		return c.Value(ticketKey{}).(*ticket)
	}
	pending := []*ticket{admit(false), admit(false), admit(false)}
	if !a.needRetry(from) {
		t.Fatal("no Retry for a source at its limit")
	}
	if _, err := a.admit(ctx, &quic.ClientInfo{RemoteAddr: from}); !errors.Is(err, errTooManyFromSource) {
		t.Fatalf("unproven connection past the limit: err = %v", err)
	}
	admit(true) // it echoed the Retry
	if !pending[0].handshakeDone() || !pending[1].handshakeDone() {
		t.Fatal("a connection within the limit refused at its handshake")
	}
	if pending[2].handshakeDone() {
		t.Fatal("a fourth proven connection from a source limited to three kept")
	}
	pending[2].release()
	pending[2].release() // once only
	if n := a.unauthenticated(); n != 3 {
		t.Fatalf("%d unauthenticated after a release, want 3", n)
	}
	if len(refused) != 1 || refused[0] != reasonPerSourceLimit {
		t.Fatalf("refusals reported: %v", refused)
	}
}
