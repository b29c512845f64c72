// Package control is a node's connection to the gateway: it dials over the
// node's shared UDP socket, authenticates with the node key and token,
// answers the gateway's requests, carries relay frames, and reconnects by
// itself with backoff when the connection or the gateway goes away.
package control

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// QUICConfig is the node↔gateway connection's configuration, used by both
// ends. Its packet size is fixed (wire.GatewayPacketSize) so relay frames
// on the fallback carrier always fit one DATAGRAM.
func QUICConfig() *quic.Config { return QUICConfigSized(wire.GatewayPacketSize) }

// QUICConfigSized is QUICConfig with packets of size bytes: a node on a
// path with a smaller MTU dials with its UDP size (pathsize.go), and the
// gateway follows it (quic-go patch 0007).
func QUICConfigSized(size int) *quic.Config {
	return &quic.Config{
		EnableDatagrams:         true,
		InitialPacketSize:       uint16(size),
		DisablePathMTUDiscovery: true,
		HandshakeIdleTimeout:    5 * time.Second,
		MaxIdleTimeout:          30 * time.Second,
		KeepAlivePeriod:         5 * time.Second,
		// A node opens the one control stream; the gateway opens none, so
		// a node accepts none (the gateway sets its own limit).
		MaxIncomingStreams:    -1,
		MaxIncomingUniStreams: -1,
	}
}

// Config configures a Client.
type Config struct {
	Gateway string // host:port
	// Gateways are further gateways of the same network (a cluster, in
	// the order given): the node connects to whichever of Gateway and
	// these completes its handshake first (the nearest), and to the
	// others when its gateway goes away. Each is verified as Gateway is
	// (Pin, or the CA and the host's name).
	Gateways  []string
	Pin       string // gateway certificate pin; empty: verify against the system roots
	Token     string
	Key       *identity.Key
	Advertise []netip.Prefix  // agents only
	Transport *quic.Transport // the node's UDP port
	Log       *slog.Logger
	// Heartbeat, if set, makes the node ask the gateway for a sign of life
	// this often (Suspect), so that a dead gateway is left within
	// Heartbeat plus a few seconds even when no relay traffic would show
	// it. Agents set it: clients that move to another gateway find them
	// only once they have moved too.
	Heartbeat time.Duration
	// UDPSize fixes the node's UDP size (wire.UDPSize of --mtu); 0:
	// start at full size and learn a smaller one (pathsize.go).
	UDPSize int

	// Over is how the node reaches the gateway: OverAuto (also ""), OverUDP
	// or OverTCP (see dial).
	Over string
	// Proxy is the HTTP proxy whose CONNECT the TCP/TLS transport goes
	// through; nil: none.
	Proxy *url.URL
	// DialTCP opens the TCP connections of the TCP/TLS transport (to the
	// gateway, or to Proxy); nil: a plain net.Dialer.
	DialTCP func(ctx context.Context, network, addr string) (net.Conn, error)

	// OnRelay receives the payload of each relay frame that came in a
	// DATAGRAM (the relay's fallback carrier); it owns pkt.
	OnRelay func(id uint64, pkt []byte)
	// OnRequest answers a request from the gateway (a session offer to an
	// agent). It returns the reply body (Accept or Error).
	OnRequest func(ctx context.Context, m *wire.Message) *wire.Message
	// OnUp runs after every registration, the first and each after a
	// reconnect, in its own goroutine; ctx ends with that connection.
	OnUp func(ctx context.Context, w *wire.Welcome)
	// OnGone is told when the other end of one of this node's sessions
	// left the gateway.
	OnGone func(id uint64)
	// OnMoved is told that the other end of session id now reaches the
	// gateway from addr (its NAT rebound, it changed networks): the
	// place to probe for the direct path.
	OnMoved func(id uint64, addr netip.AddrPort)
	// OnRevoked is told to end sessions whose client's token was revoked,
	// and given the authority's signed revocation list when it changed
	// (agents; the list must be verified).
	OnRevoked func(r *wire.Revoked)
}

// The ways to the gateway (Config.Over).
const (
	OverAuto = "auto" // UDP, and TCP/TLS too when UDP gets no answer soon
	OverUDP  = "udp"  // QUIC on the node's UDP port only
	OverTCP  = "tcp"  // QUIC inside a TLS stream over TCP only
)

// FatalError is a refusal by the gateway that retrying cannot fix.
type FatalError struct {
	Code    string // a wire.Code* value
	Message string
}

func (e *FatalError) Error() string { return e.Message }

func fatal(e *wire.Error) *FatalError { return &FatalError{Code: e.Code, Message: e.Message} }

// Client is a node's gateway connection.
type Client struct {
	cfg Config
	log *slog.Logger

	mu  sync.Mutex
	cur *conn

	up      chan struct{} // closed at the first registration
	upOnce  sync.Once
	welcome atomic.Pointer[wire.Welcome]
	failed  chan struct{} // closed when Run gives up
	err     error

	dropRelay, dropRelayOut atomic.Uint64

	udpSize   atomic.Int32 // pathsize.go
	fixedSize bool

	handlers     chan struct{} // slots of OnRequest calls in progress
	requestsBusy atomic.Uint64 // requests answered "busy": all slots taken

	// tcpUntil (unix nanoseconds): until then, OverAuto starts TCP at
	// once, beside UDP, since the last connection ended up on TCP.
	tcpUntil atomic.Int64
	// udpWorked: the last connection was over UDP.
	udpWorked atomic.Bool

	// addrs is every gateway, Config.Gateway first (gateways.go).
	addrs []string
	// prefer is where the next connection goes first (MoveTo), or nil.
	prefer atomic.Pointer[string]
	// moveNow: the current connection was closed to move; reconnect at
	// once, without the backoff.
	moveNow atomic.Bool
	// gen counts registrations; regCh is closed at the next one.
	gen   atomic.Uint64
	regCh chan struct{}
	// down holds gateways that did not answer a move, until when (unix
	// nanoseconds); guarded by mu.
	down map[string]int64
	// lastCheck (unix nanoseconds) is when Suspect last pinged.
	lastCheck atomic.Int64
}

// maxRequestHandlers bounds the gateway's requests a node answers at once.
const maxRequestHandlers = 32

// New returns a Client; Run connects it.
func New(cfg Config) *Client {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	c := &Client{cfg: cfg, log: log, up: make(chan struct{}), failed: make(chan struct{}),
		handlers: make(chan struct{}, maxRequestHandlers), fixedSize: cfg.UDPSize != 0,
		addrs: gatewayList(cfg.Gateway, cfg.Gateways), regCh: make(chan struct{}), down: map[string]int64{}}
	c.udpSize.Store(int32(wire.GatewayPacketSize))
	if cfg.UDPSize != 0 {
		c.udpSize.Store(int32(min(cfg.UDPSize, wire.GatewayPacketSize)))
	}
	return c
}

// Ready waits for the first registration, or for Run to fail.
func (c *Client) Ready(ctx context.Context) (*wire.Welcome, error) {
	select {
	case <-c.up:
		return c.welcome.Load(), nil
	case <-c.failed:
		return nil, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Welcome returns the latest registration, or nil.
func (c *Client) Welcome() *wire.Welcome { return c.welcome.Load() }

// Run keeps the node connected until ctx ends or the gateway refuses it for
// good (bad or expired token, name in use by another key).
func (c *Client) Run(ctx context.Context) error {
	err := c.run(ctx)
	c.err = err
	close(c.failed)
	return err
}

func (c *Client) run(ctx context.Context) error {
	const minBackoff, maxBackoff = 500 * time.Millisecond, 30 * time.Second
	backoff := minBackoff
	for {
		registered, err := c.runOnce(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var fe *FatalError
		if errors.As(err, &fe) {
			return err
		}
		if registered && c.moveNow.Swap(false) {
			backoff = minBackoff
			continue
		}
		if registered {
			backoff = minBackoff
			c.log.Warn("gateway connection lost; reconnecting", "err", err)
		} else {
			c.log.Warn("cannot reach gateway; will retry", "gateways", c.addrs, "err", err, "in", backoff.Round(time.Millisecond))
		}
		// Jitter so a restarted gateway is not hit by every node at once.
		d := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
		}
		if !registered {
			backoff = min(2*backoff, maxBackoff)
		}
	}
}

type conn struct {
	gw     string // the gateway's HOST:PORT, as dialed
	qc     *quic.Conn
	over   string // how it reaches the gateway: "udp", "tcp", "tcp via proxy HOST:PORT"
	stream *quic.Stream
	ch     *wire.Channel
	relayq chan []byte // relay frames waiting for the connection
	pings  bool        // the gateway answers pings (wire.FeaturePing)
}

func (c *Client) tlsConfig(gw string) (*tls.Config, error) {
	cert, err := c.cfg.Key.Certificate()
	if err != nil {
		return nil, err
	}
	host, _, err := net.SplitHostPort(gw)
	if err != nil {
		return nil, fmt.Errorf("gateway address %q: %w", gw, err)
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{wire.ALPNGateway},
		ServerName:   host,
	}
	if c.cfg.Pin != "" {
		// The pin replaces CA verification: it names the one key we accept.
		tc.InsecureSkipVerify = true
		tc.VerifyPeerCertificate = identity.VerifyPin(c.cfg.Pin)
	}
	return tc, nil
}

func (c *Client) runOnce(ctx context.Context) (registered bool, err error) {
	dl, err := c.dialGateway(ctx)
	if err != nil {
		return false, err
	}
	defer dl.close()
	qc := dl.qc
	connCtx, cancelConn := context.WithCancel(ctx)
	defer cancelConn()
	// When the node stops, say goodbye so the gateway forgets it at once
	// instead of after the idle timeout; while registering too, which
	// also ends the wait for the welcome.
	stop := context.AfterFunc(connCtx, func() { qc.CloseWithError(0, "node stopping") })
	defer stop()
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		return false, err
	}
	k := &conn{gw: dl.gw, qc: qc, over: dl.over, stream: st, ch: wire.NewChannel(st), relayq: make(chan []byte, relayQueueLen)}
	hello := &wire.Hello{Token: c.cfg.Token, Advertise: c.cfg.Advertise, Version: wire.ProtocolVersion}
	if w := c.welcome.Load(); w != nil {
		hello.Overlay = w.Overlay // keep our address across reconnects
	}
	if err := k.ch.Write(&wire.Message{Type: wire.TypeHello, Hello: hello}); err != nil {
		return false, err
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(st)
	// The gateway makes a node findable just before it writes the welcome,
	// so a notice for it may come first (a revocation list, a session
	// gone): there are no sessions on this connection yet, and the welcome
	// carries the list in force. Skip a few.
	for i := 0; err == nil && i < 8 && (m.Type == wire.TypeRevoked || m.Type == wire.TypeGone || m.Type == wire.TypeMoved); i++ {
		m, err = wire.ReadMessage(st)
	}
	if err != nil {
		return false, fmt.Errorf("registration: %w", err)
	}
	st.SetReadDeadline(time.Time{})
	switch {
	case m.Type == wire.TypeError && m.Error.Fatal():
		return false, fatal(m.Error)
	case m.Type == wire.TypeError:
		return false, m.Error
	case m.Type != wire.TypeWelcome:
		return false, fmt.Errorf("registration: unexpected %s message", m.Type)
	}
	w := m.Welcome
	c.welcome.Store(w)
	k.pings = w.Has(wire.FeaturePing)
	c.log.Info("registered with gateway", "gateway", dl.gw, "name", w.Name, "role", w.Role, "overlay", w.Overlay, "observed", w.Observed, "transport", dl.over, "udp_size", c.UDPSize())

	c.mu.Lock()
	c.cur = k
	c.gen.Add(1)
	close(c.regCh)
	c.regCh = make(chan struct{})
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if c.cur == k {
			c.cur = nil
		}
		c.mu.Unlock()
		k.ch.Close()
	}()
	c.upOnce.Do(func() { close(c.up) })
	if c.cfg.OnUp != nil {
		go c.cfg.OnUp(connCtx, w)
	}
	if (c.cfg.Over == OverAuto || c.cfg.Over == "") && dl.over != OverUDP {
		go c.tryUDPAgain(connCtx, dl.tc, dl.gw, qc)
	}
	c.takeRelay(qc)
	go c.sendRelay(connCtx, k)
	switch {
	case c.cfg.Heartbeat > 0 && k.pings:
		go c.heartbeat(connCtx)
	case c.cfg.Heartbeat > 0:
		c.log.Info("the gateway does not answer pings (an older version): a silent one is noticed only by QUIC's idle timeout", "gateway", dl.gw, "idle_timeout", QUICConfig().MaxIdleTimeout)
	}
	return true, c.readControl(connCtx, k)
}

// takeRelay receives the relay frames that come in DATAGRAMs, on the
// connection's goroutine as they are parsed (quic-go's receive queue
// holds 128 and drops the rest of a burst).
func (c *Client) takeRelay(qc *quic.Conn) {
	take := func(b []byte, owned bool) {
		kind, id, pkt, err := wire.ParseFrame(b)
		if err != nil || kind != wire.FrameRelay || c.cfg.OnRelay == nil {
			c.dropRelay.Add(1)
			return
		}
		if !owned {
			pkt = append([]byte(nil), pkt...) // OnRelay owns it; b is lent for the call
		}
		c.cfg.OnRelay(id, pkt)
	}
	for _, b := range qc.SetDatagramHandler(func(b []byte) { take(b, false) }) {
		take(b, true)
	}
}

func (c *Client) readControl(ctx context.Context, k *conn) error {
	for {
		m, err := wire.ReadMessage(k.stream)
		if err != nil {
			if cause := context.Cause(k.qc.Context()); cause != nil {
				return cause
			}
			return err
		}
		if k.ch.Deliver(m) {
			continue
		}
		switch {
		case m.Type == wire.TypeError && m.ID != 0:
			// The reply to a request that gave up waiting: it speaks of that
			// request, not of this node's registration.
			c.log.Debug("late reply from gateway", "code", m.Error.Code, "msg", m.Error.Message)
		case m.Type == wire.TypeError:
			if m.Error.Fatal() {
				return fatal(m.Error)
			}
			c.log.Warn("gateway reports an error", "code", m.Error.Code, "msg", m.Error.Message)
		case m.Type == wire.TypeGone:
			if c.cfg.OnGone != nil {
				c.cfg.OnGone(m.Gone.ID)
			}
		case m.Type == wire.TypeMoved:
			if c.cfg.OnMoved != nil {
				c.cfg.OnMoved(m.Moved.ID, m.Moved.Addr)
			}
		case m.Type == wire.TypeRevoked && m.Revoked != nil:
			if c.cfg.OnRevoked != nil {
				c.cfg.OnRevoked(m.Revoked)
			}
		case m.ID != 0 && c.cfg.OnRequest != nil:
			// A gateway's requests are answered concurrently (one slow
			// offer must not hold up the next) but boundedly: a gateway
			// that is broken into cannot make the node run handlers
			// without end.
			select {
			case c.handlers <- struct{}{}:
			default:
				c.requestsBusy.Add(1)
				busy := &wire.Message{ID: m.ID, Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "too many requests in progress"}}
				if err := k.ch.Write(busy); err != nil {
					c.log.Debug("reply to gateway failed", "err", err)
				}
				continue
			}
			go func() {
				defer func() { <-c.handlers }()
				reply := c.cfg.OnRequest(ctx, m)
				reply.ID = m.ID
				if err := k.ch.Write(reply); err != nil {
					c.log.Debug("reply to gateway failed", "err", err)
				}
			}()
		default:
			c.log.Debug("ignoring unexpected control message", "type", m.Type)
		}
	}
}

// ErrNotConnected is returned while the gateway connection is down.
var ErrNotConnected = errors.New("not connected to the gateway")

// Request sends m and waits for the gateway's reply. A reply of type error
// is returned as a *wire.Error.
func (c *Client) Request(ctx context.Context, m *wire.Message) (*wire.Message, error) {
	c.mu.Lock()
	k := c.cur
	c.mu.Unlock()
	if k == nil {
		return nil, ErrNotConnected
	}
	r, err := k.ch.Request(ctx, m)
	if errors.Is(err, wire.ErrChannelClosed) {
		return nil, ErrNotConnected
	}
	return r, err
}

// relayQueueLen bounds relay frames waiting for the gateway connection.
const relayQueueLen = 512

// ErrRelayFull is returned by SendRelayDatagram when the relay queue is full.
var ErrRelayFull = errors.New("relay queue full")

// Transport says how the node reaches the gateway now: "udp", "tcp" or
// "tcp via proxy HOST:PORT"; empty while disconnected.
func (c *Client) Transport() string {
	if c == nil {
		return ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cur == nil {
		return ""
	}
	return c.cur.over
}

// GatewayAddr is the address of the gateway the node is connected to now,
// as the connection's packets go to it; not valid while disconnected or
// over TCP (relay frames then ride the connection: UDP does not pass).
func (c *Client) GatewayAddr() netip.AddrPort {
	c.mu.Lock()
	k := c.cur
	c.mu.Unlock()
	if k == nil {
		return netip.AddrPort{}
	}
	ua, ok := k.qc.RemoteAddr().(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// SendRelayDatagram sends a relay frame for session id in a DATAGRAM of
// the gateway connection: the relay's fallback carrier, for where relay
// frames cannot pass as UDP. It never blocks (quic-go's SendDatagram
// blocks without bound once 32 frames wait, and a stalled gateway
// connection must not stall the peer session).
func (c *Client) SendRelayDatagram(id uint64, pkt []byte) error {
	c.mu.Lock()
	k := c.cur
	c.mu.Unlock()
	if k == nil {
		return ErrNotConnected
	}
	b := wire.NewFrame(wire.FrameRelay, id, pkt)
	select {
	case k.relayq <- b:
		return nil
	default:
		// Full: drop and count, like a full socket buffer. Never wait: the
		// queue is shared by every session on this node, and one busy
		// session must not hold up the others.
		c.dropRelayOut.Add(1)
		return ErrRelayFull
	}
}

// Flush waits, at most d, until the relay frames queued so far have been
// handed to the gateway connection: a goodbye sent just before exit must
// not die in the queue.
func (c *Client) Flush(d time.Duration) {
	c.mu.Lock()
	k := c.cur
	c.mu.Unlock()
	if k == nil {
		return
	}
	deadline := time.Now().Add(d)
	for len(k.relayq) > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

func (c *Client) sendRelay(ctx context.Context, k *conn) {
	for {
		select {
		case <-ctx.Done():
			return
		case b := <-k.relayq:
			if err := k.qc.SendDatagram(b); err != nil {
				c.dropRelayOut.Add(1)
			}
		}
	}
}

// RelayDrops counts malformed or unexpected frames received from the
// gateway, and relay frames dropped on a full queue on their way out.
func (c *Client) RelayDrops() (in, out uint64) { return c.dropRelay.Load(), c.dropRelayOut.Load() }

// RequestsBusy counts the gateway's requests answered "unavailable" at
// once because maxRequestHandlers were in progress.
func (c *Client) RequestsBusy() uint64 { return c.requestsBusy.Load() }
