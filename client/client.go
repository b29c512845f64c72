// Package client is `nlvpn up`: it asks the gateway for a session with an
// agent, checks the agent's key against the one it pinned on first use,
// and carries the machine's packets for the agent's subnets through a TUN
// device over that session.
package client

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/packet"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/tun"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// Config configures a client.
type Config struct {
	Gateway string
	// Gateways are further gateways of the network (control.Config).
	Gateways []string
	Pin      string
	Token    string
	Key      *identity.Key
	Agent    string
	// KnownAgents is the file of pinned agent keys (like ssh known_hosts).
	KnownAgents string
	TunName     string
	// ConnectTimeout bounds reaching the gateway at start.
	ConnectTimeout time.Duration
	// WaitAgent is how long to wait at start for an agent that is not
	// connected to the gateway yet (asking again every few seconds): zero
	// waits until ctx ends, a negative value not at all.
	WaitAgent time.Duration
	// UDPSize fixes the node's UDP size (--mtu; wire.UDPSize); 0:
	// full size, lowered by itself when the path to the gateway says so.
	UDPSize int
	Log     *slog.Logger
	// OnUp, if set, runs once when the tunnel first comes up.
	OnUp func()
	// Mode is wire.ModeAuto, ModeDirect or ModeRelay.
	Mode string
	// DirectTimeout bounds the wait for a direct path in ModeDirect.
	DirectTimeout time.Duration
	// StatusSocket, if set, is a unix socket path where `nlvpn status` reads
	// the tunnel's state.
	StatusSocket string
	// Metrics, if set, gets the client's metrics (see metrics.go) while
	// Run runs.
	Metrics prometheus.Registerer
	// Netstack, if set, selects the unprivileged mode (no TUN device).
	Netstack *NetstackConfig
	// Routes is what the user accepted beyond the agent's ordinary
	// subnets (TUN mode).
	Routes RoutePolicy
	// Over is how the node reaches the gateway (control.OverAuto, OverUDP,
	// OverTCP); Proxy the HTTP proxy for TCP, or nil.
	Over  string
	Proxy *url.URL
	// AcceptInbound lets connections from the agent's side in through the
	// TUN. Off: only replies to connections this machine opened come in.
	AcceptInbound bool
	// DNSDomains are domains to resolve through the agent's DNS besides
	// the ones the agent names (TUN mode, split DNS).
	DNSDomains []string
}

// Client is a running client.
type Client struct {
	cfg Config
	log *slog.Logger
	// authority signed this client's credential; the agent's must be
	// signed by it too.
	authority identity.PublicKey
	u         *underlay.Underlay // the node's port: gateway connection, session conn, frame mux
	cur       atomic.Pointer[session.Session]
	info      *wire.PeerInfo
	tunw      *tun.BatchWriter
	// deliver takes each packet from the agent, and ownership of it: into
	// the TUN, or into the netstack.
	deliver func(pkt []byte)
	// stackDrops reads the netstack's drop counters (netstack mode only).
	stackDrops func() map[string]uint64
	// overlay is our address; agentPrefixes what the agent may send from.
	overlay       netip.Addr
	overlay6      netip.Addr                 // the IPv6 overlay address (wire.Overlay6 of overlay)
	mine          atomic.Pointer[netip.Addr] // overlay, for the reconnect check
	agentPrefixes []netip.Prefix
	// marked: the node's sockets bypass the tunnel's routes, so even a
	// subnet containing the gateway can be routed.
	marked      bool
	inbound     *platform.InboundFilter // TUN mode without AcceptInbound
	dropForeign atomic.Uint64
	// probesRefused counts agent candidates this client would not probe.
	probesRefused atomic.Uint64
	ended         session.Ended // drops and bytes of sessions replaced since start
	instance      uint64        // wire.Connect.Instance (flowsOwner)
	ctx           context.Context

	pmu    sync.Mutex
	punch  *underlay.Direct // the current session's direct-path attempt
	path   pathState
	direct chan struct{} // signalled when a direct path is confirmed

	// tun is the TUN device (TUN mode), tunMTU the MTU followMTU last
	// gave it (0: the one it was made with, wire.TunMTU).
	tun    *tun.Device
	tunMTU int
	// fragBuf holds send's fragments; send's one caller, the netstack's
	// output, is serialized.
	fragBuf []byte

	// agentAt is where the current session's punch may probe the agent;
	// its observed address follows the agent's moves (onMoved).
	agentAt agentPlaces

	// tmu orders a session's replacement (cur, ended) against Status, so
	// the totals over both never go back.
	tmu sync.Mutex

	// up is signalled when the session needs a new relay route: the
	// gateway connection came back (onUp), or the agent left it (onGone).
	// moved carries the overlay address a reconnect gave this client when
	// it is not the one the tunnel uses.
	up    chan struct{}
	moved chan netip.Addr
	// dialSession dials the end-to-end session the gateway set up
	// (dialAgent; tests replace it).
	dialSession func(ctx context.Context, off *wire.Session, agentKey identity.PublicKey) (*session.Session, *wire.PeerInfo, error)

	// attachedAt is the gateway connection (control.Client.Generation)
	// the current session was set up or resumed on: a registration that
	// establish itself caused (a move to the agent's gateway) needs no
	// reattach after it.
	attachedAt atomic.Uint64
	// agentLeft: the gateway said the agent left (onGone) since the last
	// look, so the session needs a new route whatever attachedAt says.
	agentLeft atomic.Bool
}

// pathState is what `nlvpn status` reports about the path in use.
type pathState struct {
	kind   string // "relay" or "direct"
	remote string
	since  time.Time
}

// Run brings the tunnel up and keeps it up until ctx ends. On return the
// TUN device and its routes are gone.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 20 * time.Second
	}
	own, err := token.ParseCredential(cfg.Token)
	if err != nil {
		return fmt.Errorf("the client's credential: %w", err)
	}
	if own.Claims.Role != token.RoleClient || !own.Node.Equal(cfg.Key.Public()) {
		return fmt.Errorf("the credential is not for this client's key (a %s credential for %q)", own.Claims.Role, own.Claims.Name)
	}
	c := &Client{cfg: cfg, log: cfg.Log.With("agent", cfg.Agent), authority: own.Claims.Authority,
		up: make(chan struct{}, 1), moved: make(chan netip.Addr, 1),
		instance: flowsOwner(cfg)}
	c.dialSession = c.dialAgent

	// The TUN device first: without the right to create it there is no
	// point in going further, and the user should hear so at once.
	var dev *tun.Device
	if cfg.Netstack == nil {
		var err error
		if dev, err = tun.Create(cfg.TunName, wire.TunMTU); err != nil {
			return fmt.Errorf("%w (the TUN mode needs root or CAP_NET_ADMIN; without them use --netstack)", err)
		}
		defer dev.Close()
	}

	u, err := underlay.Open(c.gatewayConfig())
	if err != nil {
		return err
	}
	defer u.Close()
	c.u = u
	if dev != nil {
		if err := u.Mark(); err != nil {
			c.log.Warn("cannot mark the UDP socket to bypass the tunnel's routes; subnets containing the gateway will not be routed", "err", err)
		} else {
			c.marked = true
		}
	}
	c.direct = make(chan struct{}, 1)
	c.path = pathState{kind: "relay", remote: cfg.Gateway, since: time.Now()}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.ctx = ctx
	// The session's goodbye at exit travels on the paths Start runs, so the
	// agent ends this client's flows on its LAN at once and the gateway
	// forgets us; Stop ends them after.
	runErr := u.Start()
	defer u.Stop()
	if cfg.StatusSocket != "" {
		stop, err := c.serveStatus(cfg.StatusSocket)
		if err != nil {
			return err
		}
		defer stop()
	}
	if cfg.Metrics != nil {
		m := statusCollector{c.Status}
		if err := cfg.Metrics.Register(m); err != nil {
			return fmt.Errorf("client metrics: %w", err)
		}
		defer cfg.Metrics.Unregister(m)
	}

	rctx, rcancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	w, err := c.u.Ctrl.Ready(rctx)
	rcancel()
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("cannot reach the gateway at %s within %s", cfg.Gateway, cfg.ConnectTimeout)
		}
		return err
	}
	<-c.up // the first registration; later ones are reconnects

	s, info, err := c.firstSession(ctx, runErr)
	if err != nil {
		if ctx.Err() != nil {
			c.log.Info("stopped before the tunnel came up")
			return nil
		}
		return err
	}
	c.info = info
	c.cur.Store(s)
	// Overlay addresses come from the gateway and the agent: outside the
	// overlay range they could shadow any real address on this machine.
	for _, a := range []struct {
		who  string
		addr netip.Addr
	}{{"the gateway gave this client", w.Overlay}, {"the agent claims", info.Overlay}} {
		if !wire.OverlayPrefix.Contains(a.addr) {
			s.Conn.CloseWithError(0, "bye")
			return fmt.Errorf("%s the overlay address %s, outside the overlay range %s: refusing it", a.who, a.addr, wire.OverlayPrefix)
		}
	}
	c.overlay = w.Overlay
	c.overlay6 = wire.Overlay6(w.Overlay)
	c.mine.Store(&w.Overlay)
	// What the agent may send from: its overlay address, its loopback
	// (reached through its netstack with --allow-loopback, answering from
	// 127.0.0.1; the kernel drops such sources arriving on a TUN anyway)
	// and the subnets routed to it. In TUN mode those are the accepted
	// ones only: a refused default route must not let anything in.
	subnets := info.Advertise
	var routes []netip.Prefix
	if dev != nil {
		routes = c.routes(info)
		subnets = routes
	}
	c.agentPrefixes = append([]netip.Prefix{netip.PrefixFrom(info.Overlay, info.Overlay.BitLen()),
		netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}, subnets...)

	if dev != nil {
		stop, err := c.startTUN(ctx, dev, w, info, routes)
		if err != nil {
			s.Conn.CloseWithError(0, "bye")
			return err
		}
		defer stop()
	} else {
		stop, err := c.startNetstack(ctx, w, info)
		if err != nil {
			s.Conn.CloseWithError(0, "bye")
			return err
		}
		defer stop()
	}
	if cfg.OnUp != nil {
		cfg.OnUp()
	}
	c.pump(s)
	defer func() {
		if s := c.cur.Load(); s != nil {
			s.Conn.CloseWithError(0, "client exiting")
			c.u.Flush(500 * time.Millisecond)
		}
	}()

	return c.keepAttached(ctx, runErr)
}

// gatewayConfig is the gateway connection's configuration; its events
// drive the session (onUp, onGone, onMoved).
func (c *Client) gatewayConfig() control.Config {
	cfg := c.cfg
	return control.Config{
		Gateway: cfg.Gateway, Gateways: cfg.Gateways, Pin: cfg.Pin, Token: cfg.Token, Key: cfg.Key, Over: cfg.Over, Proxy: cfg.Proxy, Log: cfg.Log, UDPSize: cfg.UDPSize,
		OnUp: c.onUp, OnGone: c.onGone,
		// The agent's NAT rebound: probe it where it is now.
		OnMoved: c.onMoved,
	}
}

// onUp is told of every registration with the gateway, the first and each
// after a reconnect.
func (c *Client) onUp(_ context.Context, w *wire.Welcome) {
	if mine := c.mine.Load(); mine != nil && w.Overlay != *mine {
		// Another process with this client name holds our address
		// now; our TUN and sessions still use the old one, and
		// nothing would get through. Say so and stop.
		select {
		case c.moved <- w.Overlay:
		default:
		}
		return
	}
	select {
	case c.up <- struct{}{}:
	default:
	}
}

// onGone is told that the other end of session id left the gateway: if
// that is the agent of the current session, re-attach now rather than
// after the session's idle timeout.
func (c *Client) onGone(id uint64) {
	if s := c.cur.Load(); s != nil && s.ID == id {
		c.agentLeft.Store(true)
		select {
		case c.up <- struct{}{}:
		default:
		}
	}
}

// keepAttached keeps the current session attached to the agent until ctx
// ends: through a new relay route when the gateway connection comes back
// or the agent left the gateway (resuming the session if both ends still
// hold it), and through a new session when it ended.
func (c *Client) keepAttached(ctx context.Context, runErr <-chan error) error {
	for {
		cur := c.cur.Load()
		select {
		case <-ctx.Done():
			c.log.Info("shutting down")
			return nil
		case err := <-runErr:
			return err
		case a := <-c.moved:
			return fmt.Errorf("the gateway moved this client from overlay address %s to %s (another process with the client name %q holds it); start nlvpn up again", c.overlay, a, c.u.Ctrl.Welcome().Name)
		case <-c.up:
			// The gateway connection came back (a gateway restart, a
			// network change, another gateway): re-attach the session to
			// a relay route, unless it was set up on this connection
			// and the agent is still there.
			if !c.agentLeft.Swap(false) && c.u.Ctrl.Generation() == c.attachedAt.Load() {
				continue
			}
			if err := c.reattach(ctx, runErr); err != nil {
				return err
			}
		case <-cur.Done():
			c.log.Warn("session with agent ended; reconnecting")
			if err := c.reattach(ctx, runErr); err != nil {
				return err
			}
		}
	}
}

// routes is what goes into the TUN: the agent's overlay address and the
// advertised subnets this machine accepts (RoutePolicy; refusals are
// logged with what to type to accept them); without the socket mark, minus
// any that would swallow the gateway's own address (that would route the
// tunnel into itself).
func (c *Client) routes(info *wire.PeerInfo) []netip.Prefix {
	rs := []netip.Prefix{netip.PrefixFrom(info.Overlay, info.Overlay.BitLen())}
	var gws []netip.Addr
	for _, g := range c.u.Ctrl.Gateways() {
		host, _, err := net.SplitHostPort(g)
		if err != nil {
			continue
		}
		if ips, err := net.LookupIP(host); err == nil {
			for _, ip := range ips {
				if a, ok := netip.AddrFromSlice(ip); ok {
					gws = append(gws, a.Unmap())
				}
			}
		}
	}
	own, err := ownNetworks()
	if err != nil {
		c.log.Warn("cannot read this machine's own networks; routing only what does not need that check", "err", err)
	}
	accepted, refused := acceptRoutes(info.Advertise, c.cfg.Routes, gws, own)
	for _, r := range refused {
		c.log.Warn("not routing a subnet the agent advertises", "prefix", r.Prefix, "why", r.Why, "to_accept", r.Accept)
	}
	if c.marked {
		gws = nil
	}
next:
	for _, p := range accepted {
		for _, gw := range gws {
			if p.Contains(gw) {
				c.log.Warn("not routing an advertised subnet that contains the gateway (this machine cannot mark its own packets past it)", "prefix", p, "gateway", gw)
				continue next
			}
		}
		rs = append(rs, p)
	}
	return rs
}

// agentAbsentRetryMax bounds the wait between asking again for an agent
// that is not there: it should be reached within a few seconds of coming
// online.
const agentAbsentRetryMax = 3 * time.Second

// firstSession sets up the first session. An agent that is not connected
// to the gateway yet (not started, restarting) is waited for, up to
// cfg.WaitAgent: a VPN client is a long-running thing, started by a unit
// or a login script that does not know when the office's agent is up.
func (c *Client) firstSession(ctx context.Context, runErr <-chan error) (*session.Session, *wire.PeerInfo, error) {
	var deadline <-chan time.Time
	if c.cfg.WaitAgent > 0 {
		t := time.NewTimer(c.cfg.WaitAgent)
		defer t.Stop()
		deadline = t.C
	}
	backoff := 500 * time.Millisecond
	var waitingSince time.Time
	lastLog := time.Time{}
	for {
		s, info, err := c.establish(ctx, nil)
		var we *wire.Error
		absent := errors.As(err, &we) && (we.Code == wire.CodeUnknownAgent || we.Code == wire.CodeUnavailable)
		if err == nil || !absent || c.cfg.WaitAgent < 0 {
			if err == nil && !waitingSince.IsZero() {
				c.log.Info("the agent is there", "agent", c.cfg.Agent, "waited", time.Since(waitingSince).Round(time.Second))
			}
			return s, info, err
		}
		if waitingSince.IsZero() {
			waitingSince = time.Now()
		}
		if time.Since(lastLog) >= 30*time.Second {
			wait := "until stopped"
			if c.cfg.WaitAgent > 0 {
				wait = c.cfg.WaitAgent.String()
			}
			c.log.Warn("waiting for the agent to come online", "agent", c.cfg.Agent, "reason", err, "waited", time.Since(waitingSince).Round(time.Second), "waits", wait)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case err := <-runErr:
			return nil, nil, err
		case <-deadline:
			return nil, nil, fmt.Errorf("%w (waited %s for it; --wait)", err, c.cfg.WaitAgent)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, agentAbsentRetryMax)
	}
}

// reattach resumes the current session through a new relay route, or, if
// it is dead, sets up a new one. It retries with backoff until it succeeds
// or ctx ends.
//
// It returns the gateway connection's error if that gives up for good
// meanwhile (the token expired or was refused): no retry can help then.
func (c *Client) reattach(ctx context.Context, runErr <-chan error) error {
	backoff := 500 * time.Millisecond
	for ctx.Err() == nil {
		s, _, err := c.establish(ctx, c.cur.Load())
		if err == nil {
			if c.cur.Load() != s {
				// Receiving first: the TUN reader sends on s as soon as
				// it is current, and the agent answers at once.
				c.pump(s)
			}
			c.tmu.Lock()
			old := c.cur.Swap(s)
			if old != nil && old != s {
				c.ended.Add(old)
			}
			c.tmu.Unlock()
			if old != s {
				if old != nil {
					old.Conn.CloseWithError(0, "replaced")
				}
				c.followMTU(s)
				c.log.Info("session re-established", "session", wire.SessionID(s.ID))
			} else {
				c.log.Info("session resumed over the relay", "session", wire.SessionID(s.ID))
			}
			return nil
		}
		c.log.Warn("cannot re-establish the session yet", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case err := <-runErr:
			return err
		case <-time.After(backoff):
		}
		maxWait := 10 * time.Second
		if we := (*wire.Error)(nil); errors.As(err, &we) && we.Code == wire.CodeUnknownAgent {
			maxWait = agentAbsentRetryMax // the agent restarts: be back soon after it
		}
		backoff = min(2*backoff, maxWait)
	}
	return nil
}

// establish asks the gateway for a session with the agent, resuming cur if
// it is still alive, and otherwise dials a new end-to-end connection.
func (c *Client) establish(ctx context.Context, cur *session.Session) (*session.Session, *wire.PeerInfo, error) {
	resume := resumeID(cur)
	rctx, cancel := context.WithTimeout(ctx, 15*time.Second+c.cfg.DirectTimeout)
	defer cancel()
	req := &wire.Connect{Agent: c.cfg.Agent, Resume: resume, Mode: c.cfg.Mode, Instance: c.instance}
	var offer *punch.Offer
	if c.cfg.Mode != wire.ModeRelay {
		var err error
		if offer, err = punch.NewOffer(c.cfg.Key); err != nil {
			return nil, nil, err
		}
		req.Punch = wire.Punch{ProbePub: offer.Pub, ProbeSig: offer.Sig}
		req.Punch.Candidates = c.candidates()
	}
	req.UDPSize = wire.WireUDPSize(c.u.Ctrl.UDPSize())
	r, err := c.connect(rctx, req)
	if err != nil {
		return nil, nil, err
	}
	gen := c.u.Ctrl.Generation()
	off := r.Session
	if off == nil {
		return nil, nil, errors.New("gateway sent no session")
	}
	key, err := identity.ParsePublicKey(off.PeerKey)
	if err != nil {
		return nil, nil, fmt.Errorf("gateway sent a bad agent key: %w", err)
	}
	// The gateway names the agent's key, but the authority vouches for
	// it: a gateway putting its own key in the middle has no credential
	// for it, not even on this client's first connection.
	ac, err := token.Verify(off.PeerCredential, c.authority, key, time.Now())
	if err == nil && (ac.Role != token.RoleAgent || ac.Name != c.cfg.Agent) {
		err = fmt.Errorf("it is a credential for %s %q", ac.Role, ac.Name)
	}
	if err != nil {
		return nil, nil, &control.FatalError{Code: wire.CodeForbidden, Message: fmt.Sprintf("the gateway's key for agent %q has no valid credential from the authority (%v): refusing to connect; the gateway may be compromised", c.cfg.Agent, err)}
	}
	if err := checkKnownAgent(c.cfg.KnownAgents, c.cfg.Pin, c.cfg.Agent, key); err != nil {
		return nil, nil, err
	}
	if err := c.startPunch(off, key, offer); err != nil {
		return nil, nil, err
	}
	if resumes(cur, resume, off) {
		c.attachedAt.Store(gen)
		return cur, c.info, nil
	}
	if c.cfg.Mode == wire.ModeDirect {
		if err := c.waitDirect(rctx, off); err != nil {
			return nil, nil, err
		}
	}
	ns, info, err := c.dialSession(rctx, off, key)
	if err == nil {
		c.attachedAt.Store(gen)
	}
	return ns, info, err
}

// resumeID is the session a Connect asks to resume: cur, while its
// end-to-end connection lives; 0 (a new session) otherwise.
func resumeID(cur *session.Session) uint64 {
	if cur != nil && cur.Alive() {
		return cur.ID
	}
	return 0
}

// flowsOwner is the client's wire.Connect.Instance: it names what holds
// the tunneled TCP connections, which the agent must not close while that
// lives on. In TUN mode the host's kernel holds them and they outlive a
// restart of this process (an ssh session carries on), so it names this
// boot of the kernel and network namespace, hashed with the node's key so
// as to say nothing else about the host. The netstack holds them in this
// process: a restart ends them, so it is drawn anew. Never 0 ("not told").
func flowsOwner(cfg Config) uint64 {
	if cfg.Netstack == nil {
		if id, err := platform.KernelStackID(); err == nil {
			h := sha256.New()
			h.Write([]byte("nlvpn flows owner\x00" + id + "\x00"))
			h.Write(cfg.Key.Public())
			return binary.BigEndian.Uint64(h.Sum(nil)) | 1
		}
	}
	return rand.Uint64() | 1
}

// resumes reports whether the client keeps cur after asking to resume
// session asked and getting off: the gateway set up the same session and
// the agent says it still holds its end-to-end connection, and so does
// the client. Otherwise a new end-to-end connection is dialed.
func resumes(cur *session.Session, asked uint64, off *wire.Session) bool {
	return asked != 0 && cur != nil && cur.ID == asked && off.ID == asked && off.Resumed && cur.Alive()
}

// dialAgent dials the end-to-end connection of session off to the agent,
// whose key is agentKey, and reads the agent's session info.
func (c *Client) dialAgent(rctx context.Context, off *wire.Session, key identity.PublicKey) (*session.Session, *wire.PeerInfo, error) {
	ctls, err := session.ClientTLS(c.cfg.Key, key)
	if err != nil {
		return nil, nil, err
	}
	// The session's packets must fit both ends' paths: the agent's says
	// the offer (nothing from an agent on a full-size path).
	sz := wire.SizesFor(c.u.Ctrl.UDPSize(), off.UDPSize)
	if c.cfg.Mode != wire.ModeDirect {
		c.u.CheckRelaySoon() // the handshake starts on the relay
	}
	start := time.Now()
	qc, err := c.u.Peers.Dial(rctx, session.Addr(off.ID), ctls, session.DialQUICConfigSized(sz.Peer))
	if err != nil {
		return nil, nil, fmt.Errorf("end-to-end handshake with agent %q: %w", c.cfg.Agent, err)
	}
	// A live agent opens its info stream right after the handshake; one
	// that did not may have completed the handshake on its way out (a
	// restart) and will never say more, so do not wait for the idle timeout.
	ictx, icancel := context.WithTimeout(rctx, peerInfoWait)
	st, err := qc.AcceptStream(ictx)
	icancel()
	if err != nil {
		qc.CloseWithError(1, "no control stream")
		return nil, nil, fmt.Errorf("agent %q sent no session info: %w", c.cfg.Agent, err)
	}
	st.SetReadDeadline(time.Now().Add(10 * time.Second))
	m, err := wire.ReadMessage(st)
	if err != nil || m.Type != wire.TypePeerInfo {
		qc.CloseWithError(1, "bad peer info")
		return nil, nil, fmt.Errorf("agent %q sent bad session info: %v", c.cfg.Agent, err)
	}
	c.log.Info("end-to-end session established", "session", wire.SessionID(off.ID), "agent_key", key, "took", time.Since(start).Round(time.Millisecond), "path", c.pathKind(),
		"mtu", sz.TUN)
	if sz.TUN < wire.TunMTU {
		c.log.Info("tunnel MTU lowered for a small path MTU", "mtu", sz.TUN, "udp_size", sz.UDP,
			"own_udp_size", c.u.Ctrl.UDPSize(), "agent_udp_size", off.UDPSize)
	}
	s := session.New(off.ID, qc, c.log)
	s.SetMTU(sz.TUN)
	return s, m.Peer, nil
}

// maxMoves bounds how often one connect follows the gateways' word that
// the agent is on another gateway: gateways that disagree (the agent
// moving at that moment, or a broken gateway) must not bounce the client
// without end.
const maxMoves = 2

// connect asks the gateway for a session with the agent. When the agent
// is on another gateway of the network, the client moves there first, so
// that the agent's gateway relays the session (never two gateways in a
// row), and asks again.
func (c *Client) connect(ctx context.Context, req *wire.Connect) (*wire.Message, error) {
	for moves := 0; ; moves++ {
		r, err := c.u.Ctrl.Request(ctx, &wire.Message{Type: wire.TypeConnect, Connect: req})
		var we *wire.Error
		if !errors.As(err, &we) || we.Code != wire.CodeAgentElsewhere {
			return r, err
		}
		if moves == maxMoves {
			return nil, &wire.Error{Code: wire.CodeUnavailable, Message: fmt.Sprintf("agent %q: the gateways keep naming another gateway (last %s); asking again later", c.cfg.Agent, we.Gateway)}
		}
		if err := c.u.Ctrl.MoveTo(ctx, we.Gateway); err != nil {
			// Not there (yet): the agent is probably moving to another
			// gateway too. Wait for it as for an agent not online.
			return nil, &wire.Error{Code: wire.CodeUnavailable, Message: fmt.Sprintf("agent %q is on gateway %s: %v", c.cfg.Agent, we.Gateway, err)}
		}
		// The new gateway sees this node's port at its own mapping (a
		// symmetric NAT gives each destination its own): probe from there.
		if len(req.Punch.Candidates) > 0 {
			req.Punch.Candidates = c.candidates()
		}
	}
}

// candidates are where the agent may probe this client: its port as the
// gateway it is registered with sees it, and its own addresses.
func (c *Client) candidates() []netip.AddrPort {
	if w := c.u.Ctrl.Welcome(); w != nil {
		return punch.Candidates(w.Observed, c.u.Port)
	}
	return nil
}

// peerInfoWait bounds the wait for the agent's session info after the
// end-to-end handshake.
const peerInfoWait = 5 * time.Second

// pump starts carrying one session's received packets into the TUN and
// returns: from then on nothing the agent sends can overflow quic-go's
// early queue while a goroutine gets going.
func (c *Client) pump(s *session.Session) {
	s.Start(c.receive)
	go s.Wait()
}

// receive lets in only what the agent may send: packets to our overlay
// address from the agent's overlay address or its advertised subnets. A
// compromised agent must not inject packets claiming to come from
// anywhere else (WireGuard's AllowedIPs check on receive does the same).
func (c *Client) receive(pkt []byte) {
	src, dst, ok := packet.Addrs(pkt)
	if !ok || dst != c.overlay && dst != c.overlay6 || !c.fromAgent(src) {
		c.dropForeign.Add(1)
		session.ReleasePacket(pkt)
		return
	}
	c.deliver(pkt) // takes pkt: it goes back to the session's pool when done
}

func (c *Client) fromAgent(src netip.Addr) bool {
	for _, p := range c.agentPrefixes {
		if p.Contains(src) {
			return true
		}
	}
	return false
}

// startTUN routes the agent's overlay address and subnets into the TUN
// device and starts carrying its packets.
func (c *Client) startTUN(ctx context.Context, dev *tun.Device, w *wire.Welcome, info *wire.PeerInfo, routes []netip.Prefix) (stop func(), err error) {
	// The device's MTU follows the session's before anything is
	// configured on it: the kernel takes no IPv6 address on a device with
	// an MTU below IPv6's minimum.
	c.tun = dev
	c.followMTU(c.cur.Load())
	// IPv6 subnets need the IPv6 overlay address on the device, which a
	// machine with IPv6 off cannot take, nor a tunnel whose path is too
	// small for IPv6's 1280-byte minimum: it goes without them.
	var addr6 netip.Prefix
	if slices.ContainsFunc(routes, func(p netip.Prefix) bool { return p.Addr().Is6() }) {
		if mtu := c.cur.Load().MTU(); mtu < minIPv6MTU {
			routes = slices.DeleteFunc(slices.Clone(routes), func(p netip.Prefix) bool {
				if p.Addr().Is6() {
					c.log.Warn("not routing an IPv6 subnet the agent advertises: the path is too small for IPv6 in the tunnel", "prefix", p, "mtu", mtu, "ipv6_needs", minIPv6MTU)
				}
				return p.Addr().Is6()
			})
		} else if platform.IPv6Enabled() {
			addr6 = netip.PrefixFrom(c.overlay6, 128)
		} else {
			routes = slices.DeleteFunc(slices.Clone(routes), func(p netip.Prefix) bool {
				if p.Addr().Is6() {
					c.log.Warn("not routing an IPv6 subnet the agent advertises: IPv6 is disabled on this machine", "prefix", p)
				}
				return p.Addr().Is6()
			})
		}
	}
	undo, skipped, err := platform.Configure(platform.Config{
		Interface: dev.Name(),
		Addr:      netip.PrefixFrom(w.Overlay, w.Overlay.BitLen()),
		Addr6:     addr6,
		Routes:    routes,
	})
	if err != nil {
		return nil, err
	}
	for _, p := range skipped {
		c.log.Warn("route already exists on this machine; not routing it into the tunnel", "prefix", p)
	}
	// Shields up: what the agent's side sends must be a reply. The filter
	// goes in before the first packet can, and a machine that cannot
	// install it does not come up (unless the user accepts inbound).
	if c.cfg.AcceptInbound {
		c.log.Warn("connections from the agent's side may come in through the tunnel (--accept-inbound)")
	} else {
		f, err := platform.NewInboundFilter(dev.Name())
		if err != nil {
			undo()
			return nil, fmt.Errorf("%w (needs nftables in the kernel; --accept-inbound runs without the filter)", err)
		}
		c.inbound = f
		prevUndo := undo
		undo = func() error {
			return errors.Join(f.Remove(), prevUndo())
		}
		go c.reportInbound(ctx, f)
	}
	undo = c.splitDNS(dev.Name(), info, undo)
	c.tunw = dev.NewBatchWriter(1024)
	c.deliver = func(pkt []byte) {
		c.tunw.WriteWait(pkt) // copies
		session.ReleasePacket(pkt)
	}
	go c.tunw.Run(ctx)
	go c.readTUN(ctx, dev)
	c.log.Info("tunnel up", "mode", "tun", "tun", dev.Name(), "overlay", w.Overlay, "agent_overlay", info.Overlay, "routes", routes, "path", c.pathKind())
	return func() {
		if err := undo(); err != nil {
			c.log.Warn("cleanup", "err", err)
		}
	}, nil
}

// inboundReportEvery is how often the client looks at the inbound
// filter's counter to tell the user about refused connections.
const inboundReportEvery = 10 * time.Second

// reportInbound logs, at most every inboundReportEvery, how many packets
// the inbound filter refused since the last report, and what to type to
// let them in: the kernel drops them, so nobody else would say so.
func (c *Client) reportInbound(ctx context.Context, f *platform.InboundFilter) {
	t := time.NewTicker(inboundReportEvery)
	defer t.Stop()
	var last uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := f.Refused()
		if err != nil || n == last {
			continue
		}
		c.log.Warn("refused connections from the agent's side (only replies to this machine's own connections come in)",
			"packets", n-last, "total", n, "to_accept", "--accept-inbound")
		last = n
	}
}

// send carries one packet from this machine into the current session.
func (c *Client) send(pkt []byte) {
	s := c.cur.Load()
	if s == nil {
		return
	}
	if mtu := s.MTU(); len(pkt) > mtu {
		// The netstack's link cannot go below 1280 (IPv6's minimum) while
		// a session on a small path carries less: split IPv4 packets as
		// the host's own stack would; anything else is dropped and
		// counted by Send.
		if c.fragBuf == nil {
			c.fragBuf = make([]byte, wire.TunMTU)
		}
		if packet.FragmentIPv4(pkt, mtu, c.fragBuf, func(f []byte) { s.Send(f) }) {
			return
		}
	}
	s.Send(pkt)
}

// readTUN carries the machine's packets into the current session.
func (c *Client) readTUN(ctx context.Context, dev *tun.Device) {
	bufs, sizes := dev.ReadBuffers()
	burst := make([][]byte, 0, len(bufs))
	for ctx.Err() == nil {
		k, err := dev.Read(bufs, sizes)
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				c.log.Warn("TUN read failed", "err", err)
			}
			return
		}
		s := c.cur.Load()
		mtu := wire.TunMTU
		if s != nil {
			mtu = s.MTU()
		}
		burst = burst[:0]
		for i := 0; i < k; i++ {
			pkt := bufs[i][tun.Offset : tun.Offset+sizes[i]]
			if len(pkt) > mtu {
				// Never a silent drop: tell the sender the path's MTU.
				c.tooBig(pkt, mtu)
				continue
			}
			burst = append(burst, pkt)
		}
		if s != nil {
			s.SendWaitBatch(burst)
		}
	}
}

// tooBig answers an oversize packet with ICMP "fragmentation needed" /
// "packet too big" written back into the TUN.
func (c *Client) tooBig(pkt []byte, mtu int) {
	if icmp := packet.TooBig(pkt, mtu); icmp != nil {
		c.tunw.Write(icmp)
	}
}

// minIPv6MTU is IPv6's minimum link MTU (RFC 8200): a tunnel whose
// session carries less cannot carry IPv6 (a path MTU below 1392).
const minIPv6MTU = 1280

// followMTU sets the TUN device's MTU to session s's (the kernel's TCP
// MSS follows it), when it differs. A packet still too big (sent before,
// or UDP with DF) gets ICMP back from readTUN.
func (c *Client) followMTU(s *session.Session) {
	if c.tun == nil || s == nil {
		return
	}
	mtu := s.MTU()
	if c.tunMTU == mtu {
		return
	}
	if err := platform.SetMTU(c.tun.Name(), mtu); err != nil {
		c.log.Warn("cannot set the TUN device's MTU to the session's; packets over it get ICMP 'too big' back", "mtu", mtu, "err", err)
		return
	}
	c.tunMTU = mtu
	c.log.Info("tunnel MTU", "tun", c.tun.Name(), "mtu", mtu)
}
