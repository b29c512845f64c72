package dnsfwd

import (
	"time"

	"testing"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/nlvpn/nlvpn/lab/labdns"
)

// FuzzForwarderMessages feeds a client's query and a resolver's reply
// from the network through everything that parses or rebuilds them: the
// query check, the reply check, the cache, and the client's copy. Nothing
// may panic; what goes back must be a well-formed answer with the client's
// ID within the client's UDP size.
func FuzzForwarderMessages(f *testing.F) {
	zone := labdns.Office(lanHost)
	for _, q := range []testQuery{
		{id: 1, name: "_ldap._tcp.office.lan.", typ: dnsmessage.TypeSRV},
		{id: 2, name: "www.office.lan.", typ: dnsmessage.TypeA, edns: 1232},
		{id: 3, name: "big.office.lan.", typ: dnsmessage.TypeTXT},
		{id: 4, name: "nosuch.office.lan.", typ: dnsmessage.TypeMX, edns: 4096},
	} {
		b := q.pack(f)
		f.Add(b, zone.Answer(b, true))
	}
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0}, []byte{0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0})
	fw := &Forwarder{log: testLogger(f), cache: newCache()}
	f.Fuzz(func(t *testing.T, qb, rb []byte) {
		q, err := parseQuery(qb)
		if err != nil {
			return
		}
		var id uint16
		if len(rb) >= 2 {
			id = uint16(rb[0])<<8 | uint16(rb[1])
		}
		m, ok := parseReply(rb, id, q.question())
		if !ok {
			m = errorReply(q, dnsmessage.RCodeServerFailure)
		}
		now := time.Now()
		key := cacheKeyOf(q)
		fw.cache.put(key, m, now)
		if c, ok := fw.cache.get(key, now); ok {
			m = c
		}
		for _, tcp := range []bool{false, true} {
			limit := 65535
			if !tcp {
				limit = q.udpSize
			}
			out := fw.finish(q, m, limit, false)
			if out == nil {
				t.Fatalf("no answer (tcp %v)", tcp)
			}
			if len(out) > limit {
				t.Fatalf("%d bytes for a limit of %d", len(out), limit)
			}
			var a dnsmessage.Message
			if err := a.Unpack(out); err != nil || a.ID != q.msg.ID || !a.Response || len(a.Questions) != 1 {
				t.Fatalf("answer %+v: %v", a.Header, err)
			}
		}
	})
}
