package socks5

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Network is where a Server's clients go: the tunnel.
type Network interface {
	// DialContext opens a TCP connection to addr (host:port; a name is
	// resolved by the Network).
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	// ListenUDP returns an unconnected UDP endpoint that sends to, and
	// receives from, addresses of dst's family, for one association.
	ListenUDP(dst netip.Addr) (net.PacketConn, error)
	// LookupHost resolves a name.
	LookupHost(ctx context.Context, host string) ([]netip.Addr, error)
}

// Counters are where a Server counts; nil fields are not counted.
type Counters struct {
	ProtocolErrors *atomic.Uint64 // protocol violations (bad version, truncated, bad command, timeouts …)
	AuthFailures   *atomic.Uint64 // missing or wrong credentials
	UDPAssociates  *atomic.Uint64 // UDP ASSOCIATE sessions
	UDPDatagrams   *atomic.Uint64 // datagrams relayed (both ways)
	UDPDropped     *atomic.Uint64 // datagrams dropped: fragments, malformed header, foreign source, unresolvable
}

func add(c *atomic.Uint64) {
	if c != nil {
		c.Add(1)
	}
}

// Server serves SOCKS5 connections into its Network.
type Server struct {
	Network  Network
	Auth     *Credentials // nil: no authentication
	Log      *slog.Logger // nil: slog.Default()
	Counters Counters
	// HandshakeTimeout bounds the whole negotiation (slowloris);
	// DialTimeout a CONNECT's dial. Zero: 10 s each.
	HandshakeTimeout, DialTimeout time.Duration
	// Track, if set, tells the owner of what the server holds for a client
	// (a dialed connection, an association's UDP socket), so that it can
	// close them at shutdown; release forgets one. ok false: the owner is
	// shutting down, and the server gives up on the client.
	Track func(io.Closer) (release func(), ok bool)
	// Splice, if set, copies both ways between a client and its dialed
	// connection until both are done; nil: a plain copy each way.
	Splice func(client, remote net.Conn)
}

func (s *Server) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

func orDefault(d time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return 10 * time.Second
}

func (s *Server) track(c io.Closer) (func(), bool) {
	if s.Track == nil {
		return func() {}, true
	}
	return s.Track(c)
}

// ServeConn serves one client connection until it is done; ctx ends it
// early (its dials, lookups and associations).
func (s *Server) ServeConn(ctx context.Context, c net.Conn) {
	log := s.log().With("proto", "socks5", "client", c.RemoteAddr())
	_ = c.SetDeadline(time.Now().Add(orDefault(s.HandshakeTimeout)))
	req, err := socksNegotiate(c, s.Auth)
	if err != nil {
		var se *socksError
		if errors.As(err, &se) {
			if se.auth {
				add(s.Counters.AuthFailures)
			} else {
				add(s.Counters.ProtocolErrors)
			}
			if se.rep >= 0 {
				_ = socksReply(c, byte(se.rep), netip.AddrPort{})
			}
		} else {
			add(s.Counters.ProtocolErrors)
		}
		log.Debug("socks5 negotiation failed", "error", err)
		return
	}
	switch req.cmd {
	case socksCmdConnect:
		s.connect(ctx, c, req, log)
	case socksCmdAssociate:
		s.associate(ctx, c, req, log)
	}
}

func (s *Server) connect(ctx context.Context, c net.Conn, req socksRequest, log *slog.Logger) {
	dctx, cancel := context.WithTimeout(ctx, orDefault(s.DialTimeout))
	remote, err := s.Network.DialContext(dctx, "tcp", req.dst.String())
	cancel()
	if err != nil {
		rep := socksReplyCode(err)
		_ = socksReply(c, rep, netip.AddrPort{})
		log.Debug("socks5 connect failed", "dst", req.dst.String(), "reply", rep, "error", err)
		return
	}
	release, ok := s.track(remote)
	if !ok {
		remote.Close()
		_ = socksReply(c, socksRepGeneralFailure, netip.AddrPort{})
		return
	}
	defer release()
	defer remote.Close()
	bnd, _ := netip.ParseAddrPort(remote.LocalAddr().String())
	if err := socksReply(c, socksRepSuccess, bnd); err != nil {
		return
	}
	_ = c.SetDeadline(time.Time{})
	log.Debug("socks5 connect", "dst", req.dst.String())
	if s.Splice != nil {
		s.Splice(c, remote)
		return
	}
	done := make(chan struct{})
	go func() { io.Copy(remote, c); remote.Close(); close(done) }()
	io.Copy(c, remote)
	c.Close()
	<-done
}

// associate serves UDP ASSOCIATE: a UDP socket on the IP the client
// reached us on relays datagrams (with the SOCKS UDP header) through the
// Network, for as long as the TCP control connection stays open.
func (s *Server) associate(ctx context.Context, c net.Conn, req socksRequest, log *slog.Logger) {
	ctrlLocal, _ := netip.ParseAddrPort(c.LocalAddr().String())
	ctrlRemote, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	uc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ctrlLocal.Addr(), 0)))
	if err != nil {
		_ = socksReply(c, socksRepGeneralFailure, netip.AddrPort{})
		log.Debug("socks5 udp associate: listen failed", "error", err)
		return
	}
	release, ok := s.track(uc)
	if !ok {
		uc.Close()
		return
	}
	defer release()
	bnd, _ := netip.ParseAddrPort(uc.LocalAddr().String())
	if err := socksReply(c, socksRepSuccess, bnd); err != nil {
		uc.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	add(s.Counters.UDPAssociates)
	log.Debug("socks5 udp associate", "relay", bnd)

	r := &udpRelay{s: s, ctx: ctx, uc: uc, clientIP: ctrlRemote.Addr().Unmap()}
	// The client may announce the address it will send from; only its IP
	// and port are binding when given (0.0.0.0:0 means "not known yet").
	if req.dst.name == "" && req.dst.port != 0 && (!req.dst.ip.IsValid() || req.dst.ip.IsUnspecified() || req.dst.ip == r.clientIP) {
		r.client = netip.AddrPortFrom(r.clientIP, req.dst.port)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.fromClient()
	}()
	// The association lives as long as the control connection.
	_, _ = io.Copy(io.Discard, c)
	_ = uc.Close()
	r.closeEndpoints()
	<-done
	r.wg.Wait()
}

// udpRelay is one association's datagrams, both ways.
type udpRelay struct {
	s        *Server
	ctx      context.Context
	uc       *net.UDPConn
	clientIP netip.Addr

	mu     sync.Mutex
	client netip.AddrPort // the client's UDP address, locked on first datagram
	eps    [2]net.PacketConn
	closed bool
	wg     sync.WaitGroup
}

// endpoint returns the Network's UDP endpoint for the family of dst,
// creating it (and its reader) on first use.
func (r *udpRelay) endpoint(dst netip.Addr) (net.PacketConn, error) {
	i := 0
	if dst.Is6() {
		i = 1
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, net.ErrClosed
	}
	if r.eps[i] != nil {
		return r.eps[i], nil
	}
	ep, err := r.s.Network.ListenUDP(dst)
	if err != nil {
		return nil, err
	}
	r.eps[i] = ep
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.toClient(ep)
	}()
	return ep, nil
}

func (r *udpRelay) closeEndpoints() {
	r.mu.Lock()
	r.closed = true
	eps := r.eps
	r.mu.Unlock()
	for _, ep := range eps {
		if ep != nil {
			_ = ep.Close()
		}
	}
}

// fromClient relays the client's datagrams into the Network.
func (r *udpRelay) fromClient() {
	cs := r.s.Counters
	buf := make([]byte, 65535)
	for {
		n, from, err := r.uc.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		r.mu.Lock()
		if from.Addr() != r.clientIP || (r.client.IsValid() && from != r.client) {
			r.mu.Unlock()
			add(cs.UDPDropped) // not our client
			continue
		}
		r.client = from
		r.mu.Unlock()

		// RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA
		b := buf[:n]
		if len(b) < 4 {
			add(cs.UDPDropped)
			continue
		}
		if b[2] != 0 {
			add(cs.UDPDropped) // fragmentation is not supported: drop
			continue
		}
		dst, payload, ok := socksParseAddr(b[3:])
		if !ok {
			add(cs.UDPDropped)
			continue
		}
		ip := dst.ip
		if dst.name != "" {
			ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
			addrs, err := r.s.Network.LookupHost(ctx, dst.name)
			cancel()
			if err != nil || len(addrs) == 0 {
				add(cs.UDPDropped)
				continue
			}
			ip = addrs[0]
		}
		ep, err := r.endpoint(ip)
		if err != nil {
			add(cs.UDPDropped)
			continue
		}
		if _, err := ep.WriteTo(payload, net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, dst.port))); err != nil {
			add(cs.UDPDropped)
			continue
		}
		add(cs.UDPDatagrams)
	}
}

// toClient relays datagrams arriving at ep back to the client.
func (r *udpRelay) toClient(ep net.PacketConn) {
	cs := r.s.Counters
	buf := make([]byte, 65535)
	out := make([]byte, 0, 65535+22)
	for {
		n, from, err := ep.ReadFrom(buf)
		if err != nil {
			if r.isClosed() {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		src, ok := from.(*net.UDPAddr)
		if !ok {
			continue
		}
		r.mu.Lock()
		client := r.client
		r.mu.Unlock()
		if !client.IsValid() {
			add(cs.UDPDropped)
			continue
		}
		out = append(socksAppendAddr(append(out[:0], 0, 0, 0), src.AddrPort()), buf[:n]...)
		if _, err := r.uc.WriteToUDPAddrPort(out, client); err != nil {
			add(cs.UDPDropped)
			continue
		}
		add(cs.UDPDatagrams)
	}
}

func (r *udpRelay) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}
