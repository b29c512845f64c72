package netstack

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func dnsTestServer(t *testing.T) (*DNSServer, string) {
	t.Helper()
	srv := NewDNSServer(pxTestResolver(pxFakeUpstream(t)), egTestLogger(t))
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(pc) }()
	t.Cleanup(func() {
		pc.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return srv, pc.LocalAddr().String()
}

func TestServeDNS(t *testing.T) {
	srv, addr := dnsTestServer(t)
	r := pxTestResolver(addr) // a stub resolver asking our server
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	got, err := r.LookupNetIP(ctx, "ip", pxLanName)
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("lookup %s: %v %v", pxLanName, got, err)
	}
	_, err = r.LookupNetIP(ctx, "ip4", "nosuch.test")
	var de *net.DNSError
	if !errors.As(err, &de) || !de.IsNotFound {
		t.Fatalf("lookup nosuch.test: %v", err)
	}

	// Malformed datagrams are dropped and counted; the server keeps going.
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, b := range [][]byte{{1}, {0, 1, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0}, make([]byte, 12)} {
		c.Write(b)
	}
	egWaitFor(t, "malformed counted", func() bool { return srv.Stats().Malformed == 3 })

	// Other types: NOTIMP.
	q := dnsTestQuery(t, 7, pxLanName+".", dnsmessage.TypeMX)
	c.Write(q)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil || m.ID != 7 || m.RCode != dnsmessage.RCodeNotImplemented {
		t.Fatalf("MX answer %+v %v", m.Header, err)
	}
	st := srv.Stats()
	if st.Answered == 0 || st.NXDomain == 0 || st.NotImpl != 1 {
		t.Fatalf("stats %+v", st)
	}
}

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

func TestDNSAnswerCodes(t *testing.T) {
	lookup := func(network, name string) ([]netip.Addr, error) {
		switch name {
		case "v4only.test":
			if network == "ip4" {
				return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil
			}
			return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
		case "many.test":
			var out []netip.Addr
			for i := 0; i < 50; i++ {
				out = append(out, netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), netip.AddrFrom16([16]byte{15: byte(i), 0: 0xfd}))
			}
			return out, nil
		case "broken.test":
			return nil, &net.DNSError{Err: "server misbehaving", Name: name, IsTemporary: true}
		}
		return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
	}
	cases := []struct {
		name    string
		typ     dnsmessage.Type
		rcode   dnsmessage.RCode
		answers int
	}{
		{"v4only.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},
		{"v4only.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 0}, // NODATA, not NXDOMAIN
		{"nosuch.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},
		{"broken.test.", dnsmessage.TypeA, dnsmessage.RCodeServerFailure, 0},
		{"many.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, dnsMaxAnswers},
		{"many.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, dnsMaxAnswers},
		{"many.test.", dnsmessage.TypeTXT, dnsmessage.RCodeNotImplemented, 0},
	}
	for _, tc := range cases {
		resp, v := dnsAnswer(dnsTestQuery(t, 42, tc.name, tc.typ), lookup)
		if v == dnsVerdictMalformed {
			t.Fatalf("%s %v: malformed", tc.name, tc.typ)
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatal(err)
		}
		if m.ID != 42 || !m.Response || m.RCode != tc.rcode || len(m.Answers) != tc.answers || len(resp) > dnsMaxMsg {
			t.Fatalf("%s %v: %+v, %d answers, %d bytes", tc.name, tc.typ, m.Header, len(m.Answers), len(resp))
		}
	}
}

// TestDNSDialer: the agent hook answers through an in-memory conn, the way
// the Egress would use it.
func TestDNSDialer(t *testing.T) {
	srv := NewDNSServer(pxTestResolver(pxFakeUpstream(t)), egTestLogger(t))
	dnsAddr := netip.MustParseAddrPort("100.64.0.1:53")
	dial := DNSDialer(dnsAddr, srv, func(context.Context, string, string) (net.Conn, error) {
		return nil, errors.New("next called")
	})
	c, err := dial(context.Background(), "udp", dnsAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write(dnsTestQuery(t, 9, pxLanName+".", dnsmessage.TypeA))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	addrs, _, rcode, ok := dnsParseAnswer(buf[:n], 9, dnsmessage.MustNewName(pxLanName+"."), dnsmessage.TypeA)
	if !ok || rcode != dnsmessage.RCodeSuccess || len(addrs) != 1 || addrs[0] != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("answer %v %v %v", addrs, rcode, ok)
	}
	// Read deadline: a timeout error, not a hang.
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	var ne net.Error
	if _, err := c.Read(buf); !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past deadline: %v", err)
	}
	if _, err := dial(context.Background(), "tcp", dnsAddr.String()); err == nil || err.Error() != "next called" {
		t.Fatalf("tcp dial: %v", err)
	}
}

// FuzzDNSAnswer: arbitrary datagrams never crash the server, and whatever
// it answers is a well-formed response to the same ID within 512 bytes.
func FuzzDNSAnswer(f *testing.F) {
	f.Add(dnsTestQuery(f, 1, "lanhost.test.", dnsmessage.TypeA))
	f.Add(dnsTestQuery(f, 2, "x.", dnsmessage.TypeAAAA))
	f.Add(dnsTestQuery(f, 3, "nosuch.test.", dnsmessage.TypeMX))
	f.Add([]byte{0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1})
	lookup := func(network, name string) ([]netip.Addr, error) {
		if len(name)%3 == 0 {
			return nil, &net.DNSError{Err: "no such host", IsNotFound: true}
		}
		if len(name)%3 == 1 {
			return nil, errors.New("boom")
		}
		return []netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::1")}, nil
	}
	f.Fuzz(func(t *testing.T, q []byte) {
		resp, v := dnsAnswer(q, lookup)
		if v == dnsVerdictMalformed {
			if resp != nil {
				t.Fatal("malformed but answered")
			}
			return
		}
		var m dnsmessage.Message
		if err := m.Unpack(resp); err != nil {
			t.Fatalf("unparsable answer: %v", err)
		}
		if !m.Response || m.ID != uint16(q[0])<<8|uint16(q[1]) || len(resp) > dnsMaxMsg {
			t.Fatalf("bad answer %+v (%d bytes)", m.Header, len(resp))
		}
	})
}

// FuzzDNSParseAnswer: the client's answer parser never crashes on garbage.
func FuzzDNSParseAnswer(f *testing.F) {
	name := dnsmessage.MustNewName("lanhost.test.")
	resp, _ := dnsAnswer(dnsTestQuery(f, 5, "lanhost.test.", dnsmessage.TypeA), func(string, string) ([]netip.Addr, error) {
		return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
	})
	f.Add(resp)
	f.Add([]byte{0, 5, 0x80, 0, 0, 1, 0, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		addrs, _, rcode, ok := dnsParseAnswer(b, 5, name, dnsmessage.TypeA)
		if ok && rcode == dnsmessage.RCodeSuccess && len(addrs) == 0 {
			t.Fatal("success without addresses")
		}
	})
}
