package labdns

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func query(t testing.TB, name string, typ dnsmessage.Type) []byte {
	m := dnsmessage.Message{Header: dnsmessage.Header{ID: 7},
		Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}}}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOffice: the answers the e2e test and the forwarder's tests rely on.
func TestOffice(t *testing.T) {
	z := Office(netip.MustParseAddr("192.168.77.10"))
	for _, tc := range []struct {
		name    string
		typ     dnsmessage.Type
		tcp     bool
		rcode   dnsmessage.RCode
		tc      bool
		answers int
		soa     bool
	}{
		{"www.office.lan.", dnsmessage.TypeA, false, dnsmessage.RCodeSuccess, false, 3, false},
		{"_ldap._tcp.office.lan.", dnsmessage.TypeSRV, false, dnsmessage.RCodeSuccess, false, 1, false},
		{"10.77.168.192.in-addr.arpa.", dnsmessage.TypePTR, false, dnsmessage.RCodeSuccess, false, 1, false},
		{"_tcp.office.lan.", dnsmessage.TypeSRV, false, dnsmessage.RCodeSuccess, false, 0, true}, // empty non-terminal: NODATA
		{"nas.office.lan.", dnsmessage.TypeAAAA, false, dnsmessage.RCodeSuccess, false, 0, true},
		{"nosuch.office.lan.", dnsmessage.TypeA, false, dnsmessage.RCodeNameError, false, 0, true},
		{"example.com.", dnsmessage.TypeA, false, dnsmessage.RCodeRefused, false, 0, false},
		{"big.office.lan.", dnsmessage.TypeTXT, false, dnsmessage.RCodeSuccess, true, 0, false},
		{"big.office.lan.", dnsmessage.TypeTXT, true, dnsmessage.RCodeSuccess, false, 1, false},
	} {
		var m dnsmessage.Message
		if err := m.Unpack(z.Answer(query(t, tc.name, tc.typ), tc.tcp)); err != nil {
			t.Fatalf("%s %v: %v", tc.name, tc.typ, err)
		}
		soa := len(m.Authorities) == 1 && m.Authorities[0].Header.Type == dnsmessage.TypeSOA
		if m.ID != 7 || m.RCode != tc.rcode || m.Truncated != tc.tc || len(m.Answers) != tc.answers || soa != tc.soa {
			t.Errorf("%s %v tcp %v: %+v, %d answers, SOA %v", tc.name, tc.typ, tc.tcp, m.Header, len(m.Answers), soa)
		}
	}
}

// FuzzZoneAnswer: whatever arrives, no panic, and an answer is a
// well-formed response within 512 bytes over UDP without EDNS.
func FuzzZoneAnswer(f *testing.F) {
	z := Office(netip.MustParseAddr("192.168.77.10"))
	f.Add(query(f, "www.office.lan.", dnsmessage.TypeA))
	f.Add(query(f, "big.office.lan.", dnsmessage.TypeTXT))
	f.Fuzz(func(t *testing.T, q []byte) {
		b := z.Answer(q, false)
		if b == nil {
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(b); err != nil || !m.Response {
			t.Fatalf("answer %x: %v", b, err)
		}
	})
}
