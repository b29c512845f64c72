package netstack

// The proxy's name resolution through the tunnel (dnsClient): the Proxy
// resolves names by sending A (and, when it has an IPv6 address, AAAA)
// queries over UDP through its own stack to ProxyConfig.DNS (the agent's
// forwarder, package dnsfwd), with timeout, retries and a small TTL cache.
// That makes socks5h and HTTP proxy host names resolve on the agent's side,
// so names only the LAN's resolvers know work.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
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
