package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestMessageRoundTrip(t *testing.T) {
	msgs := []*Message{
		{Type: TypeHello, Hello: &Hello{Token: "nlv1.x.y", Advertise: []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24")}}},
		{Type: TypeWelcome, Welcome: &Welcome{Name: "miranda", Role: "agent", Overlay: netip.MustParseAddr("100.64.0.2"), Observed: netip.MustParseAddrPort("198.18.3.2:5000")}},
		{Type: TypeError, ID: 7, Error: &Error{Code: CodeUnknownAgent, Message: `no agent named "x"`}},
		{Type: TypeConnect, ID: 1, Connect: &Connect{Agent: "miranda", Resume: 42}},
		{Type: TypeSession, ID: 1, Session: &Session{ID: 42, PeerName: "alice", PeerKey: "ed25519:AA", PeerAddr: netip.MustParseAddr("100.64.0.3")}},
		{Type: TypeSession, ID: 2, Session: &Session{ID: 43, PeerName: "bob", PeerKey: "ed25519:AB", PeerAddr: netip.MustParseAddr("100.64.0.4"), PeerObserved: netip.MustParseAddrPort("198.18.3.9:41000")}},
		{Type: TypeAccept, Accept: &Accept{ID: 42}},
		{Type: TypeRevoked, Revoked: &Revoked{IDs: []uint64{7, 9}}},
		{Type: TypeMoved, Moved: &Moved{ID: 42, Addr: netip.MustParseAddrPort("198.18.3.9:61007")}},
		{Type: TypeAgents, ID: 3, Agents: &Agents{}},
		{Type: TypePing, ID: 4},
		{Type: TypeError, ID: 5, Error: &Error{Code: CodeAgentElsewhere, Message: "agent miranda is on another gateway", Gateway: "198.18.2.2:4433"}},
		{Type: TypeAgents, ID: 3, Agents: &Agents{Agents: []AgentInfo{
			{Name: "miranda", Online: true, Advertise: []netip.Prefix{netip.MustParsePrefix("192.168.77.0/24")}},
			{Name: "prospero", LastSeen: 1795000000},
		}}},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		if err := WriteMessage(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range msgs {
		got, err := ReadMessage(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("got %+v, want %+v", got, want)
		}
	}
	if _, err := ReadMessage(&buf); err != io.EOF {
		t.Fatalf("after last message: %v, want EOF", err)
	}
}

func frameOf(body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(body)))
	return append(b, body...)
}

func TestReadMessageRejects(t *testing.T) {
	huge := binary.BigEndian.AppendUint32(nil, MaxMessageSize+1)
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"oversize length", huge, "too large"},
		{"truncated body", frameOf(`{"type":"hello"}`)[:10], "truncated"},
		{"not json", frameOf("hello"), "bad control message"},
		{"unknown type", frameOf(`{"type":"reboot"}`), "unknown type"},
		{"missing body", frameOf(`{"type":"hello"}`), "without its body"},
		{"revoked without ids", frameOf(`{"type":"revoked"}`), "without its body"},
		{"moved without its body", frameOf(`{"type":"moved"}`), "without its body"},
		{"moved without session", frameOf(`{"type":"moved","moved":{"addr":"198.18.3.9:61007"}}`), "without a session"},
		{"moved without address", frameOf(`{"type":"moved","moved":{"id":7}}`), "without a session or an address"},
		{"agents without its body", frameOf(`{"type":"agents"}`), "without its body"},
		{"peer info with a bad DNS domain", frameOf(`{"type":"peer_info","peer":{"name":"m","overlay":"100.64.0.2","advertise":[],"dns_domains":["office.lan; rm -rf"]}}`), "not a valid name"},
		{"moved with another body", frameOf(`{"type":"moved","moved":{"id":7,"addr":"198.18.3.9:1"},"gone":{"id":7}}`), "2 bodies"},
		{"ping with a body", frameOf(`{"type":"ping","id":1,"gone":{"id":7}}`), "1 bodies"},
		{"two bodies", frameOf(`{"type":"hello","hello":{"token":"x"},"accept":{"id":1}}`), "2 bodies"},
		{"unknown field", frameOf(`{"type":"accept","accept":{"id":1},"x":1}`), "unknown field"},
		{"trailing", frameOf(`{"type":"accept","accept":{"id":1}}{}`), "trailing"},
		{"bad address", frameOf(`{"type":"welcome","welcome":{"overlay":"999.1.1.1"}}`), "bad control message"},
		{"too many features", frameOf(`{"type":"welcome","welcome":{"features":["x"` + strings.Repeat(`,"x"`, MaxFeatures) + `]}}`), "33 features, more than 32"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ReadMessage(bytes.NewReader(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want containing %q", err, tt.want)
			}
		})
	}
	if _, err := ReadMessage(bytes.NewReader(huge)); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("oversize: %v is not ErrTooLarge", err)
	}
}

func TestFrames(t *testing.T) {
	b := AppendFrameHeader(nil, FrameRelay, 0xdeadbeef01)
	b = append(b, "payload"...)
	kind, id, p, err := ParseFrame(b)
	if err != nil || kind != FrameRelay || id != 0xdeadbeef01 || string(p) != "payload" {
		t.Fatalf("ParseFrame = %v %x %q %v", kind, id, p, err)
	}
	if b[0]&0x40 != 0 {
		t.Fatal("frame kind has the QUIC fixed bit set")
	}
	for _, bad := range [][]byte{nil, {1, 2, 3}, AppendFrameHeader(nil, 0x40, 1), AppendFrameHeader(nil, FrameRelay, 0)} {
		if _, _, _, err := ParseFrame(bad); err == nil {
			t.Errorf("ParseFrame(%x) accepted", bad)
		}
	}
}

func FuzzReadMessage(f *testing.F) {
	f.Add(frameOf(`{"type":"connect","id":1,"connect":{"agent":"miranda"}}`))
	f.Add(frameOf(`{"type":"session","session":{"id":1,"peer_overlay":"100.64.0.2","advertise":["10.0.0.0/8"]}}`))
	f.Add(frameOf(`{"type":"agents","id":2,"agents":{"agents":[{"name":"miranda","online":true,"advertise":["192.168.1.0/24"]}]}}`))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(frameOf(`{"type":"connect","id":2,"connect":{"agent":"miranda","udp_size":1252}}`))
	f.Add(frameOf(`{"type":"accept","id":3,"accept":{"id":7,"udp_size":-1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ReadMessage(bytes.NewReader(b))
		if err != nil {
			return
		}
		// Anything accepted must survive a round trip.
		var buf bytes.Buffer
		if err := WriteMessage(&buf, m); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadMessage(&buf); err != nil {
			t.Fatalf("re-read of accepted message failed: %v", err)
		}
	})
}

func FuzzParseFrame(f *testing.F) {
	f.Add(AppendFrameHeader(nil, FrameDirect, 9))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, id, p, err := ParseFrame(b)
		if err != nil {
			return
		}
		if id == 0 || len(p) != len(b)-FrameHeaderLen || kind&0x40 != 0 {
			t.Fatalf("bad parse of %x", b)
		}
	})
}

// A session offer without the observed address encodes as before (a
// receiver of the same version that does not know the field, reading with
// DisallowUnknownFields, still accepts it), and one from a gateway that
// does not send it decodes to the zero address.
func TestSessionPeerObservedOptional(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteMessage(&buf, &Message{Type: TypeSession, Session: &Session{ID: 1, PeerAddr: netip.MustParseAddr("100.64.0.3")}}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "peer_observed") {
		t.Fatalf("an unset observed address is on the wire: %s", buf.Bytes()[4:])
	}
	m, err := ReadMessage(bytes.NewReader(frameOf(`{"type":"session","session":{"id":1,"peer_name":"a","peer_credential":"","peer_key":"k","peer_overlay":"100.64.0.3"}}`)))
	if err != nil {
		t.Fatal(err)
	}
	if m.Session.PeerObserved.IsValid() {
		t.Fatalf("observed %v from an offer without one", m.Session.PeerObserved)
	}
}

func TestValidDomain(t *testing.T) {
	for _, tt := range []struct {
		s  string
		ok bool
	}{
		{"office.lan", true}, {"lan", true}, {"a-b.c0.example", true}, {"1.168.192.in-addr.arpa", true},
		{"", false}, {"office.lan.", false}, {".lan", false}, {"a..b", false}, {"-a.lan", false}, {"a-.lan", false},
		{"Office.lan", false}, {"office_lan", false}, {"office lan", false}, {"~office.lan", false},
		{strings.Repeat("a", 63) + ".lan", true}, {strings.Repeat("a", 64) + ".lan", false},
		{strings.Repeat("abcdefghi.", 25) + "lan", true}, {strings.Repeat("abcdefghi.", 25) + "lanx", false},
	} {
		if got := ValidDomain(tt.s); got != tt.ok {
			t.Errorf("ValidDomain(%q) = %v, want %v", tt.s, got, tt.ok)
		}
	}
}

func TestOverlay6(t *testing.T) {
	a := netip.MustParseAddr("100.64.0.3")
	a6 := Overlay6(a)
	if a6 != netip.MustParseAddr("fd6e:6c76:706e::6440:3") || !OverlayPrefix6.Contains(a6) {
		t.Fatalf("Overlay6(%v) = %v", a, a6)
	}
	if OverlayOwner(a6) != a || OverlayOwner(a) != a {
		t.Fatalf("OverlayOwner(%v) = %v", a6, OverlayOwner(a6))
	}
	for _, other := range []string{"192.168.1.5", "fd00:77::10", "fd6e:6c76:706e::c0a8:105", "::ffff:100.64.0.3"} {
		o := netip.MustParseAddr(other)
		if got := OverlayOwner(o); got != o.Unmap() {
			t.Errorf("OverlayOwner(%v) = %v, want it unchanged", o, got)
		}
	}
	if Overlay6(netip.MustParseAddr("10.0.0.1")).IsValid() || Overlay6(netip.MustParseAddr("fd00::1")).IsValid() {
		t.Error("Overlay6 of a non-overlay address")
	}
}

// A node's UDP size travels in its session request and answer and the
// gateway's offers (the embedded Punch); a full-size node says nothing, so
// its messages are what they were before the field.
func TestUDPSizeOnTheWire(t *testing.T) {
	for _, m := range []*Message{
		{Type: TypeConnect, ID: 1, Connect: &Connect{Agent: "miranda", Punch: Punch{UDPSize: 1252}}},
		{Type: TypeAccept, ID: 2, Accept: &Accept{ID: 9, Punch: Punch{UDPSize: 1300}}},
		{Type: TypeSession, ID: 3, Session: &Session{ID: 9, Punch: Punch{UDPSize: 1252}}},
	} {
		var buf bytes.Buffer
		if err := WriteMessage(&buf, m); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(buf.String(), `"udp_size":`) {
			t.Fatalf("%s: no udp_size on the wire: %s", m.Type, buf.Bytes()[4:])
		}
		got, err := ReadMessage(&buf)
		if err != nil {
			t.Fatal(err)
		}
		var in, out int
		switch m.Type {
		case TypeConnect:
			in, out = m.Connect.UDPSize, got.Connect.UDPSize
		case TypeAccept:
			in, out = m.Accept.UDPSize, got.Accept.UDPSize
		case TypeSession:
			in, out = m.Session.UDPSize, got.Session.UDPSize
		}
		if in != out {
			t.Fatalf("%s: udp_size %d came back as %d", m.Type, in, out)
		}
	}
	var buf bytes.Buffer
	if err := WriteMessage(&buf, &Message{Type: TypeConnect, ID: 1, Connect: &Connect{Agent: "miranda"}}); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "udp_size") {
		t.Fatalf("a full-size node's request names udp_size: %s", buf.Bytes()[4:])
	}
}
