package netstack

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/packet"
)

// egFakeSender stands in for an echo socket: it records what would have
// gone on the wire and never sends, so no reply comes unless a test makes one.
type egFakeSender struct {
	mu   sync.Mutex
	msgs [][]byte
	dsts []netip.Addr
	err  error
}

func (f *egFakeSender) send(msg []byte, dst netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return f.err
	}
	f.msgs = append(f.msgs, append([]byte(nil), msg...))
	f.dsts = append(f.dsts, dst)
	return nil
}

func (f *egFakeSender) sent() [][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.msgs
}

// egFakeEchoes gives eg's IPv4 echoer a raw socket that does not send.
func egFakeEchoes(eg *Egress) (*egEchoSock, *egFakeSender) {
	f := &egFakeSender{}
	s := &egEchoSock{w: f, raw: true, id: 0x4e4c}
	eg.echoers[0].mu.Lock()
	eg.echoers[0].sock = s
	eg.echoers[0].mu.Unlock()
	return s, f
}

// egReply makes the echo reply a host would send to the wire message req.
func egReply(req []byte) []byte {
	m := append([]byte(nil), req...)
	m[0], m[2], m[3] = egICMPv4EchoReply, 0, 0
	binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, 0))
	return m
}

func (ech *egEchoer) outstanding() int {
	ech.mu.Lock()
	defer ech.mu.Unlock()
	return len(ech.pending)
}

// Two clients send the very same echo (id, seq, payload, target): each gets
// a wire seq of its own, and a reply goes to the client whose echo it
// answers, once; replies that differ in anything that identifies the echo
// are not delivered.
func TestEgressEchoReplyMatching(t *testing.T) {
	eg, cp := egNewCaptureEgress(t, EgressConfig{})
	s, f := egFakeEchoes(eg)
	ech := &eg.echoers[0]
	target := netip.MustParseAddr("192.0.2.7") // never reached: the fake sender sends nothing
	payload := []byte("nlvpn-ping-payload")
	eg.Inject(egEchoRequestPacket(egClientV4, target, 7, 1, payload))
	eg.Inject(egEchoRequestPacket(egClientB, target, 7, 1, payload))
	sent := f.sent()
	if len(sent) != 2 || ech.outstanding() != 2 {
		t.Fatalf("sent %d, outstanding %d; want 2 and 2", len(sent), ech.outstanding())
	}
	a, b := sent[0], sent[1]
	if binary.BigEndian.Uint16(a[6:8]) == binary.BigEndian.Uint16(b[6:8]) {
		t.Fatal("both echoes went out with the same wire seq")
	}
	if binary.BigEndian.Uint16(a[4:6]) != s.id || packet.Sum(a, 0) != 0xffff {
		t.Fatalf("wire message %x: want id %x and a valid checksum", a, s.id)
	}

	other := &egEchoSock{w: f, raw: true, id: s.id}
	bad := map[string]struct {
		sock *egEchoSock
		m    []byte
		from netip.Addr
	}{
		"another payload": {s, func() []byte { m := egReply(a); m[len(m)-1] ^= 1; return egReply2(m) }(), target},
		"longer payload":  {s, egReply2(append(egReply(a), 'x')), target},
		"shorter payload": {s, egReply2(egReply(a)[:len(a)-1]), target},
		"another source":  {s, egReply(a), netip.MustParseAddr("192.0.2.8")},
		"another id":      {s, func() []byte { m := egReply(a); m[4] ^= 1; return egReply2(m) }(), target},
		"unknown seq":     {s, func() []byte { m := egReply(a); m[6] ^= 0x80; return egReply2(m) }(), target},
		"bad checksum":    {s, func() []byte { m := egReply(a); m[2] ^= 1; return m }(), target},
		"not a reply":     {s, a, target},
		"another socket":  {other, egReply(a), target},
		"truncated":       {s, egReply(a)[:7], target},
	}
	for name, c := range bad {
		if p := ech.match(c.sock, c.m, c.from); p != nil {
			t.Fatalf("%s: matched the echo of %v", name, p.client)
		}
	}
	if ech.outstanding() != 2 {
		t.Fatalf("outstanding %d after non-matching replies, want 2", ech.outstanding())
	}

	p := ech.match(s, egReply(a), target)
	if p == nil || p.client != egClientV4 {
		t.Fatalf("the reply to the first client's echo matched %+v", p)
	}
	eg.deliverEcho(p)
	select {
	case pkt := <-cp.ch:
		egCheckEchoReply(t, pkt, target, egClientV4, 7, 1, payload)
	case <-time.After(5 * time.Second):
		t.Fatal("no reply delivered")
	}
	if p := ech.match(s, egReply(a), target); p != nil {
		t.Fatal("a duplicate reply matched again")
	}
	if ech.outstanding() != 1 {
		t.Fatalf("outstanding %d, want 1 (the second client's)", ech.outstanding())
	}
	if p := ech.match(s, egReply(b), target); p == nil || p.client != egClientB {
		t.Fatalf("the reply to the second client's echo matched %+v", p)
	}
	if st := eg.Stats(); st.ICMPEchoes != 2 || st.EchoReplies != 1 {
		t.Fatalf("stats %+v", st)
	}
}

// egReply2 fixes the checksum of a reply a test changed.
func egReply2(m []byte) []byte {
	m[2], m[3] = 0, 0
	binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, 0))
	return m
}

// An echo that gets no reply is counted as a timeout and gives back its
// slot and the client's share; a reply after that is not delivered.
func TestEgressEchoTimeout(t *testing.T) {
	eg, cp := egNewCaptureEgress(t, EgressConfig{EchoTimeout: 20 * time.Millisecond})
	s, f := egFakeEchoes(eg)
	target := netip.MustParseAddr("192.0.2.7")
	eg.Inject(egEchoRequestPacket(egClientV4, target, 7, 1, []byte("x")))
	egWaitFor(t, "the echo timed out", func() bool { return eg.Stats().EchoTimeouts == 1 })
	if n := eg.echoers[0].outstanding(); n != 0 || len(eg.echoSlots) != 0 || len(eg.Clients()) != 0 {
		t.Fatalf("after the timeout: %d outstanding, %d slots taken, clients %+v", n, len(eg.echoSlots), eg.Clients())
	}
	if p := eg.echoers[0].match(s, egReply(f.sent()[0]), target); p != nil {
		t.Fatal("a reply after the timeout matched")
	}
	select {
	case pkt := <-cp.ch:
		t.Fatalf("a timed-out echo was answered: %x", pkt)
	default:
	}
	if st := eg.Stats(); st.ICMPEchoes != 1 || st.EchoReplies != 0 || st.EchoDropped != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// Outstanding echoes are bounded per client and in total (MaxEchoes); what
// is beyond is dropped and counted, and the table never grows past it.
func TestEgressEchoOutstandingBounded(t *testing.T) {
	eg, _ := egNewCaptureEgress(t, EgressConfig{MaxEchoes: 4, Limits: EgressLimits{EchoesPerClient: 3}})
	egFakeEchoes(eg)
	target := netip.MustParseAddr("192.0.2.7")
	for seq := range uint16(5) {
		eg.Inject(egEchoRequestPacket(egClientV4, target, 7, seq, []byte("a")))
	}
	for seq := range uint16(2) {
		eg.Inject(egEchoRequestPacket(egClientB, target, 7, seq, []byte("b")))
	}
	st := eg.Stats()
	if n := eg.echoers[0].outstanding(); n != 4 {
		t.Fatalf("%d outstanding, want 4 (MaxEchoes)", n)
	}
	if st.ICMPEchoes != 4 || st.EchoDropped != 3 || st.Limited["icmp_echoes"] != 2 {
		t.Fatalf("stats %+v: want 4 sent, 3 dropped, 2 of them over the first client's share", st)
	}
}

// MaxEchoes is capped so that a free 16-bit wire seq always exists.
func TestEgressEchoMaxCapped(t *testing.T) {
	eg, _ := egNewCaptureEgress(t, EgressConfig{MaxEchoes: 1 << 20})
	if cap(eg.echoSlots) != egEchoMaxOutstanding {
		t.Fatalf("MaxEchoes %d, want it capped at %d", cap(eg.echoSlots), egEchoMaxOutstanding)
	}
	// The seq allocator skips seqs in use, across the wrap.
	_, f := egFakeEchoes(eg)
	ech := &eg.echoers[0]
	ech.mu.Lock()
	ech.nextSeq = 0xfffe
	ech.pending = map[uint16]*egPendingEcho{0xffff: {timer: time.NewTimer(time.Hour)}, 0: {timer: time.NewTimer(time.Hour)}}
	ech.mu.Unlock()
	eg.Inject(egEchoRequestPacket(egClientV4, netip.MustParseAddr("192.0.2.7"), 7, 1, []byte("x")))
	if got := binary.BigEndian.Uint16(f.sent()[0][6:8]); got != 1 {
		t.Fatalf("wire seq %d, want 1 (0xffff and 0 are taken)", got)
	}
}

// A failed send is counted and gives everything back.
func TestEgressEchoSendFails(t *testing.T) {
	eg, _ := egNewCaptureEgress(t, EgressConfig{})
	_, f := egFakeEchoes(eg)
	f.err = errors.New("no route")
	eg.Inject(egEchoRequestPacket(egClientV4, netip.MustParseAddr("192.0.2.7"), 7, 1, []byte("x")))
	if st := eg.Stats(); st.EchoDropped != 1 || st.ICMPEchoes != 0 {
		t.Fatalf("stats %+v", st)
	}
	if n := eg.echoers[0].outstanding(); n != 0 || len(eg.echoSlots) != 0 || len(eg.Clients()) != 0 {
		t.Fatalf("after a failed send: %d outstanding, %d slots taken, clients %+v", n, len(eg.echoSlots), eg.Clients())
	}
}

// Submit answers an echo request itself (no hand-off to the stack's
// goroutine) and gives the packet back to its owner.
func TestEgressSubmitEcho(t *testing.T) {
	var released atomic.Int32
	eg, cp := egNewCaptureEgress(t, EgressConfig{Release: func([]byte) { released.Add(1) }})
	_, f := egFakeEchoes(eg)
	target := netip.MustParseAddr("192.0.2.7")
	payload := []byte("submitted")
	if !eg.Submit(egEchoRequestPacket(egClientV4, target, 9, 4, payload)) {
		t.Fatal("Submit refused an echo request")
	}
	sent := f.sent()
	if len(sent) != 1 || released.Load() != 1 {
		t.Fatalf("on Submit's return: %d sent, %d released; want 1 and 1", len(sent), released.Load())
	}
	p := eg.echoers[0].match(eg.echoers[0].sock, egReply(sent[0]), target)
	if p == nil {
		t.Fatal("the reply did not match")
	}
	eg.deliverEcho(p)
	egCheckEchoReply(t, <-cp.ch, target, egClientV4, 9, 4, payload)
	if st := eg.Stats(); st.Injected != 1 || st.EchoReplies != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestIsEchoRequest(t *testing.T) {
	for _, c := range []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"v4", egEchoRequestPacket(egClientV4, egLoV4, 1, 1, []byte("x")), true},
		{"v6", egEchoRequestPacket(egClientV6, egLoV6, 1, 1, []byte("x")), true},
		{"v4 reply", egBuildEchoReply(egEchoRequest{src: egClientV4, dst: egLoV4}, []byte("x")), false},
		{"v6 reply", egBuildEchoReply(egEchoRequest{v6: true, src: egClientV6, dst: egLoV6}, []byte("x")), false},
		{"short", []byte{0x45, 0, 0}, false},
		{"empty", nil, false},
	} {
		if got := isEchoRequest(c.pkt); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
