// Package gateway is the only public piece of nlvpn: it authenticates nodes
// by token and key, keeps the directory of agents, introduces a client to an
// agent, and relays their session's packets, which are ciphertext to it.
package gateway

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"golang.org/x/crypto/acme/autocert"

	"github.com/nlvpn/nlvpn/cluster"
	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/relay"
	"github.com/nlvpn/nlvpn/tcplink"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/udpbatch"
	"github.com/nlvpn/nlvpn/wire"
)

// Config configures a Gateway.
type Config struct {
	State *State
	// Listen is the UDP address to serve QUIC on, e.g. ":4433".
	Listen string
	// ListenTCP is the TCP address where nodes whose UDP does not pass
	// reach the same service, QUIC inside TLS (tcplink). Empty: Listen's
	// host and the UDP port's number; "off": none.
	ListenTCP string
	// PublicAddr is how nodes reach the gateway (host:port), put in tokens.
	PublicAddr string
	// Authority is the public key that nodes' credentials must be signed
	// by. The gateway needs only this half: the authority's private key
	// may live on an admin machine.
	Authority identity.PublicKey
	// Cert, if set, replaces the self-signed certificate.
	Cert *tls.Certificate
	// ACME, if set, gets and renews the certificate from an ACME CA
	// instead (Cert must be nil); the gateway then has no pin.
	ACME *ACMEConfig
	Log  *slog.Logger

	// Limits on unauthenticated connections, from a connection's first
	// packet until its node is admitted (see admission). Zero means the
	// default. MaxUnauthPerSource counts per source address (IPv6: per
	// /64), MaxUnauth in total; beyond either a new connection is refused.
	// Once RetryAbove connections are unauthenticated, every new one must
	// first prove its source address with a QUIC Retry (negative: always).
	MaxUnauthPerSource int // default DefaultMaxUnauthPerSource
	MaxUnauth          int // default DefaultMaxUnauth
	RetryAbove         int // default DefaultRetryAbove

	// Cluster, if set, makes this gateway one of several serving one
	// network (see cluster.go): Run joins it before listening, and needs
	// PublicAddr. Its PublicAddr, Pin, Authority, Log and callbacks are
	// the gateway's own. Nil: standalone, no NATS.
	Cluster *cluster.Config
}

// Gateway is the server.
type Gateway struct {
	cfg       Config
	log       *slog.Logger
	hub       *relay.Hub
	overlay   addressBook                     // the state's pool, or the cluster's
	cluster   atomic.Pointer[cluster.Cluster] // nil standalone
	revMu     sync.Mutex                      // orders revocation lists from the file and the cluster
	redirects atomic.Uint64                   // connects answered CodeAgentElsewhere
	enrolled  *enrollments                    // which node keys used each token
	dir       *directory                      // every agent that registered, for nlvpn agents
	revoked   atomic.Pointer[revocations]     // never nil after New
	pin       string
	cert      tls.Certificate
	acme      *autocert.Manager // with Config.ACME, instead of cert

	mu     sync.Mutex
	agents map[string]*node
	live   map[netip.Addr]*node // overlay addresses of connected nodes

	rejected atomic.Uint64 // registrations refused
	adm      *admission
	refusals [numReasons]atomic.Uint64 // connections turned away before registration, by reason
	logLimit *logLimiter               // of the refusals' log lines
	addr     atomic.Pointer[net.UDPAddr]
	tcp      atomic.Pointer[tcplink.Mux]   // the TCP/TLS listener, once Run has started it
	frameIO  atomic.Pointer[udpbatch.Conn] // the frame socket, once Run has started

	// For the metrics: nodes admitted since start, and connected now.
	registrations               atomic.Uint64
	onlineAgents, onlineClients atomic.Int64
	serving                     atomic.Bool // the QUIC listener accepts (Healthy)
}

// node is one registered connection.
type node struct {
	name    string
	role    string
	key     identity.PublicKey
	overlay netip.Addr
	adv     []netip.Prefix
	claims  *token.Claims
	cred    string // the node's credential, for its peers to verify
	qc      *quic.Conn
	peer    *relay.Peer

	ch *wire.Channel // the control stream

	inflight chan struct{}     // bounds concurrent connect requests
	lastPing time.Time         // when the last ping was answered (serve's goroutine only)
	bucket   float64           // connect tokens left (see connectAllowed)
	bucketAt time.Time         // when bucket was last filled
	rmu      sync.Mutex        // guards routes
	routes   map[string]uint64 // client: its current session per agent
}

// minPingInterval is the least time between two pings the gateway answers
// for one node (control.Client checks at most every checkEvery).
const minPingInterval = time.Second

// maxInflightConnects bounds one client's concurrent connect requests.
const maxInflightConnects = 4

// Connect requests per client connection: a burst of connectBurst, then
// one every connectEvery. Each connect makes the agent probe the addresses
// the client names; this keeps that a trickle.
const (
	connectBurst = 10
	connectEvery = time.Second
)

// connectAllowed takes a token from the node's connect bucket.
func (n *node) connectAllowed(now time.Time) bool {
	n.rmu.Lock()
	defer n.rmu.Unlock()
	if n.bucketAt.IsZero() {
		n.bucket, n.bucketAt = connectBurst, now
	}
	n.bucket = min(connectBurst, n.bucket+now.Sub(n.bucketAt).Seconds()/connectEvery.Seconds())
	n.bucketAt = now
	if n.bucket < 1 {
		return false
	}
	n.bucket--
	return true
}

func (n *node) write(m *wire.Message) error { return n.ch.Write(m) }

// request sends m to the node and waits for its reply.
func (n *node) request(ctx context.Context, m *wire.Message) (*wire.Message, error) {
	r, err := n.ch.Request(ctx, m)
	if errors.Is(err, wire.ErrChannelClosed) {
		return nil, errors.New("node disconnected")
	}
	return r, err
}

// New prepares a gateway from its state.
func New(cfg Config) (*Gateway, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if len(cfg.Authority) == 0 {
		return nil, errors.New("no authority key: the gateway admits nodes by credentials that an authority signed")
	}
	g := &Gateway{cfg: cfg, log: cfg.Log, hub: relay.NewHub(cfg.Log), agents: make(map[string]*node), live: make(map[netip.Addr]*node)}
	g.logLimit = newLogLimiter(refusalLogEvery)
	g.adm = newAdmission(cfg, func(r reason, from net.Addr) {
		msg := "too many unauthenticated connections from one source; refusing more"
		if r == reasonTotalLimit {
			msg = "too many unauthenticated connections; refusing more"
		}
		g.refused(g.log, slog.LevelInfo, r, msg, "remote", from.String())
	})
	if cfg.Cluster != nil && cfg.PublicAddr == "" {
		return nil, errors.New("a gateway in a cluster needs its public address (--public-addr): the other gateways send nodes there")
	}
	var err error
	if g.overlay, err = openOverlayPool(cfg.State.Dir); err != nil {
		return nil, err
	}
	if g.enrolled, err = openEnrollments(cfg.State.Dir); err != nil {
		return nil, err
	}
	if g.dir, err = openDirectory(cfg.State.Dir); err != nil {
		return nil, err
	}
	rs, signed, err := LoadRevocations(cfg.State.Dir, cfg.Authority)
	if err != nil {
		return nil, err
	}
	g.revoked.Store(&revocations{list: rs, signed: signed})
	if cfg.ACME != nil {
		if cfg.Cert != nil {
			return nil, errors.New("a certificate file and ACME exclude each other")
		}
		if g.acme, err = newACME(cfg.ACME, cfg.State.Dir); err != nil {
			return nil, err
		}
		return g, nil // no pin: nodes verify the chain and the name
	}
	if cfg.Cert != nil {
		g.cert = *cfg.Cert
	} else if g.cert, err = cfg.State.SelfSignedCert(); err != nil {
		return nil, err
	}
	if g.cert.Leaf == nil {
		return nil, errors.New("certificate without a parsed leaf")
	}
	g.pin = identity.Fingerprint(g.cert.Leaf)
	return g, nil
}

// streamTLS is the TLS of the TCP leg's stream: the gateway's certificate
// (the same as QUIC's, so the same pin or name checks it), no client
// certificate (the QUIC connection inside asks for that).
func (g *Gateway) streamTLS() *tls.Config {
	tc := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{g.cert}, NextProtos: []string{wire.ALPNGatewayTCP}}
	if g.acme != nil {
		tc.Certificates = nil
		tc.GetCertificate = g.acmeCertificate
	}
	return tc
}

// serverTLS is the gateway's TLS configuration for nodes on alpn.
func (g *Gateway) serverTLS(alpn string) *tls.Config {
	tc := identity.ServerTLS(g.cert, alpn)
	if g.acme != nil {
		tc.Certificates = nil
		tc.GetCertificate = g.acmeCertificate
	}
	return tc
}

// Pin is the fingerprint nodes pin; empty with ACME (nodes verify the
// chain and the name).
func (g *Gateway) Pin() string { return g.pin }

// Addr is the UDP address the gateway listens on, once Run has started.
func (g *Gateway) Addr() *net.UDPAddr { return g.addr.Load() }

// RelayStats exposes the relay's counters.
func (g *Gateway) RelayStats() relay.Stats { return g.hub.Stats() }

// Run serves until ctx ends.
func (g *Gateway) Run(ctx context.Context) error {
	ua, err := net.ResolveUDPAddr("udp", g.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", g.cfg.Listen, err)
	}
	if g.cfg.Cluster != nil {
		c, err := g.joinCluster(ctx)
		if err != nil {
			return err
		}
		defer c.Close()
	}
	// One port, two sockets (as on the nodes): QUIC to quic-go, relay
	// frames to our batched reader.
	uc, frames, err := platform.ListenUDPPair(ua.String())
	if err != nil {
		return fmt.Errorf("listen on %s: %w", g.cfg.Listen, err)
	}
	defer uc.Close()
	g.addr.Store(uc.LocalAddr().(*net.UDPAddr))
	// A stateless reset key that survives restarts lets a restarted gateway
	// tell nodes at once that their old connection is gone, so they
	// reconnect in a second instead of waiting for the idle timeout.
	rk := quic.StatelessResetKey(sha256.Sum256(append([]byte("nlvpn stateless reset\x00"), g.cfg.State.Key.Sign([]byte("stateless-reset"))...)))
	tr := &quic.Transport{Conn: uc, StatelessResetKey: &rk,
		// Strangers are bounded from their first packet (admission).
		VerifySourceAddress: g.adm.needRetry,
		ConnContext:         g.adm.admit,
	}
	defer tr.Close()
	fctx, stopFrames := context.WithCancel(context.Background())
	framesDone, err := g.serveFrames(fctx, tr, frames)
	if err != nil {
		stopFrames()
		return err
	}
	defer func() { stopFrames(); <-framesDone }()
	if g.acme != nil {
		if err := g.serveACME(ctx); err != nil {
			return err
		}
	}
	ln, err := tr.Listen(g.serverTLS(wire.ALPNGateway), gatewayQUICConfig())
	if err != nil {
		return err
	}
	defer ln.Close()
	tln, tcpAddr, err := g.listenTCP(ctx, &rk)
	if err != nil {
		return err
	}
	g.serving.Store(true)
	defer g.serving.Store(false)
	g.log.Info("gateway listening", "addr", uc.LocalAddr().String(), "tcp", tcpAddr, "public_addr", g.cfg.PublicAddr, "pin", g.pin)
	go func() {
		<-ctx.Done()
		ln.Close()
		if tln != nil {
			tln.Close()
		}
	}()
	go g.followAddresses(ctx)
	go g.watchRevocations(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	accept := func(ln *quic.Listener) error {
		for {
			qc, err := ln.Accept(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				g.serve(ctx, qc)
			}()
		}
	}
	if tln != nil {
		tcpDone := make(chan error, 1)
		go func() { tcpDone <- accept(tln) }()
		defer func() { tln.Close(); <-tcpDone }()
	}
	return accept(ln)
}

// listenTCP serves the node connections over TCP too: the same QUIC
// connections, each inside a TLS stream (tcplink), for nodes whose
// network lets no UDP through. The streams go through the same admission
// as UDP: tcplink bounds them before their QUIC connection exists (TLS
// deadline, per-source and total counts of streams not yet admitted), the
// admission after. It returns a nil listener if TCP is off. The listener
// and what is under it close when ctx ends.
func (g *Gateway) listenTCP(ctx context.Context, rk *quic.StatelessResetKey) (*quic.Listener, string, error) {
	addr := g.cfg.ListenTCP
	if addr == "off" {
		return nil, "off", nil
	}
	if addr == "" {
		host, _, err := net.SplitHostPort(g.cfg.Listen)
		if err != nil {
			return nil, "", fmt.Errorf("listen address %q: %w", g.cfg.Listen, err)
		}
		addr = net.JoinHostPort(host, fmt.Sprint(g.Addr().Port))
	}
	tl, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, "", fmt.Errorf("listen on TCP %s (--listen-tcp): %w", addr, err)
	}
	mux := tcplink.Listen(tl, tcplink.MuxConfig{
		TLS:                 g.streamTLS(),
		MaxPendingPerSource: g.adm.perSource, MaxPending: g.adm.total,
		OnRefuse: func(r tcplink.Refusal, from netip.AddrPort) {
			reason, msg := tcpRefusals[r].reason, tcpRefusals[r].msg
			g.refused(g.log, slog.LevelInfo, reason, msg, "remote", "tcp/"+from.String())
		},
	})
	g.tcp.Store(mux)
	tr := &quic.Transport{Conn: mux, StatelessResetKey: rk,
		VerifySourceAddress: g.adm.needRetry,
		ConnContext:         g.adm.admit,
	}
	ln, err := tr.Listen(g.serverTLS(wire.ALPNGateway), gatewayQUICConfig())
	if err != nil {
		tr.Close()
		mux.Close()
		return nil, "", err
	}
	context.AfterFunc(ctx, func() {
		ln.Close()
		tr.Close()
		mux.Close()
	})
	return ln, tl.Addr().String(), nil
}

// tcpRefusals names tcplink's refusals as the gateway counts them.
var tcpRefusals = map[tcplink.Refusal]struct {
	reason reason
	msg    string
}{
	tcplink.RefusedPerSource:   {reasonPerSourceLimit, "too many unauthenticated connections from one source; refusing more"},
	tcplink.RefusedTotal:       {reasonTotalLimit, "too many unauthenticated connections; refusing more"},
	tcplink.RefusedHandshake:   {reasonTCPHandshake, "TLS handshake over TCP failed or timed out"},
	tcplink.RefusedNotAdmitted: {reasonTCPNotAdmitted, "TCP connection carried no registered node in time"},
}

// TCPAddr is the TCP address the gateway listens on, once Run has started
// (nil if TCP is off).
func (g *Gateway) TCPAddr() net.Addr {
	if m := g.tcp.Load(); m != nil {
		return m.ListenAddr()
	}
	return nil
}

// TCPStats reports the TCP/TLS streams' counters.
func (g *Gateway) TCPStats() tcplink.Stats {
	if m := g.tcp.Load(); m != nil {
		return m.Stats()
	}
	return tcplink.Stats{}
}

// gatewayQUICConfig is control.QUICConfig as the gateway listens with it. A
// node opens one bidirectional stream, its control stream, and nothing
// else (the gateway's requests ride on that stream too), so that is all
// it may open: a stranger cannot park unread streams on the gateway. The
// node's side stays as it is; the gateway opens no stream to it.
func gatewayQUICConfig() *quic.Config {
	c := control.QUICConfig()
	c.MaxIncomingStreams = 1
	return c
}

// helloTimeout is how long a connection may take, from accept (its
// handshake done), to open its control stream and send a complete hello.
// An honest node sends both at once, so one round trip and a few lost
// packets fit easily; a stranger holds its unauthenticated slot no longer.
const helloTimeout = 3 * time.Second

// refuseLinger is how long a refused node is given to read why, and hang
// up itself, before the gateway closes the connection.
const refuseLinger = 2 * time.Second

// refuse tells a node why it is refused, then closes the connection after
// giving the message a moment to arrive.
func (g *Gateway) refuse(qc *quic.Conn, st *quic.Stream, code, msg string) {
	g.rejected.Add(1)
	wire.WriteMessage(st, &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: code, Message: msg}})
	st.Close()
	select {
	case <-qc.Context().Done():
	case <-time.After(refuseLinger):
	}
	qc.CloseWithError(1, code)
}

// isTimeout reports whether err is a deadline running out.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// serve registers the node on connection qc (register) and then serves
// its control stream (handleNode); what registration set up is undone, in
// reverse, when the connection ends.
func (g *Gateway) serve(ctx context.Context, qc *quic.Conn) {
	var undo cleanups
	defer undo.run()
	n, st, log := g.register(ctx, qc, &undo)
	if n == nil {
		return
	}
	g.handleNode(ctx, n, st, log)
}

// cleanups is what a connection's registration set up, undone in reverse
// order when it ends, as defers would be.
type cleanups []func()

func (c *cleanups) push(f func()) { *c = append(*c, f) }

func (c *cleanups) run() {
	for i := len(*c) - 1; i >= 0; i-- {
		(*c)[i]()
	}
}

// register admits the node on qc: its certificate, hello, token,
// enrollment, overlay address and (an agent) its name; it welcomes it and
// returns it with its control stream and logger. Nil if it was refused
// or went away; what it set up is in undo either way.
func (g *Gateway) register(ctx context.Context, qc *quic.Conn, undo *cleanups) (*node, *quic.Stream, *slog.Logger) {
	remote := qc.RemoteAddr().String()
	log := g.log.With("remote", remote)
	undo.push(func() { qc.CloseWithError(0, "") })
	// On shutdown, close every node connection so each serve returns.
	stop := context.AfterFunc(ctx, func() { qc.CloseWithError(0, "gateway shutting down") })
	undo.push(func() { stop() })
	// Over TCP, the stream ends with the connection, and the connection
	// with the stream.
	tcp := g.tcp.Load()
	if _, ok := qc.RemoteAddr().(tcplink.Addr); !ok {
		tcp = nil
	}
	if tcp != nil {
		undo.push(func() { tcp.CloseAddr(qc.RemoteAddr()) })
		go func() {
			select {
			case <-tcp.Done(qc.RemoteAddr()):
				qc.CloseWithError(0, "TCP stream closed")
			case <-qc.Context().Done():
			}
		}()
	}
	// Until its node is admitted the connection holds an unauthenticated
	// slot (admission); closing it gives the slot back too.
	slot := ticketOf(qc)
	undo.push(slot.release)
	if !slot.handshakeDone() {
		g.refused(log, slog.LevelInfo, reasonPerSourceLimit, "too many unauthenticated connections from one source; refusing more")
		qc.CloseWithError(1, "too many unauthenticated connections from this source")
		return nil, nil, nil
	}
	hello := time.Now().Add(helloTimeout)
	key, err := identity.KeyOf(qc.ConnectionState().TLS)
	if err != nil {
		g.refused(log, slog.LevelInfo, reasonBadCertificate, "node rejected", "err", err)
		return nil, nil, nil
	}
	actx, cancel := context.WithDeadline(ctx, hello)
	st, err := qc.AcceptStream(actx)
	cancel()
	if err != nil {
		if isTimeout(err) {
			g.refused(log, slog.LevelInfo, reasonHelloTimeout, "node opened no control stream in time")
			return nil, nil, nil
		}
		log.Debug("node opened no control stream", "err", err)
		return nil, nil, nil
	}
	st.SetReadDeadline(hello)
	m, err := wire.ReadMessage(st)
	if err != nil {
		if isTimeout(err) {
			g.refused(log, slog.LevelInfo, reasonHelloTimeout, "no hello in time", "err", err)
			return nil, nil, nil
		}
		g.refused(log, slog.LevelInfo, reasonBadRegistration, "bad registration", "err", err)
		g.refuse(qc, st, wire.CodeBadRequest, "bad registration: "+err.Error())
		return nil, nil, nil
	}
	st.SetReadDeadline(time.Time{})
	if m.Type != wire.TypeHello {
		g.refused(log, slog.LevelInfo, reasonBadRegistration, "bad registration", "type", m.Type)
		g.refuse(qc, st, wire.CodeBadRequest, "first message must be hello, got "+m.Type)
		return nil, nil, nil
	}
	claims, err := token.Verify(m.Hello.Token, g.cfg.Authority, key, time.Now())
	if err != nil {
		code, r := wire.CodeBadToken, reasonBadToken
		if errors.Is(err, token.ErrExpired) {
			code, r = wire.CodeExpired, reasonExpired
		}
		g.refused(log, slog.LevelInfo, r, "token refused", "err", err)
		g.refuse(qc, st, code, err.Error())
		return nil, nil, nil
	}
	if r, ok := g.revokedBy(claims); ok {
		g.refused(log, slog.LevelInfo, reasonRevoked, "token refused: revoked", "token", claims.ID)
		g.refuse(qc, st, wire.CodeRevoked, revokedMessage(claims, r))
		return nil, nil, nil
	}
	// A token enrolls the machines it was issued for and no other: a copy
	// on another machine cannot take the name or address it carries.
	if err := g.enroll(claims, key); err != nil {
		if errors.Is(err, errTokenUsed) {
			g.refused(log, slog.LevelWarn, reasonTokenUsed, "token already used by another machine", "token", claims.ID, "key", key.String())
			g.refuse(qc, st, wire.CodeTokenUsed, fmt.Sprintf("this token for %s %q was already used by another machine; a token enrolls one machine (ask for a new one, or for one issued with --uses N)", claims.Role, claims.Name))
			return nil, nil, nil
		}
		g.refused(log, slog.LevelError, reasonEnrollFailed, "token use not recorded", "err", err)
		msg := "the gateway cannot record this token's use now"
		if errors.Is(err, cluster.ErrUnavailable) {
			msg = "the gateway cannot reach its cluster to enroll a new machine; try again later"
		}
		g.refuse(qc, st, wire.CodeUnavailable, msg)
		return nil, nil, nil
	}
	// Authenticated: a valid credential, not revoked, for this machine. (A
	// revoked or copied token verifies but stays counted as a stranger
	// until its refusal closes the connection.)
	slot.release()
	if tcp != nil {
		tcp.Admitted(qc.RemoteAddr())
	}
	n := &node{name: claims.Name, role: claims.Role, key: key, claims: claims, cred: m.Hello.Token, qc: qc, ch: wire.NewChannel(st),
		inflight: make(chan struct{}, maxInflightConnects), routes: make(map[string]uint64)}
	undo.push(func() { n.ch.Close() }) // fails requests still waiting on this node
	log = log.With("role", n.role, "name", n.name)
	// The relay peer exists before the node is findable (g.agents, g.live):
	// a connect may use it from then on. A node over TCP has no observed
	// address: its TCP mapping says nothing of where UDP would reach it,
	// so its peers probe none (and relay frames to it ride its
	// connection).
	var observed netip.AddrPort
	if ua, ok := qc.RemoteAddr().(*net.UDPAddr); ok {
		observed = ua.AddrPort()
		observed = netip.AddrPortFrom(observed.Addr().Unmap(), observed.Port())
	}
	var relayToken [relay.CheckTokenLen]byte
	rand.Read(relayToken[:])
	n.peer = g.hub.NewPeer(n.role+"/"+n.name, observed, relayToken, qc)
	n.peer.OnGone = func(id uint64) {
		go n.write(&wire.Message{Type: wire.TypeGone, Gone: &wire.Gone{ID: id}})
	}
	// The other end of a session moved (its NAT rebound): this node is
	// told where, so it probes there and the direct path comes back.
	n.peer.OnMoved = func(id uint64, to netip.AddrPort) {
		go n.write(&wire.Message{Type: wire.TypeMoved, Moved: &wire.Moved{ID: id, Addr: to}})
	}
	undo.push(func() { n.peer.Close() })
	if n.role == token.RoleAgent {
		for _, p := range m.Hello.Advertise {
			if !p.IsValid() || p.Bits() < 0 {
				g.refused(log, slog.LevelInfo, reasonBadAdvertise, "invalid advertised prefix")
				g.refuse(qc, st, wire.CodeBadRequest, "invalid advertised prefix")
				return nil, nil, nil
			}
			n.adv = append(n.adv, p.Masked())
		}
	}
	if n.overlay, err = g.assignOverlay(n, m.Hello.Overlay); err != nil {
		g.refused(log, slog.LevelError, reasonNoOverlay, "overlay allocation failed", "err", err)
		msg := "gateway cannot allocate an overlay address"
		if errors.Is(err, cluster.ErrUnavailable) {
			msg = "the gateway cannot reach its cluster to give a new node an address; try again later"
		}
		g.refuse(qc, st, wire.CodeUnavailable, msg)
		return nil, nil, nil
	}
	undo.push(func() { g.releaseOverlay(n) })
	if n.role == token.RoleAgent {
		// The name is held by one key, here and (a round trip, made
		// without g.mu) across the cluster.
		inUse := func() (old *node, held bool) {
			old = g.agents[n.name]
			return old, old != nil && !old.key.Equal(key) && old.qc.Context().Err() == nil
		}
		g.mu.Lock()
		_, held := inUse()
		g.mu.Unlock()
		if held {
			g.refused(log, slog.LevelWarn, reasonNameInUse, "agent name already in use by another key")
			g.refuse(qc, st, wire.CodeNameInUse, fmt.Sprintf("agent %q is already connected with a different key", n.name))
			return nil, nil, nil
		}
		if err := g.announceAgent(n); err != nil {
			var elsewhere *cluster.ErrNameHeld
			if errors.As(err, &elsewhere) {
				g.refused(log, slog.LevelWarn, reasonNameInUse, "agent name in use on another gateway by another key", "gateway", elsewhere.Gateway)
				g.refuse(qc, st, wire.CodeNameInUse, fmt.Sprintf("agent %q is already connected to gateway %s with a different key", n.name, elsewhere.Gateway))
				return nil, nil, nil
			}
			log.Warn("agent not announced to the cluster", "err", err)
		}
		g.mu.Lock()
		old, held := inUse()
		if held {
			// Another key took the name here meanwhile: it stays the
			// cluster's holder.
			g.mu.Unlock()
			g.announceAgent(old)
			g.refused(log, slog.LevelWarn, reasonNameInUse, "agent name already in use by another key")
			g.refuse(qc, st, wire.CodeNameInUse, fmt.Sprintf("agent %q is already connected with a different key", n.name))
			return nil, nil, nil
		}
		g.agents[n.name] = n
		g.mu.Unlock()
		if old != nil {
			// The same agent reconnected (new socket, network change): the
			// new connection replaces the old one.
			old.qc.CloseWithError(0, "replaced by a new connection")
		}
		undo.push(func() {
			g.mu.Lock()
			last := g.agents[n.name] == n
			if last {
				delete(g.agents, n.name)
			}
			g.mu.Unlock()
			if err := g.dir.left(n.name, time.Now()); err != nil {
				log.Warn("could not record the agent's disconnect in the directory", "err", err)
			}
			if c := g.clusterNow(); c != nil && last {
				c.Withdraw(n.name, n.key.String())
			}
			g.shareDirectory(n.name, n.key)
		})
		if err := g.dir.seen(claims, n.adv, time.Now()); err != nil {
			log.Warn("could not record the agent in the directory", "err", err)
		}
		g.shareDirectory(n.name, n.key)
	}

	if err := n.write(&wire.Message{Type: wire.TypeWelcome, Welcome: &wire.Welcome{Name: n.name, Role: n.role, Overlay: n.overlay, Observed: observed, RelayToken: relayToken[:], Revocations: n.revocations(g), Features: []string{wire.FeaturePing}}}); err != nil {
		return nil, nil, nil
	}
	log.Info("node registered", "overlay", n.overlay, "advertise", n.adv)
	undo.push(g.nodeOnline(n.role))
	undo.push(func() { log.Info("node disconnected") })

	// Expiry bites on a live connection too: when the token runs out the
	// node is told why and disconnected; its reconnect is then refused as
	// expired, and its relay routes go with the connection.
	expire := time.AfterFunc(time.Until(time.Unix(claims.Expires, 0)), func() {
		log.Info("token expired; disconnecting the node")
		n.write(&wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeExpired, Message: fmt.Sprintf("the token for %q expired at %s", n.name, time.Unix(claims.Expires, 0).UTC().Format(time.RFC3339))}})
		qc.CloseWithError(0, "token expired")
	})
	undo.push(func() { expire.Stop() })

	// Relay frames in DATAGRAMs are forwarded on the connection's own
	// goroutine as they are parsed, not through quic-go's receive queue:
	// that holds 128 and drops the rest of a burst (a node over TCP
	// delivers its packets in bursts: 19,000 retransmits of a tunnelled
	// TCP upload in 5 s, make bench's tcp column).
	for _, b := range qc.SetDatagramHandler(func(b []byte) { g.hub.ForwardBorrowed(n.peer, b) }) {
		g.hub.Forward(n.peer, b)
	}
	return n, st, log
}

// handleNode serves a registered node's control stream until it ends. It
// runs on the connection's goroutine for as long as the node stays, so
// its frame is kept small: the messages are handled in handleMessage, and
// registration's large frame (register) is gone from the stack. An idle
// node's goroutine then fits a 4 KB stack instead of 8 KB (issue 12).
func (g *Gateway) handleNode(ctx context.Context, n *node, st *quic.Stream, log *slog.Logger) {
	for {
		m, err := wire.ReadMessage(st)
		if err != nil {
			if n.qc.Context().Err() == nil && !errors.Is(err, context.Canceled) {
				log.Info("closing node connection", "err", err)
			}
			return
		}
		if !n.ch.Deliver(m) {
			g.handleMessage(ctx, n, m, log)
		}
	}
}

// handleMessage answers one control message from a registered node.
func (g *Gateway) handleMessage(ctx context.Context, n *node, m *wire.Message, log *slog.Logger) {
	switch {
	case m.Type == wire.TypeConnect && n.role == token.RoleClient:
		// Bound the work one client can make the gateway do at once.
		select {
		case n.inflight <- struct{}{}:
		default:
			n.write(&wire.Message{Type: wire.TypeError, ID: m.ID, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "too many connect requests at once"}})
			return
		}
		go func() {
			defer func() { <-n.inflight }()
			reply := g.connect(ctx, n, m.Connect)
			reply.ID = m.ID
			n.write(reply)
		}()
	case m.Type == wire.TypeAgents && n.role == token.RoleClient:
		// Listing costs more than a connect; it shares the bucket.
		if !n.connectAllowed(time.Now()) {
			n.write(&wire.Message{Type: wire.TypeError, ID: m.ID, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "too many requests; slow down"}})
			return
		}
		n.write(&wire.Message{Type: wire.TypeAgents, ID: m.ID, Agents: g.listAgents(n.claims)})
	case m.Type == wire.TypePing && m.ID != 0:
		// An honest node asks at most every few seconds; faster ones
		// are not answered (and counted), so pings cost the gateway
		// no more than keepalives.
		if now := time.Now(); now.Sub(n.lastPing) >= minPingInterval {
			n.lastPing = now
			n.write(&wire.Message{Type: wire.TypePing, ID: m.ID})
			return
		}
		g.refused(log, slog.LevelInfo, reasonUnexpectedMessage, "pings too often", "type", m.Type)
	default:
		g.refused(log, slog.LevelInfo, reasonUnexpectedMessage, "unexpected control message", "type", m.Type)
		n.write(&wire.Message{Type: wire.TypeError, ID: m.ID, Error: &wire.Error{Code: wire.CodeBadRequest, Message: "unexpected " + m.Type + " message"}})
	}
}

// listAgents is the directory as the client with claims may see it.
func (g *Gateway) listAgents(c *token.Claims) *wire.Agents {
	online := make(map[string][]netip.Prefix)
	g.mu.Lock()
	for name, a := range g.agents {
		if a.qc.Context().Err() == nil {
			online[name] = a.adv
		}
	}
	g.mu.Unlock()
	var shared map[string]dirEntry
	if cl := g.clusterNow(); cl != nil {
		for name, p := range cl.Online() {
			if _, here := online[name]; !here {
				online[name] = p.Advertise
			}
		}
		shared = make(map[string]dirEntry)
		for name, e := range cl.Directory() {
			shared[name] = dirEntry(e)
		}
	}
	return g.dir.list(c, online, shared, func(c *token.Claims) bool { _, ok := g.revokedBy(c); return ok }, time.Now())
}

func errorReply(code, format string, args ...any) *wire.Message {
	return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: code, Message: fmt.Sprintf(format, args...)}}
}

// connect introduces a client to an agent and sets up their relay route.
func (g *Gateway) connect(ctx context.Context, c *node, req *wire.Connect) *wire.Message {
	log := g.log.With("client", c.name, "agent", req.Agent)
	if !c.claims.MayUse(req.Agent) {
		log.Info("connect refused by token")
		return errorReply(wire.CodeForbidden, "the token of client %q does not allow agent %q", c.name, req.Agent)
	}
	g.mu.Lock()
	a := g.agents[req.Agent]
	g.mu.Unlock()
	if a == nil || a.qc.Context().Err() != nil {
		if gw, ok := g.elsewhere(req.Agent); ok {
			// One gateway relays a session, the agent's: the client goes
			// there (it verifies that gateway as it does this one).
			g.redirects.Add(1)
			log.Info("agent is on another gateway; sending the client there", "gateway", gw)
			return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeAgentElsewhere, Gateway: gw,
				Message: fmt.Sprintf("agent %q is connected to gateway %s of this network", req.Agent, gw)}}
		}
		log.Info("connect to unknown agent")
		return errorReply(wire.CodeUnknownAgent, "no agent named %q is connected to this gateway", req.Agent)
	}
	if !c.connectAllowed(time.Now()) {
		return errorReply(wire.CodeUnavailable, "too many connect requests; slow down")
	}
	id, err := g.bindSession(req.Resume, c.peer, a.peer)
	if err != nil {
		log.Info("no relay route", "err", err)
		return errorReply(wire.CodeUnavailable, "cannot set up a relay route: %v", err)
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// The gateway passes the nodes' candidates and signed probe keys along
	// unchanged; it cannot make a probe key of its own.
	offer := &wire.Session{
		ID: id, PeerName: c.name, PeerCredential: c.cred, PeerKey: c.key.String(), PeerAddr: c.overlay,
		Mode: req.Mode, Punch: req.Punch, PeerInstance: req.Instance,
		// The one public address the agent will probe for this client.
		PeerObserved: c.peer.Addr(),
	}
	if misbehave != nil {
		misbehave(g, token.RoleAgent, offer)
	}
	r, err := a.request(rctx, &wire.Message{Type: wire.TypeSession, Session: offer})
	if err != nil {
		g.hub.Unbind(id)
		log.Info("agent did not accept the session", "err", err)
		var we *wire.Error
		if errors.As(err, &we) {
			return errorReply(we.Code, "agent %q refused: %s", a.name, we.Message)
		}
		return errorReply(wire.CodeUnavailable, "agent %q did not answer: %v", a.name, err)
	}
	if c.qc.Context().Err() != nil {
		// The client left while we asked the agent: do not leave its route.
		g.hub.Unbind(id)
		return errorReply(wire.CodeUnavailable, "client disconnected")
	}
	// One route per client and agent: a new session replaces the last, so a
	// client cannot pile up routes by reconnecting.
	c.rmu.Lock()
	prev := c.routes[a.name]
	c.routes[a.name] = id
	c.rmu.Unlock()
	if prev != 0 && prev != id {
		g.hub.Unbind(prev)
	}
	log.Info("session set up", "session", wire.SessionID(id), "resumed", id == req.Resume)
	if r.Type != wire.TypeAccept {
		g.hub.Unbind(id)
		return errorReply(wire.CodeUnavailable, "agent %q answered %s instead of accepting", a.name, r.Type)
	}
	reply := &wire.Session{
		ID: id, PeerName: a.name, PeerCredential: a.cred, PeerKey: a.key.String(), PeerAddr: a.overlay, Advertise: a.adv,
		Mode: req.Mode, Punch: r.Accept.Punch, Resumed: r.Accept.Resumed && id == req.Resume,
		PeerObserved: a.peer.Addr(),
	}
	if misbehave != nil {
		misbehave(g, token.RoleClient, reply)
	}
	return &wire.Message{Type: wire.TypeSession, Session: reply}
}

// misbehave is nil in every real build. A test build (-tags
// nlvpn_misbehave, misbehave.go) sets it to play a compromised gateway
// that alters the session introductions it sends to a role, so that the
// e2e tests can show agents and clients refuse what it makes up.
var misbehave func(g *Gateway, to string, s *wire.Session)

// bindAttempts bounds the fresh session IDs bindSession draws. A random
// 64-bit ID collides with a live one about never; the bound is there so
// that no other error can turn the loop into a spin.
const bindAttempts = 8

// bindSession routes a session between client and agent: under the ID
// the client wants to resume if that is still theirs, else under a fresh
// random one. It fails when either end's connection is gone (the client
// pressed Ctrl-C mid-connect), which retrying cannot mend.
func (g *Gateway) bindSession(resume uint64, c, a *relay.Peer) (uint64, error) {
	if resume != 0 {
		err := g.hub.Bind(resume, c, a)
		if err == nil || !errors.Is(err, relay.ErrInUse) {
			return resume, err
		}
	}
	for range bindAttempts {
		var b [8]byte
		rand.Read(b[:])
		id := binary.BigEndian.Uint64(b[:])
		if id == 0 {
			continue
		}
		err := g.hub.Bind(id, c, a)
		if err == nil || !errors.Is(err, relay.ErrInUse) {
			return id, err
		}
	}
	return 0, errors.New("no free session ID")
}

// maxClientAddrs bounds the overlay addresses one client name may hold:
// one per process running at once (`up` and a few `connect`s).
const maxClientAddrs = 16

// assignOverlay gives a node its overlay address. An agent has one per
// name. A client name has one per process running at once ("slots"), so
// `up` and an ssh `connect` from one machine do not collide at the agent,
// and the pool stays bounded by names, not by keys. A node reconnecting
// asks for the address it had and gets it back if it is free, or held by
// a stale connection with the same key (which is then closed), so its
// end-to-end session carries on.
//
// Binding a new address may take a round trip to the cluster: it is done
// without g.mu, which guards only the live check and claim.
func (g *Gateway) assignOverlay(n *node, want netip.Addr) (netip.Addr, error) {
	if n.role == token.RoleAgent {
		a, err := g.overlay.Get("agent/" + n.name)
		if err == nil {
			g.mu.Lock()
			g.live[a] = n
			g.mu.Unlock()
		}
		return a, err
	}
	slot := func(i int) string {
		if i == 0 {
			return "client/" + n.name
		}
		return fmt.Sprintf("client/%s#%d", n.name, i)
	}
	if a, ok := g.reclaim(n, want, slot); ok {
		return a, nil
	}
	for i := 0; i < maxClientAddrs; i++ {
		a, err := g.overlay.Get(slot(i))
		if err != nil {
			return netip.Addr{}, err
		}
		g.mu.Lock()
		free := !g.isLive(a)
		if free {
			g.live[a] = n
		}
		g.mu.Unlock()
		if free {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("client %q already has %d connections", n.name, maxClientAddrs)
}

// reclaim gives client n back the address want that it had, if one of its
// name's slots holds it and no other machine is on it now.
func (g *Gateway) reclaim(n *node, want netip.Addr, slot func(int) string) (netip.Addr, bool) {
	if !want.IsValid() {
		return netip.Addr{}, false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for i := 0; i < maxClientAddrs; i++ {
		a, ok := g.overlay.Peek(slot(i))
		if !ok || a != want {
			continue
		}
		if holder := g.live[a]; holder != nil && holder.qc.Context().Err() == nil {
			if !holder.key.Equal(n.key) {
				return netip.Addr{}, false // another machine's now
			}
			holder.qc.CloseWithError(0, "replaced by a new connection")
		}
		g.live[a] = n
		return a, true
	}
	return netip.Addr{}, false
}

func (g *Gateway) isLive(a netip.Addr) bool {
	n := g.live[a]
	return n != nil && n.qc.Context().Err() == nil
}

func (g *Gateway) releaseOverlay(n *node) {
	g.mu.Lock()
	if g.live[n.overlay] == n {
		delete(g.live, n.overlay)
	}
	g.mu.Unlock()
}

// addrCheckEvery is how often the gateway looks whether a node's gateway
// connection comes from a new address (its NAT rebound, it changed
// networks; QUIC follows that by itself).
const addrCheckEvery = time.Second

// followAddresses keeps the relay's idea of each node's address current
// (relay.Hub.Refresh) until ctx ends: after a NAT rebinding, relay frames
// from the old address stop counting as the node's, and frames from the
// new one do, within addrCheckEvery.
func (g *Gateway) followAddresses(ctx context.Context) {
	t := time.NewTicker(addrCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			for _, m := range g.hub.Refresh() {
				g.log.Info("node's address changed", "node", m.Name, "from", m.From, "to", m.To)
			}
		}
	}
}

// tcpStreams is the number of TCP/TLS streams open now.
func (g *Gateway) tcpStreams() int {
	if m := g.tcp.Load(); m != nil {
		return m.Streams()
	}
	return 0
}
