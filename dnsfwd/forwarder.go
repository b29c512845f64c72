// Package dnsfwd is the agent's DNS service for its clients: a caching
// forwarder that passes every query (any type: A, SRV, PTR, MX, TXT, CNAME
// chains...) to the LAN's own resolvers and returns their answers intact.
//
// The forwarder speaks to its resolvers with a fresh random ID and source
// port per exchange and accepts only a reply whose ID and question match
// what it sent (others are dropped and counted). The client's ID, question
// spelling and EDNS presence are restored on the way back. A reply too big
// for the client's UDP size goes back truncated (TC) so the client asks
// again over TCP, which the forwarder serves too (and then asks its
// resolver over TCP). Answers are cached by question for their TTL (bounded
// in entries and bytes; negative answers for the SOA minimum of RFC 2308,
// never past a ceiling), and the queries in flight are bounded per client
// and in total, every refusal counted.
package dnsfwd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Limits and timers.
const (
	// MaxInflight bounds the queries being answered at once, of all
	// clients together; MaxInflightPerClient those of one client, so one
	// client's flood of slow names cannot take every slot.
	MaxInflight          = 256
	MaxInflightPerClient = 32

	// maxQuery: no real query is bigger (one question, an OPT record).
	maxQuery = 4096
	// udpPayload is the EDNS UDP size the forwarder offers and uses: the
	// size DNS Flag Day 2020 settled on, which does not fragment on the
	// tunnel's path.
	udpPayload = 1232
	// attemptTimeout is one exchange with one resolver; answerTimeout all
	// of them for one query (then the client gets SERVFAIL).
	attemptTimeout = 2 * time.Second
	answerTimeout  = 5 * time.Second
)

// Config configures a Forwarder.
type Config struct {
	// Servers are the resolvers to forward to, in order of preference
	// (port 53 when a literal has none). Empty: the nameservers of
	// ResolvConf.
	Servers []netip.AddrPort
	// ResolvConf is the file naming the host's resolvers when Servers is
	// empty ("" is /etc/resolv.conf). It is read again when it changes.
	ResolvConf string
	// AttemptTimeout bounds one exchange with one resolver (0: 2 s).
	AttemptTimeout time.Duration
	Log            *slog.Logger
}

// Stats are cumulative counters of a Forwarder.
type Stats struct {
	Queries   uint64 // well-formed queries received
	Answered  uint64 // NOERROR answers with at least one record in the answer section
	NXDomain  uint64 // NXDOMAIN and NODATA (NOERROR, no answer) answers
	ServFail  uint64 // SERVFAIL answers: passed on, or made when no resolver answered
	Other     uint64 // answers with another RCODE (REFUSED, FORMERR...), passed on
	NotImpl   uint64 // NOTIMP made here (opcodes other than QUERY)
	Malformed uint64 // queries dropped as not well-formed
	// CacheHits counts queries answered from the cache; Coalesced those
	// that waited for an exchange already asking the same question.
	CacheHits uint64
	Coalesced uint64
	// Truncated counts answers sent with TC set: passed on from the
	// resolver, or cut here to the client's UDP size.
	Truncated uint64
	// Mismatched counts resolver replies dropped because their ID or
	// question did not match the query (stale, spoofed or garbage).
	Mismatched uint64
	// Timeouts counts queries no resolver answered in time (SERVFAIL).
	Timeouts uint64
	// Dropped counts queries dropped because MaxInflight were in flight;
	// ClientLimited those dropped because their client had
	// MaxInflightPerClient in flight.
	Dropped       uint64
	ClientLimited uint64
	// CacheEvicted counts entries pushed out by the cache's bounds.
	CacheEvicted uint64
	// Unread counts answers dropped because a client's UDP flow had 64
	// waiting that it had not read (like a full socket buffer).
	Unread uint64
}

// Forwarder answers DNS queries by forwarding them. Create it with New.
type Forwarder struct {
	cfg   Config
	log   *slog.Logger
	up    *upstreams
	cache *cache
	now   func() time.Time // time.Now; tests move it

	inflight chan struct{}

	clientMu  sync.Mutex
	perClient map[netip.Addr]int // queries in flight, by client; no entry at 0

	flightMu sync.Mutex
	flights  map[flightKey]*flight // exchanges running, by question

	queries, answered, nxdomain, servfail, other, notimpl, malformed                      atomic.Uint64
	cacheHits, truncated, mismatched, timeouts, dropped, clientLimited, coalesced, unread atomic.Uint64
}

// New returns a forwarder. Without Servers and without a ResolvConf that
// names one, it forwards to 127.0.0.1:53 and [::1]:53 (as glibc and Go's
// resolver do) and logs a warning.
func New(cfg Config) *Forwarder {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.AttemptTimeout <= 0 {
		cfg.AttemptTimeout = attemptTimeout
	}
	if cfg.ResolvConf == "" {
		cfg.ResolvConf = "/etc/resolv.conf"
	}
	f := &Forwarder{cfg: cfg, log: cfg.Log.With("component", "dns"), cache: newCache(), now: time.Now,
		inflight: make(chan struct{}, MaxInflight)}
	f.up = newUpstreams(cfg.Servers, cfg.ResolvConf, f.log)
	f.log.Info("DNS forwarder for clients", "servers", f.up.list(), "from", f.up.source())
	return f
}

// Servers returns the resolvers queries go to now.
func (f *Forwarder) Servers() []netip.AddrPort { return f.up.list() }

// Stats returns a snapshot of the counters.
func (f *Forwarder) Stats() Stats {
	return Stats{
		Queries: f.queries.Load(), Answered: f.answered.Load(), NXDomain: f.nxdomain.Load(),
		ServFail: f.servfail.Load(), Other: f.other.Load(), NotImpl: f.notimpl.Load(), Malformed: f.malformed.Load(),
		CacheHits: f.cacheHits.Load(), Coalesced: f.coalesced.Load(), Truncated: f.truncated.Load(), Mismatched: f.mismatched.Load(),
		Timeouts: f.timeouts.Load(), Dropped: f.dropped.Load(), ClientLimited: f.clientLimited.Load(),
		CacheEvicted: f.cache.evicted.Load(), Unread: f.unread.Load(),
	}
}

// acquire takes one of the total and one of client's in-flight slots
// (client's zero value: bounded only in total). False: the query is to be
// dropped (counted).
func (f *Forwarder) acquire(client netip.Addr) bool {
	if client.IsValid() {
		f.clientMu.Lock()
		if f.perClient[client] >= MaxInflightPerClient {
			f.clientMu.Unlock()
			f.clientLimited.Add(1)
			return false
		}
		if f.perClient == nil {
			f.perClient = make(map[netip.Addr]int)
		}
		f.perClient[client]++
		f.clientMu.Unlock()
	}
	select {
	case f.inflight <- struct{}{}:
		return true
	default:
		f.releaseClient(client)
		f.dropped.Add(1)
		return false
	}
}

func (f *Forwarder) release(client netip.Addr) {
	<-f.inflight
	f.releaseClient(client)
}

func (f *Forwarder) releaseClient(client netip.Addr) {
	if !client.IsValid() {
		return
	}
	f.clientMu.Lock()
	defer f.clientMu.Unlock()
	if f.perClient[client]--; f.perClient[client] <= 0 {
		delete(f.perClient, client)
	}
}

// Answer returns the response to one query that came over UDP (tcp false)
// or TCP, or nil if the query is malformed (dropped and counted). It does
// not take an in-flight slot: the servers of this package do that.
func (f *Forwarder) Answer(ctx context.Context, q []byte, tcp bool) []byte {
	ctx, cancel := context.WithTimeout(ctx, answerTimeout)
	defer cancel()
	query, err := parseQuery(q)
	if err != nil {
		f.malformed.Add(1)
		return nil
	}
	f.queries.Add(1)
	limit := 65535
	if !tcp {
		limit = query.udpSize
	}
	if query.msg.Header.OpCode != 0 {
		f.notimpl.Add(1)
		return f.finish(query, errorReply(query, dnsmessage.RCodeNotImplemented), limit, false)
	}
	key := cacheKeyOf(query)
	if m, ok := f.cache.get(key, f.now()); ok {
		f.cacheHits.Add(1)
		return f.finish(query, m, limit, true)
	}
	reply, err := f.resolve(ctx, key, query, tcp)
	if err != nil {
		if errors.Is(err, errTimeout) {
			f.timeouts.Add(1)
		}
		f.log.Debug("no answer from the LAN resolvers", "name", query.question().Name.String(), "type", query.question().Type, "error", err)
		return f.finish(query, errorReply(query, dnsmessage.RCodeServerFailure), limit, true)
	}
	return f.finish(query, reply, limit, true)
}

// flight is one exchange with the resolvers that queries for the same
// question, arriving while it runs, wait for instead of asking again.
type flight struct {
	done chan struct{}
	m    *dnsmessage.Message
	err  error
}

type flightKey struct {
	cacheKey
	tcp bool // a TCP query must not get a UDP exchange's truncated answer
}

// resolve asks the resolvers for query, or waits for the exchange already
// asking the same, and caches the answer. The exchange runs for all who
// wait: the first asker going away does not end it.
func (f *Forwarder) resolve(ctx context.Context, key cacheKey, query *query, tcp bool) (*dnsmessage.Message, error) {
	fk := flightKey{key, tcp}
	f.flightMu.Lock()
	if fl, ok := f.flights[fk]; ok {
		f.flightMu.Unlock()
		f.coalesced.Add(1)
		select {
		case <-fl.done:
			return fl.m, fl.err
		case <-ctx.Done():
			return nil, errTimeout
		}
	}
	if f.flights == nil {
		f.flights = make(map[flightKey]*flight)
	}
	fl := &flight{done: make(chan struct{})}
	f.flights[fk] = fl
	f.flightMu.Unlock()

	ectx, cancel := context.WithTimeout(context.WithoutCancel(ctx), answerTimeout)
	fl.m, fl.err = f.exchange(ectx, query, tcp)
	cancel()
	if fl.err == nil && !fl.m.Header.Truncated {
		f.cache.put(key, fl.m, f.now())
	}
	f.flightMu.Lock()
	delete(f.flights, fk)
	f.flightMu.Unlock()
	close(fl.done)
	return fl.m, fl.err
}

// finish makes the client's copy of m (an answer to query) and packs it
// within limit bytes: the client's ID and question, an OPT record if the
// client sent one, TC and no records if it does not fit.
func (f *Forwarder) finish(query *query, m *dnsmessage.Message, limit int, count bool) []byte {
	out := *m
	out.Header.ID = query.msg.Header.ID
	out.Header.Response = true
	out.Header.RecursionDesired = query.msg.Header.RecursionDesired
	out.Questions = query.msg.Questions
	// Copies: m may be shared (the cache's, another waiter's), and
	// dnsmessage's Pack writes each record's type and length into it.
	out.Answers = slices.Clone(m.Answers)
	out.Authorities = slices.Clone(m.Authorities)
	out.Additionals = slices.Clone(withoutOPT(m.Additionals))
	if query.edns {
		out.Additionals = append(out.Additionals, optRecord(udpPayload, query.dnssecOK))
	}
	b, err := out.Pack()
	if err == nil && len(b) > limit {
		out.Header.Truncated = true
		out.Answers, out.Authorities, out.Additionals = nil, nil, nil
		if query.edns {
			out.Additionals = []dnsmessage.Resource{optRecord(udpPayload, query.dnssecOK)}
		}
		b, err = out.Pack()
	}
	if err != nil {
		// Only a resolver's reply we parsed but cannot pack again gets
		// here: the client gets SERVFAIL rather than nothing.
		f.log.Debug("cannot pack an answer", "error", err)
		out = *errorReply(query, dnsmessage.RCodeServerFailure)
		if b, err = out.Pack(); err != nil {
			return nil
		}
	}
	if count {
		f.countAnswer(&out)
	}
	return b
}

func (f *Forwarder) countAnswer(m *dnsmessage.Message) {
	if m.Header.Truncated {
		f.truncated.Add(1)
	}
	switch m.Header.RCode {
	case dnsmessage.RCodeSuccess:
		if len(m.Answers) > 0 || m.Header.Truncated {
			f.answered.Add(1)
		} else {
			f.nxdomain.Add(1)
		}
	case dnsmessage.RCodeNameError:
		f.nxdomain.Add(1)
	case dnsmessage.RCodeServerFailure:
		f.servfail.Add(1)
	default:
		f.other.Add(1)
	}
}

// errorReply is an answer to query with rcode and nothing else.
func errorReply(query *query, rcode dnsmessage.RCode) *dnsmessage.Message {
	return &dnsmessage.Message{Header: dnsmessage.Header{
		Response: true, OpCode: query.msg.Header.OpCode, RecursionAvailable: true, RCode: rcode,
	}}
}

// errTimeout: no resolver answered in time.
var errTimeout = errors.New("no resolver answered in time")

// exchange asks the resolvers, in order, until one gives an answer that is
// not SERVFAIL, REFUSED or NOTIMP (the last such answer is returned when
// none does).
func (f *Forwarder) exchange(ctx context.Context, query *query, tcp bool) (*dnsmessage.Message, error) {
	servers := f.up.list()
	if len(servers) == 0 {
		return nil, errors.New("no resolvers configured")
	}
	var last *dnsmessage.Message
	var lastErr error
	for _, s := range servers {
		if ctx.Err() != nil {
			break
		}
		actx, cancel := context.WithTimeout(ctx, f.cfg.AttemptTimeout)
		m, err := f.exchangeWith(actx, s, query, tcp)
		cancel()
		if err != nil {
			lastErr = fmt.Errorf("%v: %w", s, err)
			continue
		}
		switch m.Header.RCode {
		case dnsmessage.RCodeServerFailure, dnsmessage.RCodeRefused, dnsmessage.RCodeNotImplemented:
			last = m
			continue
		}
		return m, nil
	}
	if last != nil {
		return last, nil
	}
	if lastErr == nil {
		lastErr = errTimeout
	}
	return nil, lastErr
}
