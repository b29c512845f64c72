package netstack

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/nlvpn/nlvpn/packet"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// All traffic in these tests goes to 127.0.0.1 or ::1 only. The client's
// overlay addresses exist only inside the two gVisor stacks.
var (
	egClientV4 = netip.MustParseAddr("100.64.0.2")
	egClientV6 = netip.MustParseAddr("fd7a:115c:a1e0::2")
	egClientB  = netip.MustParseAddr("100.64.0.3") // a second client, for the per-client bounds
	egLoV4     = netip.MustParseAddr("127.0.0.1")
	egLoV6     = netip.MustParseAddr("::1")
)

const egTestMTU = 1360

func egTestLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(egTestWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type egTestWriter struct{ t testing.TB }

func (w egTestWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// testNet wires a "client" gVisor stack to an Egress: the client's outbound
// packets go to Egress.Inject, Egress's out goes to the client's NIC.
type egTestNet struct {
	eg     *Egress
	client *stack.Stack
	// dropOut, if set, sees each packet the egress sends to the client
	// and drops it (a lossy path) when it returns true.
	dropOut atomic.Pointer[func(pkt []byte) bool]
}

func egNewTestNet(t testing.TB, cfg EgressConfig) *egTestNet {
	t.Helper()
	if cfg.MTU == 0 {
		cfg.MTU = egTestMTU
	}
	if cfg.Logger == nil {
		cfg.Logger = egTestLogger(t)
	}
	cs := stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocolWithOptions(ipv4.Options{AllowExternalLoopbackTraffic: true}),
			ipv6.NewProtocolWithOptions(ipv6.Options{AllowExternalLoopbackTraffic: true}),
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	link := channel.New(4096, uint32(cfg.MTU), "")
	if err := cs.CreateNIC(1, link); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{egClientV4, egClientV6, egClientB} {
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if err := cs.AddProtocolAddress(1, pa, stack.AddressProperties{}); err != nil {
			t.Fatal(err)
		}
	}
	cs.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: 1},
		{Destination: header.IPv6EmptySubnet, NIC: 1},
	})

	var oversize atomic.Int64
	n := &egTestNet{client: cs}
	eg, err := NewEgress(cfg, func(pkts [][]byte) {
		for _, pkt := range pkts {
			if len(pkt) > cfg.MTU {
				oversize.Add(1)
			}
			if drop := n.dropOut.Load(); drop != nil && (*drop)(pkt) {
				continue
			}
			proto := ipv4.ProtocolNumber
			if pkt[0]>>4 == 6 {
				proto = ipv6.ProtocolNumber
			}
			pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
			link.InjectInbound(proto, pb)
			pb.DecRef()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		// Hand the egress what the client stack wrote in batches, as the
		// agent does: whatever is queued, up to a bound.
		defer close(done)
		var views []*buffer.View
		var batch [][]byte
		for {
			for pkt := link.ReadContext(ctx); pkt != nil; pkt = link.Read() {
				v := pkt.ToView()
				pkt.DecRef()
				views = append(views, v)
				batch = append(batch, v.AsSlice())
				if len(batch) == 64 {
					break
				}
			}
			if len(batch) == 0 {
				return // ctx ended
			}
			eg.Inject(batch...)
			for _, v := range views {
				v.Release()
			}
			views, batch = views[:0], batch[:0]
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := eg.Close(); err != nil {
			t.Error(err)
		}
		link.Close()
		cs.Close()
		cs.Wait()
		if n := oversize.Load(); n > 0 {
			t.Errorf("out produced %d packets larger than the MTU", n)
		}
	})
	n.eg = eg
	return n
}

func egFullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	proto := ipv4.ProtocolNumber
	if ap.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return tcpip.FullAddress{Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}, proto
}

func (n *egTestNet) dialTCP(ctx context.Context, dst netip.AddrPort) (*gonet.TCPConn, error) {
	fa, proto := egFullAddr(dst)
	return gonet.DialContextTCP(ctx, n.client, fa, proto)
}

func (n *egTestNet) dialUDP(t *testing.T, dst netip.AddrPort) *gonet.UDPConn {
	t.Helper()
	fa, proto := egFullAddr(dst)
	c, err := gonet.DialUDP(n.client, nil, &fa, proto)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// listenTCP starts a loopback TCP server running handle for each conn.
func egListenTCP(t testing.TB, lo netip.Addr, handle func(net.Conn)) (netip.AddrPort, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(lo, 0).String())
	if err != nil {
		t.Skipf("no %s loopback: %v", lo, err)
	}
	var accepted atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return netip.MustParseAddrPort(ln.Addr().String()), &accepted
}

func egWaitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

var egFamilies = []struct {
	name string
	lo   netip.Addr
}{
	{"v4", egLoV4},
	{"v6", egLoV6},
}

// TestTCPEchoBulk sends a few MB through the egress to an echo server and
// checks every byte comes back; the client's half-close must reach the
// server (its io.Copy ends) and the server's close must reach the client.
func TestEgressTCPEchoBulk(t *testing.T) {
	for _, fam := range egFamilies {
		t.Run(fam.name, func(t *testing.T) {
			n := egNewTestNet(t, EgressConfig{})
			dst, _ := egListenTCP(t, fam.lo, func(c net.Conn) {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			})
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, err := n.dialTCP(ctx, dst)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))

			data := make([]byte, 4<<20)
			rand.Read(data)
			errc := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				if err == nil {
					err = c.CloseWrite()
				}
				errc <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read after %d bytes: %v", len(got), err)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("echoed data differs: got %d bytes, want %d", len(got), len(data))
			}
			if st := n.eg.Stats(); st.TCPFlows != 1 || st.DialFailures != 0 || st.Malformed != 0 {
				t.Fatalf("stats %+v", st)
			}
			// The stack sent the 4 MiB back: its sender counters (agent
			// status "tcp") say so, and name every recovery kind.
			tcp := n.eg.StackTCP()
			if tcp["segments_sent"] == 0 {
				t.Fatalf("StackTCP after a 4 MiB echo: segments_sent 0 (%v)", tcp)
			}
			for _, k := range []string{"retransmits", "timeouts", "fast_recovery", "sack_recovery", "tlp_recovery", "spurious_recovery"} {
				if _, ok := tcp[k]; !ok {
					t.Fatalf("StackTCP has no %q: %v", k, tcp)
				}
			}
		})
	}
}

// TestTCPHalfClose: the server reads until EOF, then answers. That only
// works if the client's FIN becomes CloseWrite on the real socket while the
// other direction stays open.
func TestEgressTCPHalfClose(t *testing.T) {
	n := egNewTestNet(t, EgressConfig{})
	dst, _ := egListenTCP(t, egLoV4, func(c net.Conn) {
		h := sha256.New()
		m, _ := io.Copy(h, c)
		fmt.Fprintf(c, "%d %x", m, h.Sum(nil))
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := n.dialTCP(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	data := make([]byte, 1<<20)
	rand.Read(data)
	if _, err := c.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%d %x", len(data), sha256.Sum256(data))
	if string(got) != want {
		t.Fatalf("server answered %q, want %q", got, want)
	}
}

// TestTCPRefusedAndDenied: a closed port and a denied destination both give
// the client an immediate "connection refused" (RST), not a timeout.
func TestEgressTCPRefusedAndDenied(t *testing.T) {
	// A port that was just free: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()

	var deniedDst netip.AddrPort
	cases := []struct {
		name        string
		dst         func(t *testing.T) netip.AddrPort
		wantDenied  uint64
		wantDialErr uint64
	}{
		{"refused-port", func(*testing.T) netip.AddrPort { return closedPort }, 0, 1},
		{"policy-denied", func(t *testing.T) netip.AddrPort {
			ap, accepted := egListenTCP(t, egLoV4, func(net.Conn) {})
			t.Cleanup(func() {
				if accepted.Load() != 0 {
					t.Errorf("denied flow reached the real listener")
				}
			})
			deniedDst = ap
			return ap
		}, 1, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := egNewTestNet(t, EgressConfig{Allow: func(_ netip.Addr, dst netip.AddrPort, proto string) bool {
				return !(proto == "tcp" && dst == deniedDst)
			}})
			dst := tc.dst(t)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start := time.Now()
			c, err := n.dialTCP(ctx, dst)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if el := time.Since(start); el > 2*time.Second {
				t.Fatalf("refusal took %v: want an immediate RST", el)
			}
			if !egIsRefused(err) {
				t.Fatalf("got %v, want connection refused", err)
			}
			st := n.eg.Stats()
			if st.Denied != tc.wantDenied || st.DialFailures != tc.wantDialErr || st.TCPFlows != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

func egIsRefused(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Err != nil && op.Err.Error() == (&tcpip.ErrConnectionRefused{}).String()
	}
	return false
}

func egUDPEchoServer(t testing.TB, lo netip.Addr) (netip.AddrPort, func() []netip.AddrPort) {
	t.Helper()
	pc, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo, 0)))
	if err != nil {
		t.Skipf("no %s loopback: %v", lo, err)
	}
	var mu sync.Mutex
	var peers []netip.AddrPort
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65536)
		for {
			m, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			mu.Lock()
			peers = append(peers, from)
			mu.Unlock()
			pc.WriteToUDPAddrPort(append([]byte("echo:"), buf[:m]...), from)
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return netip.MustParseAddrPort(pc.LocalAddr().String()), func() []netip.AddrPort {
		mu.Lock()
		defer mu.Unlock()
		return append([]netip.AddrPort(nil), peers...)
	}
}

func TestEgressUDPRequestResponse(t *testing.T) {
	for _, fam := range egFamilies {
		t.Run(fam.name, func(t *testing.T) {
			n := egNewTestNet(t, EgressConfig{})
			dst, peers := egUDPEchoServer(t, fam.lo)
			c := n.dialUDP(t, dst)
			buf := make([]byte, 2000)
			for i := range 5 {
				msg := fmt.Sprintf("query %d", i)
				if _, err := c.Write([]byte(msg)); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(3 * time.Second))
				m, err := c.Read(buf)
				if err != nil {
					t.Fatal(err)
				}
				if got := string(buf[:m]); got != "echo:"+msg {
					t.Fatalf("got %q", got)
				}
			}
			// A datagram larger than the MTU is fragmented by the stack on the
			// way back and still arrives whole.
			big := bytes.Repeat([]byte{0xab}, 3000)
			c.Write(big)
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			buf = make([]byte, 4000)
			m, err := c.Read(buf)
			if err != nil || !bytes.Equal(buf[:m], append([]byte("echo:"), big...)) {
				t.Fatalf("big datagram: %d bytes, %v", m, err)
			}
			if st := n.eg.Stats(); st.UDPFlows != 1 {
				t.Fatalf("one 5-tuple must be one flow: %+v", st)
			}
			// All datagrams of the flow came from one real socket.
			ps := peers()
			for _, p := range ps {
				if p != ps[0] {
					t.Fatalf("flow used several real sockets: %v", ps)
				}
			}
		})
	}
}

func TestEgressUDPIdleTimeout(t *testing.T) {
	n := egNewTestNet(t, EgressConfig{UDPIdleTimeout: 200 * time.Millisecond})
	dst, peers := egUDPEchoServer(t, egLoV4)
	c := n.dialUDP(t, dst)
	buf := make([]byte, 100)
	roundTrip := func() {
		t.Helper()
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatal(err)
		}
	}
	roundTrip()
	time.Sleep(100 * time.Millisecond)
	roundTrip() // within the timeout: same flow
	if st := n.eg.Stats(); st.UDPFlows != 1 {
		t.Fatalf("flows %d, want 1", st.UDPFlows)
	}
	time.Sleep(700 * time.Millisecond)
	roundTrip() // after the timeout: a new flow with a new real socket
	if st := n.eg.Stats(); st.UDPFlows != 2 {
		t.Fatalf("flows %d, want 2 after idle timeout", st.UDPFlows)
	}
	ps := peers()
	if len(ps) != 3 || ps[0] != ps[1] || ps[1] == ps[2] {
		t.Fatalf("real source ports %v: want same, same, new", ps)
	}
}

func TestEgressUDPDenied(t *testing.T) {
	n := egNewTestNet(t, EgressConfig{Allow: func(_ netip.Addr, dst netip.AddrPort, proto string) bool { return proto != "udp" }})
	dst, peers := egUDPEchoServer(t, egLoV4)
	c := n.dialUDP(t, dst)
	c.Write([]byte("x"))
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Fatal("denied UDP got an answer")
	}
	st := n.eg.Stats()
	if st.Denied != 1 || st.UDPFlows != 0 || len(peers()) != 0 {
		t.Fatalf("stats %+v, server saw %v", st, peers())
	}
}

// --- ICMP ---

func egEchoRequestPacket(src, dst netip.Addr, id, seq uint16, data []byte) []byte {
	r := egEchoRequest{v6: dst.Is6(), src: dst, dst: src, id: id, seq: seq}
	// egBuildEchoReply makes a reply from r.dst to r.src; turn it into a request.
	p := egBuildEchoReply(r, data)
	if dst.Is6() {
		m := p[40:]
		m[0] = egICMPv6EchoRequest
		m[2], m[3] = 0, 0
		binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, packet.PseudoSum6(src, dst, len(m), egProtoICMPv6)))
	} else {
		m := p[20:]
		m[0] = egICMPv4EchoRequest
		m[2], m[3] = 0, 0
		binary.BigEndian.PutUint16(m[2:4], ^packet.Sum(m, 0))
	}
	return p
}

func egSkipWithoutICMP(t testing.TB, v6 bool, modes []string) {
	t.Helper()
	c, _, err := egListenEcho(v6, modes)
	if err != nil {
		t.Skipf("no ICMP socket of kind %v available (ping_group_range closed and no CAP_NET_RAW?): %v", modes, err)
	}
	c.Close()
}

type egCapture struct {
	ch chan []byte
}

func egNewCaptureEgress(t testing.TB, cfg EgressConfig) (*Egress, *egCapture) {
	t.Helper()
	cp := &egCapture{ch: make(chan []byte, 64)}
	if cfg.Logger == nil {
		cfg.Logger = egTestLogger(t)
	}
	eg, err := NewEgress(cfg, func(pkts [][]byte) {
		for _, pkt := range pkts {
			select {
			case cp.ch <- bytes.Clone(pkt):
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { eg.Close() })
	return eg, cp
}

// TestICMPEcho forwards echoes to loopback through each kind of ICMP socket
// (the ping-socket case runs where net.ipv4.ping_group_range admits us).
func TestEgressICMPEcho(t *testing.T) {
	for _, fam := range []struct {
		name     string
		src, dst netip.Addr
	}{
		{"v4", egClientV4, egLoV4},
		{"v6", egClientV6, egLoV6},
	} {
		for _, mode := range []string{egEchoPing, egEchoRaw} {
			t.Run(fam.name+"-"+mode, func(t *testing.T) {
				v6 := fam.dst.Is6()
				egSkipWithoutICMP(t, v6, []string{mode})
				eg, cp := egNewCaptureEgress(t, EgressConfig{})
				eg.echoModes = []string{mode}
				payload := []byte("nlvpn-ping-0123456789abcdef")
				// The last echo is as big as the tunnel takes (ping -s
				// 1200): its reply must fit the reader's buffer too.
				big := bytes.Repeat([]byte("0123456789"), 120)
				for seq := uint16(1); seq <= 3; seq++ {
					if seq == 3 {
						payload = big
					}
					eg.Inject(egEchoRequestPacket(fam.src, fam.dst, 0xbeef, seq, payload))
					var p []byte
					select {
					case p = <-cp.ch:
					case <-time.After(6 * time.Second):
						t.Fatalf("no echo reply; stats %+v", eg.Stats())
					}
					egCheckEchoReply(t, p, fam.dst, fam.src, 0xbeef, seq, payload)
				}
				st := eg.Stats()
				if st.ICMPEchoes != 3 || st.EchoReplies != 3 {
					t.Fatalf("stats %+v", st)
				}
			})
		}
	}
}

func egCheckEchoReply(t *testing.T, p []byte, src, dst netip.Addr, id, seq uint16, payload []byte) {
	t.Helper()
	var m []byte
	if dst.Is6() {
		if len(p) < 48 || p[0]>>4 != 6 || p[6] != egProtoICMPv6 {
			t.Fatalf("not an ICMPv6 packet: %x", p)
		}
		if int(binary.BigEndian.Uint16(p[4:6])) != len(p)-40 {
			t.Fatal("bad IPv6 payload length")
		}
		if netip.AddrFrom16([16]byte(p[8:24])) != src || netip.AddrFrom16([16]byte(p[24:40])) != dst {
			t.Fatalf("addresses %x", p[8:40])
		}
		m = p[40:]
		if m[0] != egICMPv6EchoReply || packet.Sum(m, packet.PseudoSum6(src, dst, len(m), egProtoICMPv6)) != 0xffff {
			t.Fatalf("bad ICMPv6 reply type or checksum: %x", m)
		}
	} else {
		h := header.IPv4(p)
		if len(p) < 28 || !h.IsValid(len(p)) || !h.IsChecksumValid() || h.Protocol() != egProtoICMPv4 {
			t.Fatalf("bad IPv4 packet: %x", p)
		}
		if int(h.TotalLength()) != len(p) {
			t.Fatal("bad IPv4 total length")
		}
		if h.SourceAddress() != tcpip.AddrFrom4(src.As4()) || h.DestinationAddress() != tcpip.AddrFrom4(dst.As4()) {
			t.Fatalf("addresses %v -> %v", h.SourceAddress(), h.DestinationAddress())
		}
		m = p[20:]
		if m[0] != egICMPv4EchoReply || m[1] != 0 || header.ICMPv4(m).Checksum() != ^packet.Sum(append([]byte{m[0], m[1], 0, 0}, m[4:]...), 0) {
			t.Fatalf("bad ICMP reply type or checksum: %x", m)
		}
		if packet.Sum(m, 0) != 0xffff {
			t.Fatal("ICMP checksum does not verify")
		}
	}
	if binary.BigEndian.Uint16(m[4:6]) != id || binary.BigEndian.Uint16(m[6:8]) != seq {
		t.Fatalf("id/seq %x/%x, want %x/%x", m[4:6], m[6:8], id, seq)
	}
	if !bytes.Equal(m[8:], payload) {
		t.Fatalf("payload %q", m[8:])
	}
}

func TestEgressICMPEchoDeniedAndLimits(t *testing.T) {
	egSkipWithoutICMP(t, false, egDefaultEchoModes)
	t.Run("denied", func(t *testing.T) {
		eg, cp := egNewCaptureEgress(t, EgressConfig{Allow: func(netip.Addr, netip.AddrPort, string) bool { return false }})
		eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 1, 1, []byte("x")))
		select {
		case p := <-cp.ch:
			t.Fatalf("denied echo answered: %x", p)
		case <-time.After(300 * time.Millisecond):
		}
		if st := eg.Stats(); st.Denied != 1 || st.ICMPEchoes != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("allow-sees-icmp", func(t *testing.T) {
		var got atomic.Value
		eg, cp := egNewCaptureEgress(t, EgressConfig{Allow: func(_ netip.Addr, dst netip.AddrPort, proto string) bool {
			got.Store(fmt.Sprint(dst, " ", proto))
			return true
		}})
		eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 1, 1, []byte("x")))
		select {
		case <-cp.ch:
		case <-time.After(6 * time.Second):
			t.Fatal("no reply")
		}
		if got.Load() != "127.0.0.1:0 icmp" {
			t.Fatalf("Allow called with %v", got.Load())
		}
	})
	t.Run("reply-bigger-than-mtu", func(t *testing.T) {
		eg, _ := egNewCaptureEgress(t, EgressConfig{MTU: 1280})
		eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 1, 1, make([]byte, 1300)))
		if st := eg.Stats(); st.EchoDropped != 1 || st.ICMPEchoes != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("max-outstanding", func(t *testing.T) {
		eg, _ := egNewCaptureEgress(t, EgressConfig{MaxEchoes: 1})
		eg.echoSlots <- struct{}{} // occupy the only slot
		eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 1, 1, []byte("x")))
		<-eg.echoSlots
		if st := eg.Stats(); st.EchoDropped != 1 || st.ICMPEchoes != 0 {
			t.Fatalf("stats %+v", st)
		}
	})
}

// --- malformed input ---

func TestEgressMalformed(t *testing.T) {
	good := egEchoRequestPacket(egClientV4, egLoV4, 1, 1, []byte("abc"))
	mod := func(f func(p []byte) []byte) []byte { return f(bytes.Clone(good)) }
	good6 := egEchoRequestPacket(egClientV6, egLoV6, 1, 1, []byte("abc"))
	mod6 := func(f func(p []byte) []byte) []byte { return f(bytes.Clone(good6)) }
	cases := []struct {
		name string
		pkt  []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"one-byte", []byte{0x45}},
		{"version-0", mod(func(p []byte) []byte { p[0] = 0x05; return p })},
		{"version-5", mod(func(p []byte) []byte { p[0] = 0x55; return p })},
		{"v4-truncated-header", good[:19]},
		{"v4-ihl-too-small", mod(func(p []byte) []byte { p[0] = 0x44; return p })},
		{"v4-ihl-beyond-packet", mod(func(p []byte) []byte { p[0] = 0x4f; return p })},
		{"v4-total-length-huge", mod(func(p []byte) []byte { binary.BigEndian.PutUint16(p[2:], 0xffff); return p })},
		{"v4-total-length-below-header", mod(func(p []byte) []byte { binary.BigEndian.PutUint16(p[2:], 10); return p })},
		{"v4-bad-header-checksum", mod(func(p []byte) []byte { p[10] ^= 0xff; return p })},
		{"v4-bad-icmp-checksum", mod(func(p []byte) []byte { p[22] ^= 0xff; return p })},
		{"v6-truncated-header", good6[:39]},
		{"v6-payload-length-huge", mod6(func(p []byte) []byte { binary.BigEndian.PutUint16(p[4:], 0xffff); return p })},
		{"v6-bad-icmp-checksum", mod6(func(p []byte) []byte { p[42] ^= 0xff; return p })},
		{"too-big", append(bytes.Clone(good), make([]byte, 70000)...)},
	}
	eg, cp := egNewCaptureEgress(t, EgressConfig{Allow: func(netip.Addr, netip.AddrPort, string) bool { return false }})
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			eg.Inject(tc.pkt)
			st := eg.Stats()
			if st.Malformed != uint64(i+1) || st.Denied != 0 {
				t.Fatalf("not counted as malformed: %+v", st)
			}
		})
	}
	select {
	case p := <-cp.ch:
		t.Fatalf("malformed input produced output %x", p)
	default:
	}
	// Trailing link padding after a valid packet is not an error.
	eg.Inject(append(bytes.Clone(good), 0, 0, 0, 0))
	if st := eg.Stats(); st.Denied != 1 || st.Malformed != uint64(len(cases)) {
		t.Fatalf("padded packet: %+v", st)
	}
}

// FuzzInject feeds arbitrary bytes to Inject. Policy denies everything and
// Dial fails, so nothing leaves the process whatever the destination.
func FuzzInject(f *testing.F) {
	f.Add([]byte{})
	f.Add(egEchoRequestPacket(egClientV4, egLoV4, 1, 2, []byte("seed")))
	f.Add(egEchoRequestPacket(egClientV6, egLoV6, 1, 2, []byte("seed")))
	f.Add([]byte{0x45, 0, 0, 20, 0, 0, 0x20, 0, 64, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 17, 64})
	var dialed atomic.Int64
	eg, err := NewEgress(EgressConfig{
		Allow: func(netip.Addr, netip.AddrPort, string) bool { return false },
		Dial: func(context.Context, string, string) (net.Conn, error) {
			dialed.Add(1)
			return nil, errors.New("fuzz: no dialing")
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}, func([][]byte) {})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { eg.Close() })
	f.Fuzz(func(t *testing.T, pkt []byte) {
		before := eg.Stats()
		eg.Inject(pkt)
		after := eg.Stats()
		if after.Injected != before.Injected+1 {
			t.Fatal("not counted")
		}
		if after.ICMPEchoes != 0 || dialed.Load() != 0 {
			t.Fatal("fuzz input escaped the policy")
		}
	})
}

// --- lifecycle ---

func TestEgressCloseReleasesEverything(t *testing.T) {
	serverEOF := make(chan struct{}, 1)
	dst, _ := egListenTCP(t, egLoV4, func(c net.Conn) {
		io.Copy(io.Discard, c) // returns when the egress closes its real socket
		serverEOF <- struct{}{}
	})
	udpDst, _ := egUDPEchoServer(t, egLoV4)

	n := egNewTestNet(t, EgressConfig{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := n.dialTCP(ctx, dst)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("hello"))
	u := n.dialUDP(t, udpDst)
	u.Write([]byte("x"))
	u.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := u.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	egWaitFor(t, "flows", func() bool { st := n.eg.Stats(); return st.TCPFlows == 1 && st.UDPFlows == 1 })

	if egressGoroutines() == "" {
		t.Fatal("leak detector sees no egress goroutine while flows are open")
	}
	if err := n.eg.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.eg.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	select {
	case <-serverEOF:
	case <-time.After(3 * time.Second):
		t.Fatal("real TCP socket not closed by Close")
	}
	n.eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 1, 1, nil)) // after Close: ignored
	c.Close()
	// No goroutine of the egress is left (the client stack's are torn down
	// in Cleanup). One that has just signalled Done may still be on its way
	// out for a moment; give it that moment, not more.
	g := egressGoroutines()
	for deadline := time.Now().Add(time.Second); g != "" && time.Now().Before(deadline); g = egressGoroutines() {
		time.Sleep(5 * time.Millisecond)
	}
	if g != "" {
		t.Fatalf("goroutines left after Close:\n%s", g)
	}
}

// egressGoroutines returns the stacks of goroutines running Egress code.
func egressGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "nlvpn/netstack.(*Egress)") || strings.Contains(g, "nlvpn/netstack.egSplice") ||
			strings.Contains(g, "nlvpn/netstack.egCopyHalf") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// BenchmarkEgressICMPEcho is one echo through the egress to loopback and
// back (the agent's share of a tunnel ping): request in, the host's ICMP
// socket out and in, reply out. Raw socket where the process may open one,
// else a ping socket.
func BenchmarkEgressICMPEcho(b *testing.B) {
	mode := egEchoRaw
	if c, _, err := egListenEcho(false, []string{mode}); err == nil {
		c.Close()
	} else {
		mode = egEchoPing
	}
	egSkipWithoutICMP(b, false, []string{mode})
	eg, cp := egNewCaptureEgress(b, EgressConfig{Logger: slog.New(slog.DiscardHandler)})
	eg.echoModes = []string{mode}
	payload := []byte("nlvpn-ping-0123456789abcdef-0123456789abcdef-0123") // ping's 56 bytes less its timestamp
	for i := 0; b.Loop(); i++ {
		eg.Inject(egEchoRequestPacket(egClientV4, egLoV4, 0xbeef, uint16(i), payload))
		select {
		case <-cp.ch:
		case <-time.After(6 * time.Second):
			b.Fatalf("no echo reply; stats %+v", eg.Stats())
		}
	}
}
