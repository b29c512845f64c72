package netstack

// The client's proxy mode: a gVisor stack that owns the client's overlay
// address, used when the client cannot make a TUN device.
//
//	app ─ SOCKS5 / HTTP proxy (loopback) ─ Proxy.DialContext ─ gVisor stack (overlay addr)
//	                                                              │ out(pkts)     ▲ Inject(pkts)
//	                                                              ▼               │
//	                                                         peer session ─ agent (Egress)
//
// Names (socks5h, HTTP CONNECT host names, absolute URLs) are resolved by a
// small DNS client that sends its queries through the same stack to
// ProxyConfig.DNS, i.e. to a resolver on the agent's side, so LAN-only names
// work (see dns.go).

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/nlvpn/nlvpn/socks5"
)

const (
	// DefaultProxyMTU is used when ProxyConfig.MTU is zero.
	DefaultProxyMTU = 1360
	// DefaultProxyMaxConns bounds the proxy connections (SOCKS5 and HTTP
	// together) served at once; connections beyond it are closed at accept.
	DefaultProxyMaxConns = 4096
	// DefaultProxyDialTimeout bounds a dial through the tunnel when the
	// caller's context has no deadline. The agent gives up on its own real
	// dial after DefaultEgressDialTimeout and answers with a RST, so this is
	// only reached when the tunnel itself is down.
	DefaultProxyDialTimeout = 20 * time.Second
)

// proxyHandshakeTimeout bounds the whole SOCKS5 negotiation and the HTTP
// request header (slowloris). A variable so tests can shorten it.
var proxyHandshakeTimeout = 10 * time.Second

// ProxyConfig configures a client-side Proxy stack.
type ProxyConfig struct {
	// Addr is the client's overlay address (IPv4), the stack's address.
	Addr netip.Addr
	// Addr6 is an optional IPv6 overlay address; without it IPv6
	// destinations are unreachable.
	Addr6 netip.Addr
	// MTU of the virtual NIC; zero means DefaultProxyMTU.
	MTU int
	// DNS is the resolver reached through the tunnel for names (e.g. the
	// agent's overlay address, port 53). Invalid means names cannot be
	// resolved (IP literals still work).
	DNS netip.AddrPort
	// MaxConns bounds concurrent proxy connections; zero means DefaultProxyMaxConns.
	MaxConns int
	// Logger receives logs; nil means slog.Default().
	Logger *slog.Logger
	// Release gives a packet passed to Submit back to its owner once the
	// stack has its copy; nil: nothing to do.
	Release func(pkt []byte)
}

// Credentials are the proxy's username and password (SOCKS5 method 0x02,
// HTTP Proxy-Authorization Basic). A nil *Credentials means no auth.
type Credentials = socks5.Credentials

// ProxyStats are cumulative counters of a Proxy (ActiveConns is a gauge).
type ProxyStats struct {
	Injected       uint64 // packets handed to Inject
	Malformed      uint64 // injected packets dropped as not well-formed IP
	OutPackets     uint64 // packets passed to out
	OutDropped     uint64 // packets of the stack's that never reached out: output queue full, or unwritable
	SubmitDropped  uint64 // packets Submit could not queue: the stack was behind
	Accepted       uint64 // proxy connections accepted (SOCKS5 and HTTP)
	Rejected       uint64 // connections closed at accept: MaxConns reached
	ActiveConns    int64  // proxy connections being served now
	ProtocolErrors uint64 // SOCKS5/HTTP protocol violations (bad version, truncated, bad command, timeouts …)
	AuthFailures   uint64 // missing or wrong credentials
	Dials          uint64 // successful dials through the tunnel
	DialFailures   uint64 // failed dials through the tunnel (incl. name resolution)
	UDPAssociates  uint64 // SOCKS5 UDP ASSOCIATE sessions
	UDPDatagrams   uint64 // datagrams relayed (both ways)
	UDPDropped     uint64 // datagrams dropped: fragments, malformed header, foreign source, unresolvable
	DNSQueries     uint64 // DNS queries sent through the tunnel
	DNSFailures    uint64 // names that could not be resolved
}

// proxyCounters are the Proxy-only counters; Injected, Malformed and
// OutPackets are counted by stackCore.
type proxyCounters struct {
	accepted, rejected                             atomic.Uint64
	protoErrors, authFailures, dials, dialFailures atomic.Uint64
	udpAssociates, udpDatagrams, udpDropped        atomic.Uint64
	dnsQueries, dnsFailures                        atomic.Uint64
	active                                         atomic.Int64
}

// Proxy is the client's gVisor stack plus the local proxies that use it.
// Create it with NewProxy.
type Proxy struct {
	stackCore

	cfg ProxyConfig

	slots chan struct{} // connection bound

	dns *dnsClient

	c proxyCounters
}

// NewProxy starts the client's stack. out receives batches of the IP
// packets the stack emits toward the agent. Calls to out are serialized and
// made from the Proxy's own goroutine, never from inside Inject; out must
// not retain pkts or any packet in it after it returns (the buffers are
// reused) and must not call Close. A packet passed to out is never longer
// than the MTU.
func NewProxy(cfg ProxyConfig, out func(pkts [][]byte)) (*Proxy, error) {
	if out == nil {
		return nil, errors.New("netstack: NewProxy: out is nil")
	}
	if !cfg.Addr.Is4() {
		return nil, errors.New("netstack: NewProxy: Addr must be an IPv4 address")
	}
	if cfg.Addr6.IsValid() && !cfg.Addr6.Is6() {
		return nil, errors.New("netstack: NewProxy: Addr6 must be an IPv6 address")
	}
	mtu, err := stackMTU("NewProxy", cfg.MTU, DefaultProxyMTU)
	if err != nil {
		return nil, err
	}
	maxConns := cfg.MaxConns
	if maxConns <= 0 {
		maxConns = DefaultProxyMaxConns
	}
	p := &Proxy{
		cfg:   cfg,
		slots: make(chan struct{}, maxConns),
	}
	err = p.init(stackConfig{
		who:       "NewProxy",
		component: "proxy",
		log:       cfg.Logger,
		mtu:       mtu,
		out:       out,
		setup:     p.setupNIC,
		release:   cfg.Release,
	})
	if err != nil {
		return nil, err
	}
	p.dns = newDNSClient(p)
	p.start()
	p.log.Info("proxy netstack started", "addr", cfg.Addr, "mtu", mtu, "dns", cfg.DNS)
	return p, nil
}

// setupNIC gives the NIC the client's overlay addresses: unlike Egress, the
// proxy stack is an ordinary host that owns its addresses.
func (p *Proxy) setupNIC(s *stack.Stack) (string, tcpip.Error) {
	for _, a := range []netip.Addr{p.cfg.Addr, p.cfg.Addr6} {
		if !a.IsValid() {
			continue
		}
		pa := tcpip.ProtocolAddress{Protocol: proxyNetProto(a), AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if err := s.AddProtocolAddress(stackNIC, pa, stack.AddressProperties{}); err != nil {
			return "add address", err
		}
	}
	return "", nil
}

func proxyNetProto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() || a.Is4In6() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func proxyFullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	a := ap.Addr().Unmap()
	return tcpip.FullAddress{NIC: stackNIC, Addr: tcpip.AddrFromSlice(a.AsSlice()), Port: ap.Port()}, proxyNetProto(a)
}

// Inject hands the stack raw IP packets received from the agent, best as a
// batch (see Egress.Inject: TCP segments are merged by GRO). It copies what
// it keeps, never panics on garbage (malformed packets are dropped and
// counted) and may be called concurrently and after Close.
func (p *Proxy) Inject(pkts ...[]byte) { p.inject(pkts) }

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() ProxyStats {
	return ProxyStats{
		Injected:       p.injected.Load(),
		Malformed:      p.malformed.Load(),
		OutPackets:     p.outPackets.Load(),
		OutDropped:     p.outDropped(),
		SubmitDropped:  p.subDropped.Load(),
		Accepted:       p.c.accepted.Load(),
		Rejected:       p.c.rejected.Load(),
		ActiveConns:    p.c.active.Load(),
		ProtocolErrors: p.c.protoErrors.Load(),
		AuthFailures:   p.c.authFailures.Load(),
		Dials:          p.c.dials.Load(),
		DialFailures:   p.c.dialFailures.Load(),
		UDPAssociates:  p.c.udpAssociates.Load(),
		UDPDatagrams:   p.c.udpDatagrams.Load(),
		UDPDropped:     p.c.udpDropped.Load(),
		DNSQueries:     p.c.dnsQueries.Load(),
		DNSFailures:    p.c.dnsFailures.Load(),
	}
}

// Close stops the proxies started with ServeSOCKS5/ServeHTTP (their
// listeners are closed, so those calls return), closes every proxied
// connection, and tears the stack down. After Close returns out is no
// longer called. Close is idempotent.
func (p *Proxy) Close() error {
	// Each HTTP proxy closes its transport's idle connections as its
	// ServeHTTP returns.
	p.shutdown(func() {}, "proxy netstack stopped")
	return nil
}

// serve accepts connections on ln and runs handle for each on its own
// goroutine, bounded by MaxConns, until ln is closed or the Proxy is.
func (p *Proxy) serve(ln net.Listener, kind string, handle func(net.Conn)) error {
	if !p.addCloser(ln) {
		return net.ErrClosed
	}
	defer p.removeCloser(ln)
	p.log.Info("proxy listening", "kind", kind, "addr", ln.Addr())
	var tempDelay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || p.ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				// Transient (e.g. out of file descriptors): back off like net/http.
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				p.log.Warn("proxy accept failed; retrying", "kind", kind, "error", err)
				time.Sleep(tempDelay)
				continue
			}
			return err
		}
		tempDelay = 0
		select {
		case p.slots <- struct{}{}:
		default:
			p.c.rejected.Add(1)
			p.log.Warn("proxy connection limit reached; connection closed", "kind", kind, "limit", cap(p.slots))
			_ = c.Close()
			continue
		}
		if !p.track() {
			<-p.slots
			_ = c.Close()
			return nil
		}
		p.c.accepted.Add(1)
		p.c.active.Add(1)
		go func() {
			defer p.wg.Done()
			defer func() { <-p.slots; p.c.active.Add(-1) }()
			if !p.addCloser(c) {
				return
			}
			defer p.removeCloser(c)
			handle(c)
		}()
	}
}

// DialContext opens a connection through the tunnel. network is "tcp",
// "tcp4", "tcp6", "udp", "udp4" or "udp6"; addr is host:port where host is
// an IP literal or a name, resolved through the tunnel via ProxyConfig.DNS.
// Errors wrap syscall.ECONNREFUSED, ENETUNREACH, EHOSTUNREACH, ETIMEDOUT
// where the stack reported those, and *net.DNSError for names.
func (p *Proxy) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: err}
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: network, Err: errors.New("invalid port " + strconv.Quote(portStr))}
	}
	var addrs []netip.Addr
	if ip, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{ip.WithZone("").Unmap()}
	} else {
		addrs, err = p.lookup(ctx, host)
		if err != nil {
			p.c.dialFailures.Add(1)
			return nil, &net.OpError{Op: "dial", Net: network, Err: err}
		}
	}
	var firstErr error
	for _, a := range addrs {
		if a.Is4() && (network == "tcp6" || network == "udp6") || a.Is6() && (network == "tcp4" || network == "udp4") {
			continue
		}
		c, err := p.dialAddr(ctx, network, netip.AddrPortFrom(a, uint16(port)))
		if err == nil {
			p.c.dials.Add(1)
			return c, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		if ctx.Err() != nil {
			break
		}
	}
	p.c.dialFailures.Add(1)
	if firstErr == nil {
		firstErr = &net.OpError{Op: "dial", Net: network, Err: &net.AddrError{Err: "no suitable address", Addr: host}}
	}
	return nil, firstErr
}

// lookup resolves a name through the tunnel, IPv4 first.
func (p *Proxy) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	addrs, err := p.dns.lookup(ctx, host)
	if err != nil {
		p.c.dnsFailures.Add(1)
	}
	return addrs, err
}

func (p *Proxy) dialAddr(ctx context.Context, network string, dst netip.AddrPort) (net.Conn, error) {
	if dst.Addr().Is6() && !p.cfg.Addr6.IsValid() {
		return nil, &net.OpError{Op: "dial", Net: network, Addr: net.UDPAddrFromAddrPort(dst), Err: syscall.ENETUNREACH}
	}
	switch network {
	case "tcp", "tcp4", "tcp6":
		if _, ok := ctx.Deadline(); !ok {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, DefaultProxyDialTimeout)
			defer cancel()
		}
		return p.dialTCP(ctx, dst)
	case "udp", "udp4", "udp6":
		fa, proto := proxyFullAddr(dst)
		c, err := gonet.DialUDP(p.stack, nil, &fa, proto)
		if err != nil {
			return nil, err
		}
		return c, nil
	}
	return nil, &net.OpError{Op: "dial", Net: network, Err: net.UnknownNetworkError(network)}
}

// dialTCP is gonet.DialContextTCP, keeping the kind of failure: gonet turns
// every tcpip.Error into an opaque string, and the SOCKS5 reply code depends
// on it.
func (p *Proxy) dialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	fa, proto := proxyFullAddr(dst)
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: err}
	}
	var wq waiter.Queue
	ep, terr := p.stack.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, opErr(proxyErrno(terr))
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(fa)
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			err := ctx.Err()
			if errors.Is(err, context.DeadlineExceeded) {
				err = proxyTimeoutError{}
			}
			return nil, opErr(err)
		case <-notify:
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, opErr(proxyErrno(terr))
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// proxyTimeoutError is a dial that did not complete in time.
type proxyTimeoutError struct{}

func (proxyTimeoutError) Error() string   { return "i/o timeout" }
func (proxyTimeoutError) Timeout() bool   { return true }
func (proxyTimeoutError) Temporary() bool { return true }
func (proxyTimeoutError) Is(target error) bool {
	return target == syscall.ETIMEDOUT || target == context.DeadlineExceeded
}

// proxyErrno maps the stack's errors to the errno a host socket would give.
func proxyErrno(e tcpip.Error) error {
	switch e.(type) {
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrNetworkUnreachable, *tcpip.ErrNoNet, *tcpip.ErrBadLocalAddress:
		// ErrBadLocalAddress: no overlay address of the destination's family.
		return syscall.ENETUNREACH
	case *tcpip.ErrHostUnreachable, *tcpip.ErrHostDown:
		return syscall.EHOSTUNREACH
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	}
	return errors.New(e.String())
}
