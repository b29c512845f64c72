package netstack

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func dnsTestQuery(t testing.TB, id uint16, name string, typ dnsmessage.Type) []byte {
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: id, RecursionDesired: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}},
	}
	b, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// dnsTestAnswer is a resolver's answer to query id for name: one A or
// AAAA record.
func dnsTestAnswer(t testing.TB, id uint16, name string, a netip.Addr) []byte {
	typ := dnsmessage.TypeA
	if a.Is6() {
		typ = dnsmessage.TypeAAAA
	}
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: id, Response: true},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}}}
	h := dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET, TTL: 60}
	if a.Is4() {
		m.Answers = []dnsmessage.Resource{{Header: h, Body: &dnsmessage.AResource{A: a.As4()}}}
	} else {
		m.Answers = []dnsmessage.Resource{{Header: h, Body: &dnsmessage.AAAAResource{AAAA: a.As16()}}}
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDNSParseAnswer: the proxy takes only an answer to its own question.
func TestDNSParseAnswer(t *testing.T) {
	name := dnsmessage.MustNewName("lanhost.test.")
	good := dnsTestAnswer(t, 5, "lanhost.test.", netip.MustParseAddr("127.0.0.1"))
	if addrs, _, rcode, ok := dnsParseAnswer(good, 5, name, dnsmessage.TypeA); !ok || rcode != dnsmessage.RCodeSuccess || len(addrs) != 1 {
		t.Errorf("good answer: %v %v %v", addrs, rcode, ok)
	}
	if _, _, _, ok := dnsParseAnswer(good, 6, name, dnsmessage.TypeA); ok {
		t.Error("another ID taken")
	}
	if _, _, _, ok := dnsParseAnswer(good, 5, dnsmessage.MustNewName("other.test."), dnsmessage.TypeA); ok {
		t.Error("another name taken")
	}
	if _, _, _, ok := dnsParseAnswer(good, 5, name, dnsmessage.TypeAAAA); ok {
		t.Error("another type taken")
	}
}

// FuzzDNSParseAnswer: the client's answer parser never crashes on garbage.
func FuzzDNSParseAnswer(f *testing.F) {
	name := dnsmessage.MustNewName("lanhost.test.")
	f.Add(dnsTestAnswer(f, 5, "lanhost.test.", netip.MustParseAddr("127.0.0.1")))
	f.Add(dnsTestAnswer(f, 5, "lanhost.test.", netip.MustParseAddr("fd00::1")))
	f.Add([]byte{0, 5, 0x80, 0, 0, 1, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		addrs, _, rcode, ok := dnsParseAnswer(b, 5, name, dnsmessage.TypeA)
		if ok && rcode == dnsmessage.RCodeSuccess && len(addrs) == 0 {
			t.Fatal("success without addresses")
		}
	})
}
