// Package agent is the headless node inside a remote network. It registers
// with the gateway under its token's name, accepts peer sessions from the
// clients the gateway introduces, and does egress: the clients' packets
// become real connections from the agent's own sockets, through a gVisor
// netstack, so it needs no root and LAN hosts need no route back.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/cowmap"
	"github.com/nlvpn/nlvpn/dnsfwd"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/netstack"
	"github.com/nlvpn/nlvpn/packet"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/policy"
	"github.com/nlvpn/nlvpn/punch"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// agentHeartbeat is how often an agent makes sure its gateway is alive
// (control.Config.Heartbeat): an agent is what clients look for, so it
// must leave a dead gateway soon; agents are few, so the pings cost the
// gateway little.
const agentHeartbeat = 5 * time.Second

// Config configures an agent.
type Config struct {
	Gateway string
	// Gateways are further gateways of the network (control.Config).
	Gateways []string
	Pin      string
	// Token is the agent's credential (token.Token.Enroll with Key): its
	// name and the authority whose clients it admits come from it.
	Token     string
	Key       *identity.Key
	Advertise []netip.Prefix
	// DNSServers are the LAN resolvers the agent's DNS service (port 53 on
	// its overlay address) forwards clients' queries to; empty: the
	// nameservers of /etc/resolv.conf.
	DNSServers []netip.AddrPort
	// AllowLoopback lets clients reach this host's own loopback services,
	// as 127.0.0.1 / ::1 or as the agent's overlay address. Off by default.
	AllowLoopback bool
	// DNSDomains are the LAN's domains, told to clients so that a TUN
	// client sends lookups under them to this agent's DNS (split DNS).
	DNSDomains []string
	// UDPSize fixes the node's UDP size (--mtu; wire.UDPSize); 0:
	// full size, lowered by itself when the path to the gateway says so.
	UDPSize int
	// Limits bounds the flows each client, and all together, may hold;
	// zero fields mean netstack.DefaultEgressLimits. With Routed, a
	// client's bound is its TCP and UDP bounds together, counted by the
	// kernel's connection tracking (ICMP too); the total is the kernel's
	// (nf_conntrack_max).
	Limits netstack.EgressLimits
	// Routed sends the clients' packets for the advertised subnets into a
	// TUN device (TunName; DefaultTunName if empty) for this host's kernel
	// to forward and masquerade, instead of re-originating each flow from
	// the netstack. It needs CAP_NET_ADMIN, and turns on IP forwarding
	// while the agent runs.
	Routed  bool
	TunName string
	// StatusSocket, if set, is a unix socket path where `nlvpn status`
	// reads the agent's sessions and drop counters.
	StatusSocket string
	// Policy, if set, is the per-client policy in force (--policy); the
	// caller may replace it at any time (SIGHUP). Nil: every client may
	// reach everything advertised.
	Policy *policy.Current
	// OnUp, if set, runs once, after the first registration with the
	// gateway (the CLI saves the token that worked).
	OnUp func()
	Log  *slog.Logger
	// Over is how the node reaches the gateway (control.OverAuto, OverUDP,
	// OverTCP); Proxy the HTTP proxy for TCP, or nil.
	Over  string
	Proxy *url.URL
	// Metrics, if set, gets the agent's metrics (see Collect) while Run
	// runs.
	Metrics prometheus.Registerer
}

// Agent is a running agent.
type Agent struct {
	cfg Config
	log *slog.Logger
	// authority signs the credentials of the clients this agent admits:
	// the one that signed its own. name is the agent's, from it.
	authority identity.PublicKey
	name      string
	u         *underlay.Underlay // the node's port: gateway connection, session conn, frame mux
	eg        *netstack.Egress
	rt        *routed // with Config.Routed
	// toClientRun is toClient's buffer for a run of one client's packets
	// (calls of toClient are serialized by eg).
	toClientRun [][]byte
	dns         *dnsfwd.Forwarder
	ctx         context.Context // the agent's lifetime

	mu       sync.Mutex
	offers   map[uint64]*offer           // by session ID, credential verified
	byClient map[netip.Addr]*clientState // by client overlay address
	punches  map[uint64]*underlay.Direct // by session ID
	// clients is byClient as the hot path reads it (no lock per packet).
	clients cowmap.Map[netip.Addr, *clientState]
	live    map[uint64]bool // sessions with a peer connection

	// running holds every session whose packets flow (a superseded one
	// too, until it ends); ended keeps the counts of those that ended.
	// Both change under mu, so totals over both never go back.
	running map[*session.Session]struct{}
	ended   session.Ended

	registered sync.Once // cfg.OnUp
	host       hostAddrs // this host's own addresses, which clients never reach
	denied     deniedCounters
	probes     probeGuard // where hole-punch probes may go, and how many (probes.go)

	dropSpoofed, dropNoSession atomic.Uint64
	// fragmented counts packets split for a session with a smaller MTU.
	fragmented    atomic.Uint64
	dropUnoffered atomic.Uint64 // peer connections refused before TLS: no offer for their session
	stopping      atomic.Bool   // shutting down: no new sessions

	// revoked is the authority's revocation list in force (nil: none
	// seen); revocationsRefused counts lists that did not verify.
	revoked            atomic.Pointer[token.Revocations]
	revocationsRefused atomic.Uint64
	lastDenyLog        atomic.Int64
}

var errUnoffered = errors.New("no offer for this session")

// admitConn is the peer transport's ConnContext: it refuses a connection
// whose session (its address) has no offer, and counts it.
func (a *Agent) admitConn(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
	id, _ := session.IDOf(ci.RemoteAddr)
	a.mu.Lock()
	_, ok := a.offers[id]
	a.mu.Unlock()
	if !ok {
		a.dropUnoffered.Add(1)
		return ctx, errUnoffered
	}
	return ctx, nil
}

// offer is a session offer whose client credential the agent verified.
type offer struct {
	*wire.Session
	client *token.Claims // from the client's credential, not the gateway's word
}

type clientState struct {
	offer *offer
	sess  *session.Session
	flows flowCache // with Config.Routed: the flows the policy allowed
}

// Run runs the agent until ctx ends or the gateway refuses it for good.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if len(cfg.Advertise) == 0 {
		return errors.New("nothing to advertise: give at least one --advertise CIDR")
	}
	own, err := token.ParseCredential(cfg.Token)
	if err != nil {
		return fmt.Errorf("the agent's credential: %w", err)
	}
	if own.Claims.Role != token.RoleAgent || !own.Node.Equal(cfg.Key.Public()) {
		return fmt.Errorf("the credential is not for this agent's key (a %s credential for %q)", own.Claims.Role, own.Claims.Name)
	}
	a := &Agent{cfg: cfg, log: cfg.Log, authority: own.Claims.Authority, name: own.Claims.Name, offers: make(map[uint64]*offer), byClient: make(map[netip.Addr]*clientState),
		punches: make(map[uint64]*underlay.Direct), live: make(map[uint64]bool), running: make(map[*session.Session]struct{})}

	u, err := underlay.Open(control.Config{
		Gateway: cfg.Gateway, Gateways: cfg.Gateways, Pin: cfg.Pin, Heartbeat: agentHeartbeat, Token: cfg.Token, Key: cfg.Key, Over: cfg.Over, Proxy: cfg.Proxy, Advertise: cfg.Advertise, UDPSize: cfg.UDPSize,
		Log: cfg.Log, OnRequest: a.onRequest, OnRevoked: a.endRevoked, OnGone: a.onGone, OnMoved: a.onMoved,
		OnUp: func(_ context.Context, w *wire.Welcome) {
			a.takeRevocations(w.Revocations)
			if cfg.OnUp != nil {
				a.registered.Do(cfg.OnUp)
			}
		},
	})
	if err != nil {
		return err
	}
	defer u.Close()
	a.u = u

	a.host.refresh(cfg.Log)
	a.dns = dnsfwd.New(dnsfwd.Config{Servers: cfg.DNSServers, Log: cfg.Log})
	a.eg, err = netstack.NewEgress(netstack.EgressConfig{MTU: wire.TunMTU, Allow: a.allow, Dial: a.dial, Logger: cfg.Log,
		Release: session.ReleasePacket, Limits: cfg.Limits}, a.toClient)
	if err != nil {
		return fmt.Errorf("start egress netstack: %w", err)
	}
	defer a.eg.Close()
	if cfg.Routed {
		stop, err := a.startRouted(ctx)
		if err != nil {
			return err
		}
		defer stop()
	} else if ok, _ := platform.CanCreateTUN(); ok {
		// Not chosen for it: the routed egress changes the host's
		// forwarding and firewall, which only the operator may decide.
		a.log.Info("this agent may create TUN devices: --routed would let the kernel forward clients' packets (faster, and the LAN hosts' own TCP recovers from loss)")
	}

	stls, err := session.ServerTLS(cfg.Key)
	if err != nil {
		return err
	}
	// A peer connection for a session nobody offered is refused at its
	// first packet, before any TLS work: the session ID travels in clear,
	// and anyone who can send to the port could otherwise make the agent
	// run handshakes for IDs it never agreed to.
	u.Peers.ConnContext = a.admitConn
	ln, err := u.Peers.Listen(stls, session.QUICConfig())
	if err != nil {
		return err
	}
	defer ln.Close()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.ctx = ctx
	go a.host.run(ctx, cfg.Log)
	// The sessions' goodbyes at shutdown travel on the paths Start runs, so
	// clients learn at once that the agent left; Stop ends them after.
	runErr := u.Start()
	defer u.Stop()
	go a.acceptLoop(ctx, ln)
	if cfg.StatusSocket != "" {
		stop, err := a.serveStatus(cfg.StatusSocket)
		if err != nil {
			return err
		}
		defer stop()
	}
	if cfg.Metrics != nil {
		c := statusCollector{a.Status}
		if err := cfg.Metrics.Register(c); err != nil {
			return fmt.Errorf("agent metrics: %w", err)
		}
		defer cfg.Metrics.Unregister(c)
	}
	a.log.Info("agent starting", "advertise", cfg.Advertise)

	var routedFailed <-chan error // nil, never ready, without --routed
	if a.rt != nil {
		routedFailed = a.rt.failed
	}
	select {
	case <-ctx.Done():
		a.stopping.Store(true)
		a.closeSessions()
		return nil
	case err := <-runErr:
		return err
	case err := <-routedFailed:
		a.stopping.Store(true)
		a.closeSessions()
		return fmt.Errorf("routed egress: %w", err)
	}
}

// endRevoked ends the sessions the gateway says belong to a client whose
// token was revoked, and forgets their offers so they cannot resume: on
// the direct path only the agent can cut them. A signed list that comes
// with it is checked and enforced on its own (takeRevocations).
func (a *Agent) endRevoked(r *wire.Revoked) {
	a.takeRevocations(r.List)
	a.mu.Lock()
	var ss []*session.Session
	var gone []uint64
	for _, id := range r.IDs {
		delete(a.offers, id)
		live := false
		for _, cs := range a.byClient {
			if cs.sess.ID == id {
				ss = append(ss, cs.sess)
				live = true
			}
		}
		if !live {
			gone = append(gone, id)
		}
	}
	a.mu.Unlock()
	for _, s := range ss {
		a.log.Info("the client's token was revoked; ending its session", "session", wire.SessionID(s.ID))
		s.Conn.CloseWithError(0, "token revoked")
	}
	// The client hears of it from the gateway too, and may have said
	// goodbye first. Its offer is forgotten either way, so it cannot resume.
	for _, id := range gone {
		a.log.Info("the client's token was revoked; it has no session here now (its offer is forgotten)", "session", wire.SessionID(id))
	}
}

// takeRevocations puts the authority's signed revocation list in force if
// it verifies and is newer than the one in force, and ends the sessions and
// forgets the offers of the clients it revokes. The gateway only carries
// the list: a forged or altered one does not verify, and an older one
// (a gateway trying to bring a revoked client back) is ignored.
func (a *Agent) takeRevocations(signed string) {
	if signed == "" {
		return
	}
	rs, err := token.ParseRevocations(signed, a.authority)
	if err != nil {
		a.revocationsRefused.Add(1)
		a.log.Warn("revocation list from the gateway refused", "err", err)
		return
	}
	for {
		cur := a.revoked.Load()
		if cur != nil && rs.Serial <= cur.Serial {
			return
		}
		if a.revoked.CompareAndSwap(cur, rs) {
			break
		}
	}
	a.log.Info("revocation list in force", "serial", rs.Serial, "entries", len(rs.List))
	a.mu.Lock()
	var ss []*session.Session
	var names []string
	for id, o := range a.offers {
		if _, hit := rs.Match(o.client); hit {
			delete(a.offers, id)
		}
	}
	for _, cs := range a.byClient {
		if _, hit := rs.Match(cs.offer.client); hit {
			ss = append(ss, cs.sess)
			names = append(names, cs.offer.client.Name)
		}
	}
	a.mu.Unlock()
	for i, s := range ss {
		a.log.Info("the client's credential was revoked by the authority; ending its session", "client", names[i], "session", wire.SessionID(s.ID))
		s.Conn.CloseWithError(0, "token revoked")
	}
}

// closeSessions says goodbye to every connected client.
func (a *Agent) closeSessions() {
	a.mu.Lock()
	var ss []*session.Session
	for _, cs := range a.byClient {
		ss = append(ss, cs.sess)
	}
	a.mu.Unlock()
	for _, s := range ss {
		s.Conn.CloseWithError(0, "agent shutting down")
	}
	if len(ss) > 0 {
		a.u.Flush(500 * time.Millisecond)
	}
}

// overlay is the agent's overlay address, once registered.
func (a *Agent) overlay() netip.Addr {
	if a.u == nil { // not started (tests of the policy)
		return netip.Addr{}
	}
	if w := a.u.Ctrl.Welcome(); w != nil {
		return w.Overlay
	}
	return netip.Addr{}
}

// allow is the agent's policy for a new flow from the client at src: the
// advertised subnets; its DNS service on the overlay address; its own
// loopback (also as the overlay address) only with AllowLoopback. Never,
// whatever is advertised: this host's own addresses (clients are given the
// LAN, not the agent's host and the services it listens with), link-local
// addresses and the cloud metadata services that live there
// (169.254.169.254 hands out a cloud machine's credentials), unless a
// policy rule names them explicitly. With a policy (--policy), what the
// rules above allow must also be allowed by the client's first matching
// rule. Refusals are counted by reason and logged with the client's name.
func (a *Agent) allow(src netip.Addr, dst netip.AddrPort, proto string) bool {
	r := verdict(dst, proto, a.overlay(), a.cfg.Advertise, a.cfg.AllowLoopback, a.host.has)
	var pol *policy.Policy
	if a.cfg.Policy != nil {
		pol = a.cfg.Policy.Load()
	}
	if r == allowedService || (r == allowed && pol == nil) {
		return true // the common case: no client lookup
	}
	who := a.subject(src)
	if pol != nil && (r == allowed || r == deniedHostAddr || r == deniedLinkLocal) {
		ok, rule := pol.Decide(who, dst, proto)
		switch {
		case r == allowed && ok:
			return true
		case r == allowed:
			a.denied.policy.Add(1)
			a.logDenied("refused by the policy", who.Name, dst, proto, "rule", rule.String())
			return false
		case ok && namesExactly(rule.Dest, dst.Addr().Unmap(), r) && inPrefixes(a.cfg.Advertise, dst.Addr().Unmap()):
			return true
		}
	}
	switch r {
	case allowed:
		return true
	case deniedLoopback:
		a.denied.loopback.Add(1)
		a.logDenied("refused a connection to this host's loopback (start the agent with --allow-loopback to allow it)", who.Name, dst, proto)
	case deniedLinkLocal:
		a.denied.linkLocal.Add(1)
		a.logDenied("refused a connection to a link-local or cloud metadata address (only a policy rule naming it allows it)", who.Name, dst, proto)
	case deniedHostAddr:
		a.denied.hostAddr.Add(1)
		a.logDenied("refused a connection to one of this host's own addresses (clients reach the advertised LAN, not the agent's host; only a policy rule naming the address allows it)", who.Name, dst, proto)
	default:
		a.denied.notAdvertised.Add(1)
		a.logDenied("refused: not in an advertised subnet", who.Name, dst, proto)
	}
	return false
}

// subject is who the client at overlay address src is, as its session
// offer named it. An address with no session is nobody: only "*" rules
// match it.
func (a *Agent) subject(src netip.Addr) policy.Subject {
	if cs := a.clients.Load(wire.OverlayOwner(src)); cs != nil {
		return policy.Subject{Name: cs.offer.client.Name, Groups: cs.offer.client.Groups}
	}
	return policy.Subject{}
}

// inPrefixes reports whether one of ps contains ip.
func inPrefixes(ps []netip.Prefix, ip netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// namesExactly reports whether a rule's destination names an address that
// is denied by default (r says why) on purpose rather than by being wide:
// for one of this host's addresses the rule must name that one address; for
// link-local, a prefix inside the link-local range (or the IPv6 metadata
// address itself). "*" and wide prefixes never open them.
func namesExactly(dest netip.Prefix, ip netip.Addr, r decision) bool {
	if !dest.IsValid() || !dest.Contains(ip) {
		return false
	}
	switch r {
	case deniedHostAddr:
		return dest.Bits() == ip.BitLen()
	case deniedLinkLocal:
		if ip == metadataV6 {
			return dest.Bits() == 128
		}
		ll := linkLocal4
		if ip.Is6() {
			ll = linkLocal6
		}
		return dest.Bits() >= ll.Bits() && ll.Contains(dest.Addr())
	}
	return false
}

var (
	linkLocal4 = netip.MustParsePrefix("169.254.0.0/16")
	linkLocal6 = netip.MustParsePrefix("fe80::/10")
)

// A policy decision.
type decision int

const (
	allowed        decision = iota
	allowedService          // the agent's own service for clients (DNS on its overlay address)
	deniedNotAdvertised
	deniedLoopback
	deniedLinkLocal
	deniedHostAddr
)

// verdict is the policy as a pure function: what allow decides for dst,
// given the agent's overlay address, the advertised prefixes, whether
// loopback is allowed and this host's own addresses.
func verdict(dst netip.AddrPort, proto string, overlay netip.Addr, advertise []netip.Prefix, allowLoopback bool, isHost func(netip.Addr) bool) decision {
	ip := dst.Addr().Unmap()
	switch {
	case ip == overlay && (proto == "udp" || proto == "tcp") && dst.Port() == 53:
		return allowedService
	case ip.IsLoopback() || ip == overlay:
		if allowLoopback {
			return allowed
		}
		return deniedLoopback
	case ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip == metadataV6:
		return deniedLinkLocal
	case ip.IsMulticast() || ip == limitedBroadcast:
		// Not a flow to one host (and with --routed, the kernel would
		// deliver it to this one).
		return deniedNotAdvertised
	case isHost(ip):
		return deniedHostAddr
	}
	if inPrefixes(advertise, ip) {
		return allowed
	}
	return deniedNotAdvertised
}

// limitedBroadcast is IPv4's all-ones broadcast address.
var limitedBroadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// metadataV6 is the IPv6 address of a cloud instance metadata service
// (AWS); its IPv4 twin, 169.254.169.254, is link-local.
var metadataV6 = netip.MustParseAddr("fd00:ec2::254")

// deniedCounters count the policy's refusals by reason.
type deniedCounters struct {
	notAdvertised, loopback, hostAddr, linkLocal, policy atomic.Uint64
	// credential counts session offers refused (a client credential that
	// does not hold, an overlay address of another client), not packets.
	credential atomic.Uint64
	// offersFull counts offers refused because maxPendingOffers were pending.
	offersFull atomic.Uint64
}

func (d *deniedCounters) snapshot() map[string]uint64 {
	return map[string]uint64{
		"not_advertised": d.notAdvertised.Load(),
		"loopback":       d.loopback.Load(),
		"host_address":   d.hostAddr.Load(),
		"link_local":     d.linkLocal.Load(),
		"policy":         d.policy.Load(),
		"offer_refused":  d.credential.Load(),
		"offers_full":    d.offersFull.Load(),
	}
}

// logDenied logs a refusal at most once a second: a client sending
// refused packets in a loop must not fill the disk or slow the shared
// inject goroutine. The counters count every refusal.
func (a *Agent) logDenied(msg, client string, dst netip.AddrPort, proto string, extra ...any) {
	now := time.Now().UnixNano()
	last := a.lastDenyLog.Load()
	if now-last < int64(time.Second) || !a.lastDenyLog.CompareAndSwap(last, now) {
		return
	}
	a.log.Info(msg, append([]any{"client", client, "dst", dst, "proto", proto}, extra...)...)
}

// dial opens the real flow for the egress: DNS (UDP or TCP) on the overlay
// address is answered in-process by the forwarder; the overlay address
// otherwise means this host's loopback (allow has checked that).
func (a *Agent) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err == nil && ap.Addr().Unmap() == a.overlay() {
		if ap.Port() == 53 {
			client, _ := netstack.ClientOf(ctx)
			switch {
			case strings.HasPrefix(network, "udp"):
				return a.dns.PacketConn(client), nil
			case strings.HasPrefix(network, "tcp"):
				return a.dns.StreamConn(client), nil
			}
		}
		addr = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), ap.Port()).String()
	}
	var d net.Dialer
	d.Timeout = 10 * time.Second
	return d.DialContext(ctx, network, addr)
}

// onRequest answers the gateway's session offers.
func (a *Agent) onRequest(_ context.Context, m *wire.Message) *wire.Message {
	if m.Type != wire.TypeSession {
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeBadRequest, Message: "agent accepts only session offers"}}
	}
	if a.stopping.Load() {
		// A session accepted now would die with the process, and its
		// client would wait on it instead of on the agent's next start.
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "agent shutting down"}}
	}
	s := m.Session
	peerKey, err := identity.ParsePublicKey(s.PeerKey)
	if err != nil || !s.PeerAddr.IsValid() || s.ID == 0 {
		return badRequest("malformed session offer")
	}
	// A client's address is its IPv4 overlay address, nothing else: the
	// agent maps a client's IPv6 overlay address (and an IPv4-mapped form)
	// to it (wire.OverlayOwner), so an offer naming such an alias, or the
	// agent's own address, would let the gateway give one client another's
	// identity, limits and replies.
	if !s.PeerAddr.Is4() || !wire.OverlayPrefix.Contains(s.PeerAddr) || s.PeerAddr == a.overlay() {
		a.denied.credential.Add(1)
		a.log.Warn("session offer refused: the client's overlay address is not a plain one of the overlay", "client_overlay", s.PeerAddr, "offered_as", s.PeerName)
		return badRequest("the client's overlay address must be an IPv4 address in " + wire.OverlayPrefix.String())
	}
	// The gateway introduces clients but does not vouch for them: the
	// client's credential must be signed by this agent's authority, bound
	// to the key the client will prove in the end-to-end handshake, and
	// allow this agent. A gateway offering a key of its own has none.
	client, err := token.Verify(s.PeerCredential, a.authority, peerKey, time.Now())
	if err == nil && (client.Role != token.RoleClient || !client.MayUse(a.name)) {
		err = fmt.Errorf("the credential of %s %q does not allow agent %q", client.Role, client.Name, a.name)
	}
	if err != nil {
		a.denied.credential.Add(1)
		a.log.Warn("session offer refused: the client's credential does not hold", "offered_as", s.PeerName, "key", s.PeerKey, "err", err)
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeForbidden, Message: "client credential refused: " + err.Error()}}
	}
	if r, hit := a.revoked.Load().Match(client); hit {
		a.denied.credential.Add(1)
		a.log.Warn("session offer refused: the client's credential is revoked", "client", client.Name, "token", client.ID)
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeRevoked,
			Message: fmt.Sprintf("the credential of client %q was revoked at %s", client.Name, time.Unix(r.At, 0).UTC().Format(time.RFC3339))}}
	}
	s.PeerName = client.Name
	acc := &wire.Accept{ID: s.ID}
	var probeKey []byte
	if s.Mode != wire.ModeRelay {
		off, err := punch.NewOffer(a.cfg.Key)
		if err != nil {
			return badRequest(err.Error())
		}
		if probeKey, err = off.Key(s.ID, peerKey, s.ProbePub, s.ProbeSig); err != nil {
			a.log.Warn("session offer with a bad probe key", "client", s.PeerName, "err", err)
			return badRequest("bad probe key: " + err.Error())
		}
		acc.Punch = wire.Punch{ProbePub: off.Pub, ProbeSig: off.Sig}
		if w := a.u.Ctrl.Welcome(); w != nil {
			acc.Punch.Candidates = punch.Candidates(w.Observed, a.u.Port)
		}
	}
	acc.UDPSize = wire.WireUDPSize(a.u.Ctrl.UDPSize())
	a.mu.Lock()
	if prev := a.offers[s.ID]; prev != nil && prev.PeerKey != s.PeerKey {
		// A session ID belongs to one client key; another client naming it
		// (it travels in clear in frame headers) must not take it over.
		a.mu.Unlock()
		return badRequest("session ID in use")
	}
	if cs := a.byClient[s.PeerAddr]; cs != nil && cs.offer.PeerKey != s.PeerKey && cs.sess.Alive() {
		// Another client's live session has this overlay address: giving
		// it to a new key would hand over that client's traffic.
		a.mu.Unlock()
		a.denied.credential.Add(1)
		a.log.Warn("session offer refused: its overlay address belongs to another client's live session", "client", s.PeerName, "client_overlay", s.PeerAddr, "holder", cs.offer.client.Name)
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "overlay address in use by another client"}}
	}
	acc.Resumed = a.live[s.ID]
	// One pending (not yet connected) offer per client key: a client
	// cannot pile up offers, each with probes aimed where it says.
	var stale []uint64
	for id, o := range a.offers {
		if id != s.ID && o.PeerKey == s.PeerKey && !a.live[id] {
			delete(a.offers, id)
			stale = append(stale, id)
		}
	}
	if _, known := a.offers[s.ID]; !known && a.pendingOffers() >= maxPendingOffers {
		// Each pending offer holds a punch and its probes for a minute;
		// one per client key bounds them per client, this in total.
		a.mu.Unlock()
		a.denied.offersFull.Add(1)
		for _, id := range stale {
			a.stopPunch(id, true)
		}
		return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeUnavailable, Message: "too many session offers pending at this agent; try again shortly"}}
	}
	a.offers[s.ID] = &offer{Session: s, client: client}
	a.mu.Unlock()
	for _, id := range stale {
		a.stopPunch(id, true)
	}
	a.log.Info("session offered", "client", s.PeerName, "client_overlay", s.PeerAddr, "session", wire.SessionID(s.ID), "mode", modeName(s.Mode))
	if s.Mode != wire.ModeDirect {
		a.u.CheckRelaySoon() // the handshake starts on the relay
	}
	a.startPunch(s, probeKey)
	return &wire.Message{Type: wire.TypeAccept, Accept: acc}
}

// maxPendingOffers bounds session offers not yet followed by a connection.
const maxPendingOffers = 256

// pendingOffers counts offers without a live session; a.mu is held.
func (a *Agent) pendingOffers() int {
	n := 0
	for id := range a.offers {
		if !a.live[id] {
			n++
		}
	}
	return n
}

func badRequest(msg string) *wire.Message {
	return &wire.Message{Type: wire.TypeError, Error: &wire.Error{Code: wire.CodeBadRequest, Message: msg}}
}

func modeName(m string) string {
	if m == wire.ModeAuto {
		return "auto"
	}
	return m
}

// startPunch (re)starts direct-path punching for a session offer. Both
// ends punch; each confirms the path by its own probes' answers.
func (a *Agent) startPunch(s *wire.Session, key []byte) {
	a.stopPunch(s.ID, false)
	log := a.log.With("session", wire.SessionID(s.ID))
	cfg := underlay.DirectConfig{ID: s.ID, Mode: s.Mode, Key: key, Log: log.With("client", s.PeerName)}
	if s.Mode != wire.ModeRelay {
		// Only candidates that can be this client's, at a bounded rate
		// per offer, client name and address (probes.go).
		op := a.probes.begin(s, s.PeerName, a.host.has, func() bool { return a.isLive(s.ID) }, log)
		cfg.Peer = op.cands
		cfg.Gate = func(to netip.AddrPort) bool { return a.probes.allow(op, to) }
		cfg.Accept = func(from netip.AddrPort) bool { return a.probes.accept(op, from) }
		cfg.PeerObserved, cfg.PeerCandidates = s.PeerObserved, s.Candidates
		cfg.Wide = func(role punch.Role, n int) bool { return a.probes.allowWide(op, role, n) }
	}
	d := a.u.StartDirect(a.ctx, cfg)
	a.mu.Lock()
	a.punches[s.ID] = d
	a.mu.Unlock()
	// An offer the client never follows up is forgotten.
	time.AfterFunc(offerTTL, func() {
		a.mu.Lock()
		live := a.live[s.ID]
		if !live {
			delete(a.offers, s.ID)
		}
		a.mu.Unlock()
		if !live {
			a.stopPunch(s.ID, true)
		}
	})
}

// stopPunch ends a session's punching. A session that goes on (punching
// starts again) stays on its fallback path; one that ended leaves the
// path table.
func (a *Agent) stopPunch(id uint64, ended bool) {
	a.mu.Lock()
	d := a.punches[id]
	delete(a.punches, id)
	a.mu.Unlock()
	if ended {
		a.probes.end(id)
	}
	switch {
	case d == nil:
	case ended:
		d.Close()
	default:
		d.Stop()
	}
}

func (a *Agent) acceptLoop(ctx context.Context, ln *quic.Listener) {
	for {
		qc, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		go a.serveSession(ctx, qc)
	}
}

func (a *Agent) serveSession(ctx context.Context, qc *quic.Conn) {
	id, _ := session.IDOf(qc.RemoteAddr())
	a.mu.Lock()
	offer := a.offers[id]
	a.mu.Unlock()
	log := a.log.With("session", wire.SessionID(id))
	if offer == nil {
		log.Warn("peer connection for a session the gateway never offered")
		qc.CloseWithError(1, "unknown session")
		return
	}
	log = log.With("client", offer.PeerName, "client_overlay", offer.PeerAddr)
	got, err := session.PeerKeyOf(qc)
	want, _ := identity.ParsePublicKey(offer.PeerKey)
	if err != nil || !got.Equal(want) {
		log.Warn("client key does not match the gateway's offer", "got", got, "want", want, "err", err)
		qc.CloseWithError(1, "wrong key")
		return
	}
	s := session.New(id, qc, log)
	// The client dialed with packets that fit both paths (and quic-go
	// sends it no larger ones than it advertised); what the egress hands
	// this session must fit them too.
	sz := wire.SizesFor(a.u.Ctrl.UDPSize(), offer.UDPSize)
	s.SetMTU(sz.TUN)
	cs := &clientState{offer: offer, sess: s}
	a.mu.Lock()
	a.live[id] = true
	a.running[s] = struct{}{}
	old := a.byClient[offer.PeerAddr]
	a.byClient[offer.PeerAddr] = cs
	a.clients.Store(offer.PeerAddr, cs)
	a.mu.Unlock()
	if old != nil && old.sess != s {
		// The client started over (restart, new session): the old
		// connection is dead weight.
		old.sess.Conn.CloseWithError(0, "superseded")
		if startedOver(old.offer, offer) {
			// Its flows here have no other end any more; left alone they
			// would hold their LAN connections until a retransmission
			// drew a reset from the client's new stack (never, when idle).
			if n := a.eg.CloseClient(offer.PeerAddr); n > 0 {
				log.Info("the client started over; closed its old flows", "flows", n)
			}
		}
	}
	peer6 := wire.Overlay6(offer.PeerAddr)
	rt := a.rt
	if rt != nil {
		// Before the first packet: a host with strict reverse-path
		// filtering drops what comes from the device without a route
		// back into it. Each session holds the route (and gives it up
		// when it ends): a client's new session may start before its old
		// one has ended.
		// Without the route the session ends at once (closed here: what
		// follows fails fast and the usual cleanup runs).
		if held, err := rt.route(a, offer.PeerAddr); err != nil {
			log.Warn("routed egress: no route to the client; ending its session", "err", err)
			qc.CloseWithError(1, "agent error")
		} else {
			defer rt.unroute(a, held)
		}
	}
	own, own6 := a.overlay(), wire.Overlay6(a.overlay())
	// Receiving starts before the peer info goes out: the client sends
	// once it has that, and a burst that found only quic-go's early queue
	// would lose its tail.
	s.Start(func(pkt []byte) {
		src, dst, ok := packet.Addrs(pkt)
		if !ok || src != offer.PeerAddr && src != peer6 {
			// A client may only speak from its own overlay addresses.
			a.dropSpoofed.Add(1)
			session.ReleasePacket(pkt)
			return
		}
		if rt != nil {
			// The agent's own overlay address, loopback (with
			// --allow-loopback) and this host's addresses (with a policy
			// rule naming them) are the netstack's: the kernel would not
			// forward them, and the forwarding drops anything from the
			// device that is for this host.
			if dst != own && dst != own6 && !dst.Unmap().IsLoopback() && !a.host.has(dst.Unmap()) {
				rt.submit(a, cs, pkt)
				return
			}
		}
		a.eg.Submit(pkt) // the netstack gives it back to the session's pool
	})
	// The agent's own word on what it serves.
	if err := a.sendPeerInfo(ctx, qc); err != nil {
		log.Info("peer info not sent", "err", err)
		qc.CloseWithError(1, "control stream failed")
	} else {
		log.Info("client connected", "mtu", sz.TUN)
		if misbehave != nil { // test builds only (misbehave.go)
			go misbehave(a, s, offer.PeerAddr, log)
		}
	}
	// The client's token expiring ends its session here, not only its
	// gateway connection: a direct path does not pass the gateway.
	exp := time.Unix(offer.client.Expires, 0)
	expiry := time.AfterFunc(time.Until(exp), func() {
		log.Info("the client's token expired; ending its session", "expired", exp.UTC().Format(time.RFC3339))
		s.Conn.CloseWithError(0, "token expired")
	})
	defer expiry.Stop()
	start := time.Now()
	err = s.Wait()
	a.mu.Lock()
	if a.byClient[offer.PeerAddr] == cs {
		delete(a.byClient, offer.PeerAddr)
		a.clients.Delete(offer.PeerAddr)
	}
	delete(a.live, id)
	delete(a.offers, id)
	delete(a.running, s)
	a.ended.Add(s)
	_, stillThere := a.byClient[offer.PeerAddr]
	a.mu.Unlock()
	if !stillThere {
		// The client is gone (not just moved to a new session): end its
		// flows on the LAN too.
		if n := a.eg.CloseClient(offer.PeerAddr); n > 0 {
			log.Info("closed the client's open flows", "flows", n)
		}
	}
	a.stopPunch(id, true)
	st2 := s.Stats()
	log.Info("client disconnected", "after", time.Since(start).Round(time.Second), "reason", err, "rx_bytes", st2.RxBytes, "tx_bytes", st2.TxBytes,
		"drops_queue_full", st2.DropQueueFull, "drops_netstack_queue_all_clients", a.eg.Stats().SubmitDropped, "quic_lost", qc.ConnectionStats().PacketsLost)
}

// sendPeerInfo tells the client, on a stream of its session, what this
// agent serves.
func (a *Agent) sendPeerInfo(ctx context.Context, qc *quic.Conn) error {
	st, err := qc.OpenStreamSync(ctx)
	if err != nil {
		return err
	}
	return wire.WriteMessage(st, &wire.Message{Type: wire.TypePeerInfo, Peer: &wire.PeerInfo{
		Name: a.u.Ctrl.Welcome().Name, Overlay: a.u.Ctrl.Welcome().Overlay, Advertise: a.cfg.Advertise,
		DNSDomains: a.cfg.DNSDomains,
	}})
}

// startedOver reports whether the client of offer next is a new process,
// not the one of prev on a new session: then prev's flows are dead. A
// gateway that does not pass the instance on leaves them to TCP.
func startedOver(prev, next *offer) bool {
	return prev.PeerInstance != 0 && next.PeerInstance != 0 && prev.PeerInstance != next.PeerInstance
}

// toClient sends packets from the egress stack to the clients they are for.
// The egress stack serializes its calls, so one run buffer serves.
func (a *Agent) toClient(pkts [][]byte) { a.sendToClients(pkts, &a.toClientRun) }

// sendToClients sends packets to the clients they are for. A batch is
// mostly one client's, so the lookup (in the published copy of the client
// table: no lock) is made once per run of packets to the same address.
// Each caller that may run concurrently with another brings its own
// runBuf.
func (a *Agent) sendToClients(pkts [][]byte, runBuf *[][]byte) {
	var last netip.Addr
	var cs *clientState
	var frag []byte
	clients := a.clients.Snapshot()
	// run collects consecutive packets for cs, handed over in one call
	// (one lock and one wake-up of the session's connection per run).
	run := (*runBuf)[:0]
	flush := func() {
		if len(run) > 0 {
			cs.sess.SendWaitBatch(run)
			clear(run)
			run = run[:0]
		}
	}
	defer func() {
		flush()
		*runBuf = run
	}()
	for _, pkt := range pkts {
		_, dst, ok := packet.Addrs(pkt)
		if !ok {
			a.dropNoSession.Add(1) // nothing the netstack makes, but counted if it ever did
			continue
		}
		if dst != last {
			flush()
			cs = clients[wire.OverlayOwner(dst)] // IPv4 or IPv6 overlay address
			last = dst
		}
		if cs == nil {
			a.dropNoSession.Add(1)
			continue
		}
		if mtu := cs.sess.MTU(); len(pkt) > mtu {
			flush()
			// The netstack's link fits the largest sessions; this one's
			// path is smaller. TCP follows the client's MSS and never
			// gets here; UDP and ICMP do, and are split as the host's own
			// stack would (IPv4; anything else is dropped and counted by
			// the session).
			if frag == nil {
				frag = make([]byte, wire.TunMTU) // rare: allocated when needed
			}
			if packet.FragmentIPv4(pkt, mtu, frag, func(f []byte) { cs.sess.SendWait(f) }) {
				a.fragmented.Add(1)
				continue
			}
		}
		run = append(run, pkt)
	}
}
