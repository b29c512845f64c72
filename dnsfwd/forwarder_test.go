package dnsfwd

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/nlvpn/nlvpn/lab/labdns"
)

// lanHost is the address of the fake LAN's machines (never dialed).
var lanHost = netip.MustParseAddr("192.168.77.10")

// fakeUpstream is the LAN's resolver for the tests: labdns's office.lan
// zone on 127.0.0.1 (UDP and TCP, one port), with misbehaving names:
//
//	servfail.office.lan.  SERVFAIL
//	slow.office.lan.      never answered
//	wrongid.office.lan.   answered with another ID only
//	wrongq.office.lan.    answered for another question only
//	spoofed.office.lan.   a wrong-ID and a wrong-question answer, then the real one
//	odd.office.lan.       a record of a type nobody knows (65280)
//	old.office.lan.       FORMERR for a query with EDNS, NXDOMAIN without
//	delay.office.lan.     NXDOMAIN, after 300 ms
type fakeUpstream struct {
	addr    netip.AddrPort
	zone    *labdns.Zone
	queries atomic.Int64 // queries received, both transports
}

func startFakeUpstream(t testing.TB) *fakeUpstream {
	t.Helper()
	u := &fakeUpstream{zone: labdns.Office(lanHost)}
	u.zone.Add("odd.office.lan.", labdns.TTL, &dnsmessage.UnknownResource{Type: 65280, Data: []byte{1, 2, 3, 4}})
	var pc net.PacketConn
	var ln net.Listener
	for range 20 { // the same free port for UDP and TCP
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		pc = nil
	}
	if pc == nil {
		t.Fatal("no free port for UDP and TCP")
	}
	u.addr = netip.MustParseAddrPort(pc.LocalAddr().String())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); labdns.ServeUDP(&multiReplyConn{PacketConn: pc}, u.handle) }()
	go func() { defer wg.Done(); labdns.ServeTCP(ln, u.handle) }()
	t.Cleanup(func() { pc.Close(); ln.Close(); wg.Wait() })
	return u
}

// multiReplyConn lets a handler's answer be several datagrams: parts
// joined by multiReplySep are sent one by one.
type multiReplyConn struct{ net.PacketConn }

const multiReplySep = "\x00--next-datagram--\x00"

func (c *multiReplyConn) WriteTo(b []byte, to net.Addr) (int, error) {
	for _, part := range strings.Split(string(b), multiReplySep) {
		if _, err := c.PacketConn.WriteTo([]byte(part), to); err != nil {
			return 0, err
		}
	}
	return len(b), nil
}

func (u *fakeUpstream) handle(q []byte, tcp bool) []byte {
	u.queries.Add(1)
	var m dnsmessage.Message
	if m.Unpack(q) != nil || len(m.Questions) != 1 {
		return nil
	}
	name := strings.ToLower(m.Questions[0].Name.String())
	mangle := func(f func(*dnsmessage.Message)) []byte {
		var r dnsmessage.Message
		if r.Unpack(u.zone.Answer(q, tcp)) != nil {
			return nil
		}
		f(&r)
		b, _ := r.Pack()
		return b
	}
	switch name {
	case "servfail.office.lan.":
		return mangle(func(r *dnsmessage.Message) { r.RCode = dnsmessage.RCodeServerFailure; r.Authorities = nil })
	case "slow.office.lan.":
		return nil
	case "delay.office.lan.":
		time.Sleep(300 * time.Millisecond)
	case "old.office.lan.":
		if len(m.Additionals) > 0 {
			return mangle(func(r *dnsmessage.Message) {
				r.RCode = dnsmessage.RCodeFormatError
				r.Authorities = nil
				r.Additionals = nil
			})
		}
	case "wrongid.office.lan.":
		return mangle(func(r *dnsmessage.Message) { r.ID++ })
	case "wrongq.office.lan.":
		return mangle(func(r *dnsmessage.Message) { r.Questions[0].Name = dnsmessage.MustNewName("nas.office.lan.") })
	case "spoofed.office.lan.":
		a := mangle(func(r *dnsmessage.Message) { r.ID++ })
		b := mangle(func(r *dnsmessage.Message) { r.Questions[0].Type = dnsmessage.TypeAAAA })
		return []byte(string(a) + multiReplySep + string(b) + multiReplySep + string(u.zone.Answer(q, tcp)))
	}
	return u.zone.Answer(q, tcp)
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func newTestForwarder(t testing.TB, u *fakeUpstream, attempt time.Duration) *Forwarder {
	t.Helper()
	return New(Config{Servers: []netip.AddrPort{u.addr}, AttemptTimeout: attempt, Log: testLogger(t)})
}

type testQuery struct {
	id    uint16
	name  string
	typ   dnsmessage.Type
	edns  int // UDP size in an OPT record; 0: none
	flags func(*dnsmessage.Header)
}

func (q testQuery) pack(t testing.TB) []byte {
	t.Helper()
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: q.id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(q.name), Type: q.typ, Class: dnsmessage.ClassINET}},
	}
	if q.flags != nil {
		q.flags(&m.Header)
	}
	if q.edns > 0 {
		m.Additionals = []dnsmessage.Resource{optRecord(q.edns, false)}
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ask sends q through f.Answer and returns the parsed answer, after
// checking what every answer must keep: the client's ID and question.
func ask(t *testing.T, f *Forwarder, q testQuery, tcp bool) *dnsmessage.Message {
	t.Helper()
	b := f.Answer(context.Background(), q.pack(t), tcp)
	if b == nil {
		t.Fatalf("%s %v: no answer", q.name, q.typ)
	}
	if !tcp && len(b) > max(512, min(q.edns, udpPayload)) {
		t.Errorf("%s %v: a %d-byte UDP answer for a client that takes %d", q.name, q.typ, len(b), max(512, q.edns))
	}
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		t.Fatalf("%s %v: unpack: %v", q.name, q.typ, err)
	}
	if !m.Response || m.ID != q.id || len(m.Questions) != 1 || m.Questions[0].Name.String() != q.name || m.Questions[0].Type != q.typ {
		t.Fatalf("%s %v: answer header %+v question %v: not the client's", q.name, q.typ, m.Header, m.Questions)
	}
	hasOPT := false
	for _, r := range m.Additionals {
		hasOPT = hasOPT || r.Header.Type == dnsmessage.TypeOPT
	}
	if hasOPT != (q.edns > 0) {
		t.Errorf("%s %v: OPT in the answer %v, the client sent one %v", q.name, q.typ, hasOPT, q.edns > 0)
	}
	return &m
}

// rr formats records for comparison: "name type ttl body".
func rr(rs []dnsmessage.Resource) []string {
	var out []string
	for _, r := range rs {
		if r.Header.Type == dnsmessage.TypeOPT {
			continue
		}
		var body string
		switch b := r.Body.(type) {
		case *dnsmessage.AResource:
			body = netip.AddrFrom4(b.A).String()
		case *dnsmessage.CNAMEResource:
			body = b.CNAME.String()
		case *dnsmessage.SRVResource:
			body = fmt.Sprintf("%d %d %d %s", b.Priority, b.Weight, b.Port, b.Target)
		case *dnsmessage.PTRResource:
			body = b.PTR.String()
		case *dnsmessage.MXResource:
			body = fmt.Sprintf("%d %s", b.Pref, b.MX)
		case *dnsmessage.TXTResource:
			body = strings.Join(b.TXT, "|")
			if len(body) > 40 {
				body = fmt.Sprintf("%d strings", len(b.TXT))
			}
		case *dnsmessage.SOAResource:
			body = fmt.Sprintf("%s min %d", b.NS, b.MinTTL)
		case *dnsmessage.UnknownResource:
			body = fmt.Sprintf("%x", b.Data)
		}
		out = append(out, fmt.Sprintf("%s %v %d %s", r.Header.Name, r.Header.Type, r.Header.TTL, body))
	}
	return out
}

func TestForwardAnswersIntact(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, 300*time.Millisecond)
	const typeOdd = dnsmessage.Type(65280)
	for _, tc := range []struct {
		what    string
		q       testQuery
		tcp     bool
		rcode   dnsmessage.RCode
		tc      bool
		answers []string
		auth    []string
	}{
		{what: "SRV", q: testQuery{id: 101, name: "_ldap._tcp.office.lan.", typ: dnsmessage.TypeSRV},
			answers: []string{"_ldap._tcp.office.lan. TypeSRV 60 0 100 389 dc1.office.lan."}},
		{what: "PTR", q: testQuery{id: 102, name: "10.77.168.192.in-addr.arpa.", typ: dnsmessage.TypePTR, edns: 1232},
			answers: []string{"10.77.168.192.in-addr.arpa. TypePTR 60 nas.office.lan."}},
		{what: "MX", q: testQuery{id: 103, name: "office.lan.", typ: dnsmessage.TypeMX},
			answers: []string{"office.lan. TypeMX 60 10 mail.office.lan."}},
		{what: "TXT", q: testQuery{id: 104, name: "office.lan.", typ: dnsmessage.TypeTXT},
			answers: []string{"office.lan. TypeTXT 60 v=spf1 mx -all"}},
		{what: "CNAME chain", q: testQuery{id: 105, name: "www.office.lan.", typ: dnsmessage.TypeA},
			answers: []string{"www.office.lan. TypeCNAME 60 web.office.lan.", "web.office.lan. TypeCNAME 60 nas.office.lan.", "nas.office.lan. TypeA 60 192.168.77.10"}},
		{what: "the client's spelling of the name", q: testQuery{id: 106, name: "NaS.Office.LAN.", typ: dnsmessage.TypeA, edns: 4096},
			answers: []string{"nas.office.lan. TypeA 60 192.168.77.10"}}, // the question keeps it; ask checks
		{what: "a type nobody knows", q: testQuery{id: 107, name: "odd.office.lan.", typ: typeOdd},
			answers: []string{"odd.office.lan. 65280 60 01020304"}},
		{what: "NXDOMAIN with SOA", q: testQuery{id: 108, name: "nosuch.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeNameError,
			auth: []string{"office.lan. TypeSOA 300 ns.office.lan. min 30"}},
		{what: "NODATA with SOA", q: testQuery{id: 109, name: "nas.office.lan.", typ: dnsmessage.TypeAAAA},
			auth: []string{"office.lan. TypeSOA 300 ns.office.lan. min 30"}},
		{what: "SERVFAIL passed", q: testQuery{id: 110, name: "servfail.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeServerFailure},
		{what: "truncated over UDP", q: testQuery{id: 111, name: "big.office.lan.", typ: dnsmessage.TypeTXT, edns: 1232}, tc: true},
		{what: "whole over TCP", q: testQuery{id: 112, name: "big.office.lan.", typ: dnsmessage.TypeTXT}, tcp: true,
			answers: []string{"big.office.lan. TypeTXT 60 40 strings"}},
		// A 4000-byte answer from the cache still goes truncated to a UDP client.
		{what: "truncated over UDP from the cache", q: testQuery{id: 113, name: "big.office.lan.", typ: dnsmessage.TypeTXT}, tc: true},
		{what: "an old resolver asked again without EDNS", q: testQuery{id: 118, name: "old.office.lan.", typ: dnsmessage.TypeA, edns: 1232}, rcode: dnsmessage.RCodeNameError,
			auth: []string{"office.lan. TypeSOA 300 ns.office.lan. min 30"}},
		{what: "upstream timeout", q: testQuery{id: 114, name: "slow.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeServerFailure},
		{what: "wrong ID dropped", q: testQuery{id: 115, name: "wrongid.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeServerFailure},
		{what: "wrong question dropped", q: testQuery{id: 116, name: "wrongq.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeServerFailure},
		{what: "wrong answers dropped, the right one taken", q: testQuery{id: 117, name: "spoofed.office.lan.", typ: dnsmessage.TypeA}, rcode: dnsmessage.RCodeNameError,
			auth: []string{"office.lan. TypeSOA 300 ns.office.lan. min 30"}},
	} {
		t.Run(tc.what, func(t *testing.T) {
			m := ask(t, f, tc.q, tc.tcp)
			if m.RCode != tc.rcode || m.Truncated != tc.tc {
				t.Errorf("rcode %v TC %v, want %v TC %v", m.RCode, m.Truncated, tc.rcode, tc.tc)
			}
			if got, want := strings.Join(rr(m.Answers), "\n"), strings.Join(tc.answers, "\n"); got != want {
				t.Errorf("answers\n%s\nwant\n%s", got, want)
			}
			if got, want := strings.Join(rr(m.Authorities), "\n"), strings.Join(tc.auth, "\n"); got != want {
				t.Errorf("authority\n%s\nwant\n%s", got, want)
			}
		})
	}
	st := f.Stats()
	t.Logf("stats %+v", st)
	// wrongid: 1, wrongq: 1, spoofed: 2.
	if st.Mismatched != 4 || st.Timeouts != 3 || st.Truncated != 2 || st.ServFail != 4 || st.Malformed != 0 || st.CacheHits != 1 {
		t.Errorf("counters %+v: want 4 mismatched, 3 timeouts, 2 truncated, 4 SERVFAIL, 1 cache hit", st)
	}
}

func TestForwardRefusesMalformed(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, time.Second)
	good := testQuery{id: 1, name: "nas.office.lan.", typ: dnsmessage.TypeA}.pack(t)
	resp := append([]byte(nil), good...)
	resp[2] |= 0x80 // QR: a response, not a query
	noQ := append([]byte(nil), good[:12]...)
	noQ[5] = 0
	for _, b := range [][]byte{nil, {1}, good[:20], resp, noQ, make([]byte, maxQuery+1)} {
		if a := f.Answer(context.Background(), b, false); a != nil {
			t.Errorf("answered %x", b)
		}
	}
	if st := f.Stats(); st.Malformed != 6 || st.Queries != 0 || u.queries.Load() != 0 {
		t.Errorf("stats %+v, upstream asked %d times", st, u.queries.Load())
	}
	// Another opcode: NOTIMP here, nothing forwarded.
	m := ask(t, f, testQuery{id: 9, name: "nas.office.lan.", typ: dnsmessage.TypeA, flags: func(h *dnsmessage.Header) { h.OpCode = 4 }}, false)
	if m.RCode != dnsmessage.RCodeNotImplemented || u.queries.Load() != 0 || f.Stats().NotImpl != 1 {
		t.Errorf("NOTIFY: rcode %v, upstream asked %d times", m.RCode, u.queries.Load())
	}
}

func TestForwardCache(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, time.Second)
	var skew atomic.Int64
	f.now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	at := func(d time.Duration) { skew.Store(int64(d)) }

	srv := testQuery{id: 1, name: "_ldap._tcp.office.lan.", typ: dnsmessage.TypeSRV}
	nx := testQuery{id: 2, name: "nosuch.office.lan.", typ: dnsmessage.TypeA}
	for _, step := range []struct {
		at      time.Duration
		q       testQuery
		asked   int64 // upstream queries so far
		minTTL  uint32
		maxTTL  uint32
		section string
	}{
		{0, srv, 1, 60, 60, "answer"},
		{20 * time.Second, srv, 1, 39, 40, "answer"}, // hit: TTL 60 less 20 s in the cache
		{59 * time.Second, srv, 1, 0, 1, "answer"},
		{61 * time.Second, srv, 2, 60, 60, "answer"}, // expired: asked again
		// NXDOMAIN: for the SOA's MINIMUM, 30 s (its TTL is 300).
		{61 * time.Second, nx, 3, 300, 300, "authority"},
		{90 * time.Second, nx, 3, 271, 271, "authority"},
		{92 * time.Second, nx, 4, 300, 300, "authority"},
	} {
		at(step.at)
		m := ask(t, f, step.q, false)
		rs := m.Answers
		if step.section == "authority" {
			rs = m.Authorities
		}
		if len(rs) == 0 {
			t.Fatalf("at %v %s: no %s records", step.at, step.q.name, step.section)
		}
		ttl := rs[0].Header.TTL
		if got := u.queries.Load(); got != step.asked || ttl < step.minTTL || ttl > step.maxTTL {
			t.Errorf("at %v %s: upstream asked %d times (want %d), TTL %d (want %d..%d)", step.at, step.q.name, got, step.asked, ttl, step.minTTL, step.maxTTL)
		}
	}
	// Not cached: SERVFAIL, truncated answers, negative answers without SOA.
	for range 2 {
		ask(t, f, testQuery{id: 3, name: "servfail.office.lan.", typ: dnsmessage.TypeA}, false)
	}
	if got := u.queries.Load(); got != 6 {
		t.Errorf("SERVFAIL asked %d times in all, want 6 (not cached)", got)
	}
	if hits := f.Stats().CacheHits; hits != 3 {
		t.Errorf("%d cache hits, want 3", hits)
	}
}

func TestCacheTTLCeilings(t *testing.T) {
	soa := func(ttl, minimum uint32) dnsmessage.Resource {
		return dnsmessage.Resource{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("lan."), Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET, TTL: ttl},
			Body: &dnsmessage.SOAResource{NS: dnsmessage.MustNewName("ns.lan."), MBox: dnsmessage.MustNewName("h.lan."), MinTTL: minimum}}
	}
	a := func(ttl uint32) dnsmessage.Resource {
		return dnsmessage.Resource{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName("a.lan."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: ttl},
			Body: &dnsmessage.AResource{}}
	}
	for _, tc := range []struct {
		what string
		m    dnsmessage.Message
		want time.Duration
	}{
		{"positive: the smallest TTL", dnsmessage.Message{Answers: []dnsmessage.Resource{a(100), a(40)}}, 40 * time.Second},
		{"positive: a day is 5 minutes", dnsmessage.Message{Answers: []dnsmessage.Resource{a(86400)}}, maxTTL},
		{"TTL 0: not cached", dnsmessage.Message{Answers: []dnsmessage.Resource{a(0)}}, 0},
		{"NXDOMAIN: SOA minimum", dnsmessage.Message{Header: dnsmessage.Header{RCode: dnsmessage.RCodeNameError}, Authorities: []dnsmessage.Resource{soa(300, 20)}}, 20 * time.Second},
		{"NXDOMAIN: SOA TTL when smaller", dnsmessage.Message{Header: dnsmessage.Header{RCode: dnsmessage.RCodeNameError}, Authorities: []dnsmessage.Resource{soa(10, 20)}}, 10 * time.Second},
		{"NXDOMAIN: an hour is a minute", dnsmessage.Message{Header: dnsmessage.Header{RCode: dnsmessage.RCodeNameError}, Authorities: []dnsmessage.Resource{soa(3600, 3600)}}, maxNegativeTTL},
		{"NODATA without SOA: not cached", dnsmessage.Message{}, 0},
		{"SERVFAIL: not cached", dnsmessage.Message{Header: dnsmessage.Header{RCode: dnsmessage.RCodeServerFailure}, Answers: []dnsmessage.Resource{a(60)}}, 0},
		{"truncated: not cached", dnsmessage.Message{Header: dnsmessage.Header{Truncated: true}, Answers: []dnsmessage.Resource{a(60)}}, 0},
	} {
		if got := ttlOf(&tc.m); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.what, got, tc.want)
		}
	}
}

func TestCacheBounds(t *testing.T) {
	now := time.Now()
	msg := func(name string, strs int) *dnsmessage.Message {
		txt := make([]string, strs)
		for i := range txt {
			txt[i] = strings.Repeat("t", 250)
		}
		return &dnsmessage.Message{Header: dnsmessage.Header{Response: true},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeTXT, Class: dnsmessage.ClassINET}},
			Answers: []dnsmessage.Resource{{Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeTXT, Class: dnsmessage.ClassINET, TTL: 60},
				Body: &dnsmessage.TXTResource{TXT: txt}}}}
	}
	key := func(name string) cacheKey {
		return cacheKey{name: name, typ: dnsmessage.TypeTXT, class: dnsmessage.ClassINET}
	}
	// Entries.
	c := newCache()
	for i := range cacheMaxEntries + 10 {
		n := fmt.Sprintf("n%d.lan.", i)
		c.put(key(n), msg(n, 1), now)
	}
	if c.len() != cacheMaxEntries || c.evicted.Load() != 10 {
		t.Errorf("%d entries, %d evicted; want %d, 10", c.len(), c.evicted.Load(), cacheMaxEntries)
	}
	if _, ok := c.get(key("n0.lan."), now); ok {
		t.Error("the oldest entry is still there")
	}
	if _, ok := c.get(key(fmt.Sprintf("n%d.lan.", cacheMaxEntries+9)), now); !ok {
		t.Error("the newest entry is gone")
	}
	// Bytes: 60 KB answers are too big to cache at all; 16 KB ones fill
	// the bytes before the entries.
	c = newCache()
	c.put(key("huge.lan."), msg("huge.lan.", 240), now)
	if c.len() != 0 {
		t.Error("a 60 KB answer was cached")
	}
	for i := range 400 {
		n := fmt.Sprintf("b%d.lan.", i)
		c.put(key(n), msg(n, 64), now)
	}
	if c.bytes > cacheMaxBytes || c.len() >= 400 || c.len() < 200 {
		t.Errorf("%d bytes in %d entries, bound %d", c.bytes, c.len(), cacheMaxBytes)
	}
}

// TestForwardLimits: per client, then in total, queries beyond the bound
// are dropped and counted, and the slots come back.
func TestForwardLimits(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, 2*time.Second)
	slow := testQuery{id: 1, name: "slow.office.lan.", typ: dnsmessage.TypeA}.pack(t)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	clients := MaxInflight/MaxInflightPerClient + 1
	for i := range clients {
		c := f.PacketConn(netip.AddrFrom4([4]byte{100, 64, 0, byte(10 + i)}))
		conns = append(conns, c)
		n := MaxInflightPerClient
		if i == 0 {
			n += 5 // 5 over the client's bound
		}
		for range n {
			c.Write(slow)
		}
	}
	st := f.Stats()
	if st.ClientLimited != 5 || st.Dropped != MaxInflightPerClient {
		t.Errorf("client-limited %d (want 5), dropped %d (want %d)", st.ClientLimited, st.Dropped, MaxInflightPerClient)
	}
	// The slots come back when the lookups time out (SERVFAIL).
	deadline := time.Now().Add(10 * time.Second)
	for len(f.inflight) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	f.clientMu.Lock()
	left := len(f.perClient)
	f.clientMu.Unlock()
	if len(f.inflight) != 0 || left != 0 {
		t.Fatalf("%d in flight, %d clients with slots after the timeouts", len(f.inflight), left)
	}
	c := conns[0]
	c.Write(testQuery{id: 2, name: "nas.office.lan.", typ: dnsmessage.TypeA}.pack(t))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	var m dnsmessage.Message
	for range MaxInflightPerClient + 1 { // the timed-out queries' SERVFAILs first
		n, err := c.Read(buf)
		if err != nil || m.Unpack(buf[:n]) != nil {
			t.Fatalf("after the limits: %v", err)
		}
		if m.ID == 2 {
			break
		}
		if m.RCode != dnsmessage.RCodeServerFailure {
			t.Fatalf("a slow query answered %v", m.RCode)
		}
	}
	if m.ID != 2 || len(m.Answers) != 1 {
		t.Fatalf("after the limits: %+v %v", m.Header, m.Answers)
	}
}

// TestForwardWithGoResolver: Go's own stub resolver, through ServeUDP and
// ServeTCP on one port, gets SRV, PTR, MX, A through CNAMEs, and a
// truncated answer again over TCP.
func TestForwardWithGoResolver(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, time.Second)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		t.Skipf("port taken for TCP: %v", err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); f.ServeUDP(pc) }()
	go func() { defer wg.Done(); f.ServeTCP(ln) }()
	defer func() { pc.Close(); ln.Close(); wg.Wait() }()
	addr := pc.LocalAddr().String()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	_, srvs, err := r.LookupSRV(ctx, "ldap", "tcp", "office.lan")
	if err != nil || len(srvs) != 1 || srvs[0].Target != "dc1.office.lan." || srvs[0].Port != 389 {
		t.Errorf("SRV: %v %v", srvs, err)
	}
	names, err := r.LookupAddr(ctx, "192.168.77.10")
	if err != nil || len(names) != 1 || names[0] != "nas.office.lan." {
		t.Errorf("PTR: %v %v", names, err)
	}
	mxs, err := r.LookupMX(ctx, "office.lan")
	if err != nil || len(mxs) != 1 || mxs[0].Host != "mail.office.lan." {
		t.Errorf("MX: %v %v", mxs, err)
	}
	addrs, err := r.LookupHost(ctx, "www.office.lan") // through the CNAME chain
	if err != nil || len(addrs) != 1 || addrs[0] != lanHost.String() {
		t.Errorf("A through CNAMEs: %v %v", addrs, err)
	}
	txts, err := r.LookupTXT(ctx, "big.office.lan")
	if err != nil || len(strings.Join(txts, "")) != 40*60 {
		t.Errorf("TXT over TCP after TC: %d bytes, %v", len(strings.Join(txts, "")), err)
	}
	if st := f.Stats(); st.Truncated == 0 {
		t.Errorf("no truncated answer counted: %+v", st)
	}
}

// TestStreamConn: DNS over TCP through the in-memory conn the agent hands
// its egress: two queries on one connection, answers in order, whole.
func TestStreamConn(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, time.Second)
	c := f.StreamConn(netip.MustParseAddr("100.64.0.9"))
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	for i, q := range []testQuery{{id: 7, name: "big.office.lan.", typ: dnsmessage.TypeTXT}, {id: 8, name: "_kerberos._udp.office.lan.", typ: dnsmessage.TypeSRV}} {
		b := q.pack(t)
		if _, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...)); err != nil {
			t.Fatal(err)
		}
		var l [2]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			t.Fatal(err)
		}
		resp := make([]byte, binary.BigEndian.Uint16(l[:]))
		if _, err := io.ReadFull(c, resp); err != nil {
			t.Fatal(err)
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil || m.ID != q.id || m.Truncated || len(m.Answers) != 1 {
			t.Fatalf("query %d: %+v %v", i, m.Header, err)
		}
	}
	// A message shorter than a header ends the connection, counted; so
	// does one longer than any query, before it is read.
	c.Write([]byte{0, 3, 1, 2, 3})
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Error("connection still open after garbage")
	}
	c = f.StreamConn(netip.MustParseAddr("100.64.0.9"))
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte{0xff, 0xff})
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Error("connection still open after a 64 KiB length")
	}
	if f.Stats().Malformed != 2 {
		t.Errorf("malformed %d, want 2", f.Stats().Malformed)
	}
}

func TestServers(t *testing.T) {
	got := parseResolvConf([]byte("# comment\nnameserver 127.0.0.53\nsearch lan\nnameserver fe80::1%eth0\nnameserver bogus\n options edns0\nnameserver 192.168.1.1\n"))
	want := []string{"127.0.0.53:53", "[fe80::1%eth0]:53", "192.168.1.1:53"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("resolv.conf: %v, want %v", got, want)
	}
	for in, want := range map[string]string{"192.168.1.1": "192.168.1.1:53", "192.168.1.1:5353": "192.168.1.1:5353", "fd00::1": "[fd00::1]:53", "[fd00::1]:54": "[fd00::1]:54"} {
		if ap, err := ParseServer(in); err != nil || ap.String() != want {
			t.Errorf("ParseServer(%q) = %v %v, want %s", in, ap, err, want)
		}
	}
	for _, bad := range []string{"", "dns.lan", "1.2.3.4:0", "1.2.3.4:x"} {
		if _, err := ParseServer(bad); err == nil {
			t.Errorf("ParseServer(%q) accepted", bad)
		}
	}
	if got := New(Config{ResolvConf: t.TempDir() + "/none", Log: testLogger(t)}).Servers(); fmt.Sprint(got) != "[127.0.0.1:53 [::1]:53]" {
		t.Errorf("no resolv.conf: %v", got)
	}
	// A resolv.conf is read again when it changes.
	path := t.TempDir() + "/resolv.conf"
	os.WriteFile(path, []byte("nameserver 192.0.2.1\n"), 0o644)
	f := New(Config{ResolvConf: path, Log: testLogger(t)})
	os.WriteFile(path, []byte("nameserver 192.0.2.2\nnameserver 192.0.2.3\n"), 0o644)
	os.Chtimes(path, time.Now().Add(time.Minute), time.Now().Add(time.Minute))
	f.up.checked = time.Now().Add(-resolvConfCheck)
	if got := fmt.Sprint(f.Servers()); got != "[192.0.2.2:53 192.0.2.3:53]" {
		t.Errorf("after the change: %v", got)
	}
}

// TestForwardCoalesces: queries for one question that arrive while it is
// being asked wait for that exchange: the resolver is asked once, each
// client gets its own ID back; the one over TCP is asked for itself.
func TestForwardCoalesces(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, 2*time.Second)
	const n = 10
	var wg sync.WaitGroup
	got := make([]*dnsmessage.Message, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			b := f.Answer(context.Background(), testQuery{id: uint16(500 + i), name: "delay.office.lan.", typ: dnsmessage.TypeA}.pack(t), i == 0)
			var m dnsmessage.Message
			if b != nil && m.Unpack(b) == nil {
				got[i] = &m
			}
		}()
	}
	wg.Wait()
	for i, m := range got {
		if m == nil || m.ID != uint16(500+i) || m.RCode != dnsmessage.RCodeNameError {
			t.Errorf("query %d: %+v", i, m)
		}
	}
	st := f.Stats()
	// UDP: one asks, the 8 others arriving within its 300 ms wait for it
	// (or, late, find it in the cache); TCP: asked once for itself.
	if q := u.queries.Load(); q != 2 || st.Coalesced+st.CacheHits != n-2 || st.Coalesced == 0 {
		t.Errorf("upstream asked %d times (want 2), %d coalesced, %d cache hits", q, st.Coalesced, st.CacheHits)
	}
}

// A client's UDP flow that does not read its answers holds at most 64 of
// them; the rest are dropped and counted.
func TestUnreadAnswersCounted(t *testing.T) {
	u := startFakeUpstream(t)
	f := newTestForwarder(t, u, 2*time.Second)
	c := f.PacketConn(netip.AddrFrom4([4]byte{100, 64, 0, 10}))
	defer c.Close()
	q := testQuery{id: 3, name: "nas.office.lan.", typ: dnsmessage.TypeA}.pack(t)
	const sent = 100
	for i := 0; i < sent; i += MaxInflightPerClient / 2 {
		for range min(MaxInflightPerClient/2, sent-i) {
			c.Write(q)
		}
		deadline := time.Now().Add(5 * time.Second)
		for len(f.inflight) > 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
	}
	st := f.Stats()
	if st.ClientLimited != 0 || st.Unread != sent-64 {
		t.Fatalf("unread answers dropped %d (want %d), client-limited %d", st.Unread, sent-64, st.ClientLimited)
	}
}
