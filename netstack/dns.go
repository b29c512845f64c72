package netstack

// DNS through the tunnel.
//
// Client side (dnsClient): the Proxy resolves names by sending A (and, when
// it has an IPv6 address, AAAA) queries over UDP through its own stack to
// ProxyConfig.DNS, with timeout, retries and a small TTL cache. That makes
// socks5h and HTTP proxy host names resolve on the agent's side, so names
// only the agent's resolver knows work.
//
// Agent side (DNSServer / ServeDNS): answers A/AAAA queries with the host's
// resolver. It only speaks the small subset a stub resolver needs: one
// question, class IN, types A and AAAA; other types get NOTIMP, unknown
// names NXDOMAIN, resolver failures SERVFAIL; malformed queries are dropped
// and counted.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	dnsQueryTimeout = 2 * time.Second // per attempt
	dnsAttempts     = 3
	dnsCacheMax     = 4096
	dnsMinTTL       = 5 * time.Second
	dnsMaxTTL       = 5 * time.Minute
	dnsNegativeTTL  = 5 * time.Second
	dnsMaxMsg       = 512 // classic UDP DNS size; we never send EDNS
	// dnsAnswerTTL is the TTL the server puts on its answers: Go's resolver
	// does not expose the TTLs it got.
	dnsAnswerTTL = 30
	// dnsMaxAnswers keeps every answer far below 512 bytes (with name
	// compression an AAAA record is 28 bytes).
	dnsMaxAnswers      = 8
	dnsServerLookupMax = 5 * time.Second
	dnsServerInflight  = 256
	dnsServerPerClient = 32
)

// ---------------------------------------------------------------- client

type dnsCacheEntry struct {
	addrs   []netip.Addr
	err     error
	expires time.Time
}

type dnsClient struct {
	p        *Proxy
	mu       sync.Mutex
	cache    map[string]dnsCacheEntry
	inflight map[string]*dnsCall
}

// dnsCall is one lookup in progress; concurrent lookups of the same name
// wait for it instead of sending their own queries.
type dnsCall struct {
	done  chan struct{}
	addrs []netip.Addr
	err   error
}

func newDNSClient(p *Proxy) *dnsClient {
	return &dnsClient{p: p, cache: make(map[string]dnsCacheEntry), inflight: make(map[string]*dnsCall)}
}

// lookup resolves host (a name, not an IP literal) to addresses, IPv4 first.
// Errors are *net.DNSError.
func (d *dnsClient) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	name := strings.ToLower(strings.TrimSuffix(host, "."))
	if name == "" || len(name) > 253 {
		return nil, &net.DNSError{Err: "invalid name", Name: host, IsNotFound: true}
	}
	d.mu.Lock()
	if e, ok := d.cache[name]; ok && time.Now().Before(e.expires) {
		d.mu.Unlock()
		return e.addrs, e.err
	}
	if c, ok := d.inflight[name]; ok {
		d.mu.Unlock()
		select {
		case <-c.done:
			return c.addrs, c.err
		case <-ctx.Done():
			return nil, &net.DNSError{Err: ctx.Err().Error(), Name: host, IsTimeout: errors.Is(ctx.Err(), context.DeadlineExceeded)}
		}
	}
	c := &dnsCall{done: make(chan struct{})}
	d.inflight[name] = c
	d.mu.Unlock()
	// The shared lookup must not die with the first caller's context.
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), dnsQueryTimeout*dnsAttempts+time.Second)
	defer cancel()
	stop := context.AfterFunc(d.p.ctx, cancel)
	defer stop()
	c.addrs, c.err = d.resolve(lctx, host, name)
	d.mu.Lock()
	delete(d.inflight, name)
	d.mu.Unlock()
	close(c.done)
	if c.err != nil {
		d.p.log.Debug("name resolution through the tunnel failed", "name", host, "error", c.err)
	}
	return c.addrs, c.err
}

func (d *dnsClient) resolve(ctx context.Context, host, name string) ([]netip.Addr, error) {
	now := time.Now()

	if !d.p.cfg.DNS.IsValid() {
		return nil, &net.DNSError{Err: "no DNS server configured for the tunnel", Name: host}
	}
	fqdn, err := dnsmessage.NewName(name + ".")
	if err != nil {
		return nil, &net.DNSError{Err: "invalid name", Name: host, IsNotFound: true}
	}
	types := []dnsmessage.Type{dnsmessage.TypeA}
	if d.p.cfg.Addr6.IsValid() {
		types = append(types, dnsmessage.TypeAAAA)
	}
	type result struct {
		addrs []netip.Addr
		ttl   time.Duration
		err   error
	}
	results := make([]result, len(types))
	var wg sync.WaitGroup
	for i, t := range types {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			r.addrs, r.ttl, r.err = d.query(ctx, fqdn, t)
		}()
	}
	wg.Wait()

	var addrs []netip.Addr
	ttl := dnsMaxTTL
	var firstErr error
	notFound := true
	for _, r := range results {
		if r.err != nil {
			var de *net.DNSError
			if !errors.As(r.err, &de) || !de.IsNotFound {
				notFound = false
			}
			if firstErr == nil {
				firstErr = r.err
			}
			continue
		}
		addrs = append(addrs, r.addrs...)
		ttl = min(ttl, r.ttl)
	}
	if len(addrs) == 0 {
		if firstErr == nil || notFound {
			firstErr = &net.DNSError{Err: "no such host", Name: host, Server: d.p.cfg.DNS.String(), IsNotFound: true}
		}
		// Cache only authoritative negatives; transient failures retry.
		if notFound {
			d.store(name, dnsCacheEntry{err: firstErr, expires: now.Add(dnsNegativeTTL)})
		}
		return nil, firstErr
	}
	d.store(name, dnsCacheEntry{addrs: addrs, expires: now.Add(max(ttl, dnsMinTTL))})
	return addrs, nil
}

func (d *dnsClient) store(name string, e dnsCacheEntry) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.cache) >= dnsCacheMax {
		now := time.Now()
		for k, v := range d.cache {
			if now.After(v.expires) {
				delete(d.cache, k)
			}
		}
		if len(d.cache) >= dnsCacheMax {
			clear(d.cache)
		}
	}
	d.cache[name] = e
}

// query sends one question through the stack, retrying on timeout.
func (d *dnsClient) query(ctx context.Context, name dnsmessage.Name, t dnsmessage.Type) ([]netip.Addr, time.Duration, error) {
	server := d.p.cfg.DNS
	derr := func(msg string, timeout, notFound bool) error {
		return &net.DNSError{Err: msg, Name: strings.TrimSuffix(name.String(), "."), Server: server.String(), IsTimeout: timeout, IsNotFound: notFound}
	}
	conn, err := d.p.dialAddr(ctx, "udp", server)
	if err != nil {
		return nil, 0, derr("cannot reach DNS server through the tunnel: "+err.Error(), false, false)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	buf := make([]byte, 1500)
	for attempt := 0; attempt < dnsAttempts; attempt++ {
		if ctx.Err() != nil {
			break
		}
		var idb [2]byte
		_, _ = rand.Read(idb[:])
		id := binary.BigEndian.Uint16(idb[:])
		q := dnsmessage.Message{
			Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
			Questions: []dnsmessage.Question{{Name: name, Type: t, Class: dnsmessage.ClassINET}},
		}
		msg, err := q.Pack()
		if err != nil {
			return nil, 0, derr(err.Error(), false, true)
		}
		d.p.c.dnsQueries.Add(1)
		deadline := time.Now().Add(dnsQueryTimeout)
		if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
			deadline = dl
		}
		_ = conn.SetDeadline(deadline)
		if _, err := conn.Write(msg); err != nil {
			continue
		}
		for {
			n, err := conn.Read(buf)
			if err != nil {
				break // timeout: next attempt
			}
			addrs, ttl, rerr, ok := dnsParseAnswer(buf[:n], id, name, t)
			if !ok {
				continue // not our answer (stale, spoofed, garbage)
			}
			switch rerr {
			case dnsmessage.RCodeSuccess:
				return addrs, ttl, nil
			case dnsmessage.RCodeNameError:
				return nil, 0, derr("no such host", false, true)
			default:
				return nil, 0, derr("server answered "+rerr.String(), false, false)
			}
		}
	}
	if ctx.Err() != nil {
		return nil, 0, derr(ctx.Err().Error(), errors.Is(ctx.Err(), context.DeadlineExceeded), false)
	}
	return nil, 0, derr("no answer from DNS server through the tunnel", true, false)
}

// dnsParseAnswer checks that b answers question (id, name, t) and returns
// its addresses of type t (following no CNAME chains: a recursive server puts
// the final records in the answer section) and the smallest TTL. ok is false
// for anything that is not a well-formed answer to that question.
func dnsParseAnswer(b []byte, id uint16, name dnsmessage.Name, t dnsmessage.Type) (addrs []netip.Addr, ttl time.Duration, rcode dnsmessage.RCode, ok bool) {
	var p dnsmessage.Parser
	h, err := p.Start(b)
	if err != nil || !h.Response || h.ID != id {
		return nil, 0, 0, false
	}
	q, err := p.Question()
	if err != nil || q.Type != t || q.Class != dnsmessage.ClassINET || !strings.EqualFold(q.Name.String(), name.String()) {
		return nil, 0, 0, false
	}
	if err := p.SkipAllQuestions(); err != nil {
		return nil, 0, 0, false
	}
	if h.RCode != dnsmessage.RCodeSuccess {
		return nil, 0, h.RCode, true
	}
	ttl = dnsMaxTTL
	for {
		rh, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, 0, 0, false
		}
		if rh.Class != dnsmessage.ClassINET || rh.Type != t {
			if err := p.SkipAnswer(); err != nil {
				return nil, 0, 0, false
			}
			continue
		}
		switch t {
		case dnsmessage.TypeA:
			r, err := p.AResource()
			if err != nil {
				return nil, 0, 0, false
			}
			addrs = append(addrs, netip.AddrFrom4(r.A))
		case dnsmessage.TypeAAAA:
			r, err := p.AAAAResource()
			if err != nil {
				return nil, 0, 0, false
			}
			addrs = append(addrs, netip.AddrFrom16(r.AAAA))
		}
		ttl = min(ttl, time.Duration(rh.TTL)*time.Second)
	}
	if len(addrs) == 0 {
		// NODATA: the name exists but has no record of this type.
		return nil, 0, dnsmessage.RCodeNameError, true
	}
	return addrs, ttl, dnsmessage.RCodeSuccess, true
}

// ---------------------------------------------------------------- server

// DNSStats are cumulative counters of a DNSServer.
type DNSStats struct {
	Queries   uint64 // well-formed queries received
	Answered  uint64 // NOERROR answers with at least one address
	NXDomain  uint64 // NXDOMAIN (and NODATA) answers
	ServFail  uint64 // SERVFAIL answers (resolver errors, timeouts)
	NotImpl   uint64 // NOTIMP answers (types other than A/AAAA, other opcodes)
	Malformed uint64 // datagrams dropped as not a well-formed query
	Dropped   uint64 // queries dropped because too many were in flight
	// ClientLimited counts queries dropped because their client had
	// dnsServerPerClient in flight already: one client's flood of lookups
	// of slow names cannot take every slot.
	ClientLimited uint64
}

// DNSServer answers A/AAAA queries with a host resolver. The zero value is
// not usable: create it with NewDNSServer.
type DNSServer struct {
	resolver *net.Resolver
	log      *slog.Logger
	inflight chan struct{}

	clientMu  sync.Mutex
	perClient map[netip.Addr]int // queries in flight, by client; no entry at 0

	clientLimited                                                      atomic.Uint64
	queries, answered, nxdomain, servfail, notimpl, malformed, dropped atomic.Uint64
}

// NewDNSServer returns a server resolving with resolver (nil means
// net.DefaultResolver) and logging to log (nil means slog.Default()).
func NewDNSServer(resolver *net.Resolver, log *slog.Logger) *DNSServer {
	if resolver == nil {
		resolver = net.DefaultResolver
	}
	if log == nil {
		log = slog.Default()
	}
	return &DNSServer{resolver: resolver, log: log.With("component", "dns"), inflight: make(chan struct{}, dnsServerInflight)}
}

// ServeDNS answers the queries received on pc with resolver until pc fails
// (e.g. is closed; that returns nil). See DNSServer.
func ServeDNS(pc net.PacketConn, resolver *net.Resolver, log *slog.Logger) error {
	return NewDNSServer(resolver, log).Serve(pc)
}

// Stats returns a snapshot of the counters.
func (s *DNSServer) Stats() DNSStats {
	return DNSStats{
		Queries: s.queries.Load(), Answered: s.answered.Load(), NXDomain: s.nxdomain.Load(),
		ServFail: s.servfail.Load(), NotImpl: s.notimpl.Load(), Malformed: s.malformed.Load(), Dropped: s.dropped.Load(),
		ClientLimited: s.clientLimited.Load(),
	}
}

// Serve answers queries on pc until reading from it fails. A closed pc
// returns nil. Each query is answered on its own goroutine (bounded).
func (s *DNSServer) Serve(pc net.PacketConn) error {
	buf := make([]byte, 65535)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return err
			}
			if strings.Contains(err.Error(), "closed") { // gonet's endpoint-closed errors
				return nil
			}
			return err
		}
		select {
		case s.inflight <- struct{}{}:
		default:
			s.dropped.Add(1)
			continue
		}
		q := append([]byte(nil), buf[:n]...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-s.inflight }()
			if resp := s.Answer(context.Background(), q); resp != nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}()
	}
}

// Answer returns the response to one query datagram, or nil if q is
// malformed (dropped and counted).
func (s *DNSServer) Answer(ctx context.Context, q []byte) []byte {
	ctx, cancel := context.WithTimeout(ctx, dnsServerLookupMax)
	defer cancel()
	resp, verdict := dnsAnswer(q, func(network, name string) ([]netip.Addr, error) {
		return s.resolver.LookupNetIP(ctx, network, name)
	})
	switch verdict {
	case dnsVerdictMalformed:
		s.malformed.Add(1)
		return nil
	case dnsVerdictAnswered:
		s.answered.Add(1)
	case dnsVerdictNXDomain:
		s.nxdomain.Add(1)
	case dnsVerdictServFail:
		s.servfail.Add(1)
	case dnsVerdictNotImpl:
		s.notimpl.Add(1)
	}
	s.queries.Add(1)
	return resp
}

type dnsVerdict int

const (
	dnsVerdictMalformed dnsVerdict = iota
	dnsVerdictAnswered
	dnsVerdictNXDomain
	dnsVerdictServFail
	dnsVerdictNotImpl
)

// dnsAnswer builds the response to query q using lookup (network "ip4" or
// "ip6"). It never panics; malformed input gives (nil, dnsVerdictMalformed).
func dnsAnswer(q []byte, lookup func(network, name string) ([]netip.Addr, error)) ([]byte, dnsVerdict) {
	if len(q) > dnsMaxMsg*8 { // no real query is this big
		return nil, dnsVerdictMalformed
	}
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil || h.Response {
		return nil, dnsVerdictMalformed
	}
	questions, err := p.AllQuestions()
	if err != nil || len(questions) != 1 {
		return nil, dnsVerdictMalformed
	}
	question := questions[0]

	rh := dnsmessage.Header{
		ID: h.ID, Response: true, OpCode: h.OpCode, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true,
	}
	verdict := dnsVerdictNotImpl
	var addrs []netip.Addr
	switch {
	case h.OpCode != 0:
		rh.RCode = dnsmessage.RCodeNotImplemented
	case question.Class != dnsmessage.ClassINET || (question.Type != dnsmessage.TypeA && question.Type != dnsmessage.TypeAAAA):
		rh.RCode = dnsmessage.RCodeNotImplemented
	default:
		network := "ip4"
		if question.Type == dnsmessage.TypeAAAA {
			network = "ip6"
		}
		name := strings.TrimSuffix(question.Name.String(), ".")
		res, err := lookup(network, name)
		var de *net.DNSError
		switch {
		case err == nil && len(res) > 0:
			rh.RCode = dnsmessage.RCodeSuccess
			verdict = dnsVerdictAnswered
			addrs = res
		case err == nil, errors.As(err, &de) && de.IsNotFound:
			// Go reports "no such host" both for a missing name and for a
			// name without records of this family; the latter must be
			// NODATA (NOERROR, empty), or a stub resolver asking A and
			// AAAA would drop the A answer. Ask for the other family to
			// tell them apart.
			other := "ip6"
			if network == "ip6" {
				other = "ip4"
			}
			if o, oerr := lookup(other, name); oerr == nil && len(o) > 0 {
				rh.RCode = dnsmessage.RCodeSuccess
			} else {
				rh.RCode = dnsmessage.RCodeNameError
			}
			verdict = dnsVerdictNXDomain
		default:
			rh.RCode = dnsmessage.RCodeServerFailure
			verdict = dnsVerdictServFail
		}
	}

	b := dnsmessage.NewBuilder(make([]byte, 0, dnsMaxMsg), rh)
	b.EnableCompression()
	if b.StartQuestions() != nil || b.Question(question) != nil || b.StartAnswers() != nil {
		return nil, dnsVerdictMalformed
	}
	n := 0
	for _, a := range addrs {
		if n == dnsMaxAnswers {
			break
		}
		a = a.Unmap()
		hdr := dnsmessage.ResourceHeader{Name: question.Name, Class: dnsmessage.ClassINET, TTL: dnsAnswerTTL}
		var err error
		switch {
		case question.Type == dnsmessage.TypeA && a.Is4():
			err = b.AResource(hdr, dnsmessage.AResource{A: a.As4()})
		case question.Type == dnsmessage.TypeAAAA && a.Is6():
			err = b.AAAAResource(hdr, dnsmessage.AAAAResource{AAAA: a.As16()})
		default:
			continue
		}
		if err != nil {
			return nil, dnsVerdictMalformed
		}
		n++
	}
	resp, err := b.Finish()
	if err != nil {
		return nil, dnsVerdictMalformed
	}
	return resp, verdict
}

// ---------------------------------------------------------------- agent hook

// DNSDialer wraps an egress dial function (EgressConfig.Dial) so that UDP
// flows to the address dns (e.g. the agent's overlay address, port 53) are
// answered in-process by srv instead of being dialed; every other dial goes
// to next (nil means a net.Dialer). The egress's Allow must let dns/udp pass.
func DNSDialer(dns netip.AddrPort, srv *DNSServer, next func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	if next == nil {
		d := &net.Dialer{Timeout: DefaultEgressDialTimeout}
		next = d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if network == "udp" || network == "udp4" || network == "udp6" {
			if ap, err := netip.ParseAddrPort(addr); err == nil && ap.Addr().Unmap() == dns.Addr().Unmap() && ap.Port() == dns.Port() {
				client, _ := ClientOf(ctx)
				return srv.conn(client), nil
			}
		}
		return next(ctx, network, addr)
	}
}

// Conn returns an in-memory datagram connection: each Write is one query,
// each Read returns one answer. It is what DNSDialer hands the egress.
func (s *DNSServer) Conn() net.Conn { return s.conn(netip.Addr{}) }

// conn is Conn for the queries of one client (by overlay address; the zero
// address: not bounded per client).
func (s *DNSServer) conn(client netip.Addr) net.Conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &dnsConn{s: s, client: client, answers: make(chan []byte, 64), ctx: ctx, cancel: cancel, wake: make(chan struct{})}
}

// takeClient takes one of client's in-flight slots.
func (s *DNSServer) takeClient(client netip.Addr) bool {
	if !client.IsValid() {
		return true
	}
	s.clientMu.Lock()
	defer s.clientMu.Unlock()
	if s.perClient[client] >= dnsServerPerClient {
		s.clientLimited.Add(1)
		return false
	}
	if s.perClient == nil {
		s.perClient = make(map[netip.Addr]int)
	}
	s.perClient[client]++
	return true
}

func (s *DNSServer) giveClient(client netip.Addr) {
	if !client.IsValid() {
		return
	}
	s.clientMu.Lock()
	defer s.clientMu.Unlock()
	if s.perClient[client]--; s.perClient[client] <= 0 {
		delete(s.perClient, client)
	}
}

type dnsConn struct {
	s       *DNSServer
	client  netip.Addr
	answers chan []byte
	ctx     context.Context
	cancel  context.CancelFunc

	mu       sync.Mutex
	deadline time.Time
	wake     chan struct{} // closed and replaced when the deadline changes
}

var dnsConnAddr = &net.UDPAddr{IP: net.IPv4(127, 0, 0, 53), Port: 53}

func (c *dnsConn) Read(b []byte) (int, error) {
	for {
		c.mu.Lock()
		dl, wake := c.deadline, c.wake
		c.mu.Unlock()
		var timer *time.Timer
		var expired <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, &net.OpError{Op: "read", Net: "udp", Err: proxyTimeoutError{}}
			}
			timer = time.NewTimer(d)
			expired = timer.C
		}
		var n int
		var err error
		done := true
		select {
		case a := <-c.answers:
			n = copy(b, a)
		case <-c.ctx.Done():
			err = net.ErrClosed
		case <-expired:
			done = false
		case <-wake:
			done = false
		}
		if timer != nil {
			timer.Stop()
		}
		if done {
			return n, err
		}
	}
}

func (c *dnsConn) Write(b []byte) (int, error) {
	if c.ctx.Err() != nil {
		return 0, net.ErrClosed
	}
	if !c.s.takeClient(c.client) {
		return len(b), nil // dropped, like a full socket buffer
	}
	select {
	case c.s.inflight <- struct{}{}:
	default:
		c.s.giveClient(c.client)
		c.s.dropped.Add(1)
		return len(b), nil
	}
	q := append([]byte(nil), b...)
	go func() {
		defer func() { <-c.s.inflight; c.s.giveClient(c.client) }()
		if resp := c.s.Answer(c.ctx, q); resp != nil {
			select {
			case c.answers <- resp:
			default: // reader not keeping up: drop, like a full socket buffer
			}
		}
	}()
	return len(b), nil
}

func (c *dnsConn) Close() error { c.cancel(); return nil }

// MaxDatagram tells the egress how big a read buffer an answer needs.
func (c *dnsConn) MaxDatagram() int { return dnsMaxMsg }

func (c *dnsConn) LocalAddr() net.Addr  { return dnsConnAddr }
func (c *dnsConn) RemoteAddr() net.Addr { return dnsConnAddr }

func (c *dnsConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }
func (c *dnsConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	close(c.wake)
	c.wake = make(chan struct{})
	c.mu.Unlock()
	return nil
}
func (c *dnsConn) SetWriteDeadline(time.Time) error { return nil }
