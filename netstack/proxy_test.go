package netstack

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	xproxy "golang.org/x/net/proxy"

	"github.com/nlvpn/nlvpn/dnsfwd"
	"github.com/nlvpn/nlvpn/socks5"
)

// All real sockets in these tests are on 127.0.0.1. The client's overlay
// address exists only inside the Proxy's gVisor stack; the "agent" is an
// in-process Egress wired back to back with it.

var pxClientAddr = netip.MustParseAddr("100.64.0.3")

const pxLanName = "lanhost.test"

// pxFakeUpstream is a DNS server on 127.0.0.1 standing in for the agent's
// LAN resolver: it knows lanhost.test (A 127.0.0.1) and nothing else.
func pxFakeUpstream(t testing.TB) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			var p dnsmessage.Parser
			h, err := p.Start(buf[:n])
			if err != nil {
				continue
			}
			q, err := p.Question()
			if err != nil {
				continue
			}
			rh := dnsmessage.Header{ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired, RecursionAvailable: true, Authoritative: true}
			known := strings.EqualFold(q.Name.String(), pxLanName+".")
			if !known {
				rh.RCode = dnsmessage.RCodeNameError
			}
			b := dnsmessage.NewBuilder(nil, rh)
			b.StartQuestions()
			b.Question(q)
			b.StartAnswers()
			if known && q.Type == dnsmessage.TypeA {
				b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}, dnsmessage.AResource{A: [4]byte{127, 0, 0, 1}})
			}
			resp, err := b.Finish()
			if err == nil {
				pc.WriteTo(resp, from)
			}
		}
	}()
	t.Cleanup(func() { pc.Close(); <-done })
	return pc.LocalAddr().String()
}

type pxEnv struct {
	p     *Proxy
	eg    *Egress
	dns   *dnsfwd.Forwarder
	socks string // SOCKS5 listener address
	http  string // HTTP proxy listener address
}

func pxNewEnv(t *testing.T, auth *Credentials) *pxEnv {
	t.Helper()
	return pxNewEnvLog(t, auth, egTestLogger(t))
}

func pxNewEnvLog(t *testing.T, auth *Credentials, log *slog.Logger) *pxEnv {
	t.Helper()
	upstream := pxFakeUpstream(t)

	// The agent's DNS server, reached through the tunnel at 127.0.0.1:port
	// (the Egress allows loopback here).
	dpc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dsrv := dnsfwd.New(dnsfwd.Config{Servers: []netip.AddrPort{netip.MustParseAddrPort(upstream)}, Log: log})
	dnsDone := make(chan struct{})
	go func() { defer close(dnsDone); dsrv.ServeUDP(dpc) }()
	t.Cleanup(func() { dpc.Close(); <-dnsDone })

	var p *Proxy
	var pReady = make(chan struct{})
	eg, err := NewEgress(EgressConfig{MTU: egTestMTU, Logger: log, Allow: func(netip.Addr, netip.AddrPort, string) bool { return true }},
		func(pkts [][]byte) {
			<-pReady
			p.Inject(pkts...)
		})
	if err != nil {
		t.Fatal(err)
	}
	p, err = NewProxy(ProxyConfig{
		Addr:   pxClientAddr,
		MTU:    egTestMTU,
		DNS:    netip.MustParseAddrPort(dpc.LocalAddr().String()),
		Logger: log,
	}, func(pkts [][]byte) {
		for _, pkt := range pkts {
			if len(pkt) > egTestMTU {
				t.Errorf("proxy emitted a %d-byte packet", len(pkt))
			}
		}
		eg.Inject(pkts...)
	})
	if err != nil {
		eg.Close()
		t.Fatal(err)
	}
	close(pReady)

	env := &pxEnv{p: p, eg: eg, dns: dsrv}
	var wg sync.WaitGroup
	for _, kind := range []string{"socks", "http"} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		if kind == "socks" {
			env.socks = ln.Addr().String()
			go func() { defer wg.Done(); p.ServeSOCKS5(ln, auth) }()
		} else {
			env.http = ln.Addr().String()
			go func() { defer wg.Done(); p.ServeHTTP(ln, auth) }()
		}
	}
	t.Cleanup(func() {
		p.Close()
		wg.Wait()
		eg.Close()
	})
	return env
}

// pxBlobServer serves /blob (n random bytes) over HTTP on 127.0.0.1 and
// returns its port and the blob's digest.
func pxBlobServer(t *testing.T, n int) (port string, sum [32]byte) {
	t.Helper()
	blob := make([]byte, n)
	rand.Read(blob)
	sum = sha256.Sum256(blob)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/blob" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		w.Write(blob)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	_, port, _ = net.SplitHostPort(ln.Addr().String())
	return port, sum
}

// pxEchoServer echoes TCP on 127.0.0.1 and returns its port.
func pxEchoServer(t *testing.T) string {
	t.Helper()
	ap, _ := egListenTCP(t, egLoV4, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
	return strconv.Itoa(int(ap.Port()))
}

func pxGet(t *testing.T, client *http.Client, u string, n int, sum [32]byte) {
	t.Helper()
	resp, err := client.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
	h := sha256.New()
	m, err := io.Copy(h, resp.Body)
	if err != nil {
		t.Fatalf("GET %s: body after %d bytes: %v", u, m, err)
	}
	if int(m) != n || !bytes.Equal(h.Sum(nil), sum[:]) {
		t.Fatalf("GET %s: got %d bytes, digest mismatch", u, m)
	}
}

func pxSOCKSClient(t *testing.T, env *pxEnv, auth *xproxy.Auth) *http.Client {
	t.Helper()
	d, err := xproxy.SOCKS5("tcp", env.socks, auth, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{
		DialContext:       d.(xproxy.ContextDialer).DialContext,
		DisableKeepAlives: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

func TestProxySOCKSConnect(t *testing.T) {
	env := pxNewEnv(t, nil)
	const n = 4 << 20
	port, sum := pxBlobServer(t, n)
	client := pxSOCKSClient(t, env, nil)
	pxGet(t, client, "http://127.0.0.1:"+port+"/blob", n, sum)
	// socks5h: the name is sent to the proxy and resolved through the tunnel
	// by the agent's resolver.
	pxGet(t, client, "http://"+pxLanName+":"+port+"/blob", n, sum)

	st := env.p.Stats()
	if st.Dials != 2 || st.DNSQueries == 0 || st.ProtocolErrors != 0 {
		t.Fatalf("proxy stats %+v", st)
	}
	if ds := env.dns.Stats(); ds.Answered == 0 {
		t.Fatalf("dns stats %+v", ds)
	}
}

func TestProxyDialContext(t *testing.T) {
	env := pxNewEnv(t, nil)
	port := pxEchoServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := env.p.DialContext(ctx, "tcp", net.JoinHostPort(pxLanName, port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprint(c, "hello")
	c.(interface{ CloseWrite() error }).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "hello" {
		t.Fatalf("echo: %q %v", got, err)
	}

	// A closed port is refused (the agent answers with a RST).
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	if _, err := env.p.DialContext(ctx, "tcp", closed); socks5.ReplyCode(err) != socks5.RepConnRefused {
		t.Fatalf("dial closed port: %v (reply %d)", err, socks5.ReplyCode(err))
	}
	var de *net.DNSError
	if _, err := env.p.DialContext(ctx, "tcp", "nosuch.test:80"); !errors.As(err, &de) || !de.IsNotFound {
		t.Fatalf("dial unknown name: %v", err)
	}
}

func TestProxyHTTP(t *testing.T) {
	env := pxNewEnv(t, nil)
	const n = 3 << 20
	port, sum := pxBlobServer(t, n)
	pu, _ := url.Parse("http://" + env.http)

	// Plain absolute-form GET, forwarded.
	tr := &http.Transport{Proxy: http.ProxyURL(pu), DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	pxGet(t, client, "http://"+pxLanName+":"+port+"/blob", n, sum)
	pxGet(t, client, "http://127.0.0.1:"+port+"/blob", n, sum)

	// CONNECT, then HTTP over the tunnel.
	c, err := net.Dial("tcp", env.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "CONNECT %s:%s HTTP/1.1\r\nHost: %s:%s\r\n\r\n", pxLanName, port, pxLanName, port)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT: %v %v", resp, err)
	}
	fmt.Fprintf(c, "GET /blob HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil || sha256.Sum256(body) != sum {
		t.Fatalf("CONNECT body: %d bytes, %v", len(body), err)
	}

	// CONNECT to a refused port: 502.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	c2, err := net.Dial("tcp", env.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c2, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", closed, closed)
	resp, err = http.ReadResponse(bufio.NewReader(c2), nil)
	if err != nil || resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("CONNECT refused: %v %v", resp, err)
	}
}

func TestProxyAuth(t *testing.T) {
	creds := &Credentials{User: "alice", Password: "s3cret"}
	env := pxNewEnv(t, creds)
	port := pxEchoServer(t)
	target := "127.0.0.1:" + port

	dial := func(auth *xproxy.Auth) error {
		d, err := xproxy.SOCKS5("tcp", env.socks, auth, xproxy.Direct)
		if err != nil {
			return err
		}
		c, err := d.Dial("tcp", target)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
			return fmt.Errorf("echo %q %v", b, err)
		}
		return nil
	}
	if err := dial(&xproxy.Auth{User: "alice", Password: "s3cret"}); err != nil {
		t.Fatalf("good credentials: %v", err)
	}
	if err := dial(&xproxy.Auth{User: "alice", Password: "wrong"}); err == nil {
		t.Fatal("bad password accepted")
	}
	if err := dial(nil); err == nil {
		t.Fatal("no credentials accepted")
	}
	if got := pxRaw(t, env.socks, []byte{5, 1, 0}); !bytes.Equal(got, []byte{5, 0xff}) {
		t.Fatalf("no-auth method only: reply %x", got)
	}
	// The server counts a failure after it has answered, so the count may
	// trail the client by a moment.
	deadline := time.Now().Add(3 * time.Second)
	for env.p.Stats().AuthFailures < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if st := env.p.Stats(); st.AuthFailures != 3 {
		t.Fatalf("auth failures %d, want 3 (%+v)", st.AuthFailures, st)
	}

	// HTTP proxy: 407 without, success with.
	c, err := net.Dial("tcp", env.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusProxyAuthRequired || resp.Header.Get("Proxy-Authenticate") == "" {
		t.Fatalf("CONNECT without auth: %v %v", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n", target, target)
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("CONNECT with auth: %v %v", resp, err)
	}
	c.Write([]byte("pong"))
	b := make([]byte, 4)
	if _, err := io.ReadFull(br, b); err != nil || string(b) != "pong" {
		t.Fatalf("echo over CONNECT: %q %v", b, err)
	}
}

// pxRaw sends raw bytes to addr, half-closes, and returns everything the
// server answered before closing (failing on a read timeout: the server
// must close, not hang).
func pxRaw(t *testing.T, addr string, in []byte) []byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	c.Write(in)
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("server did not close: %v (got %x)", err, got)
	}
	return got
}

func pxReq(cmd, atyp byte, addr []byte, port uint16) []byte {
	b := []byte{5, 1, 0, 5, cmd, 0, atyp}
	b = append(b, addr...)
	return binary.BigEndian.AppendUint16(b, port)
}

func TestProxySOCKSHostile(t *testing.T) {
	old := proxyHandshakeTimeout
	proxyHandshakeTimeout = 500 * time.Millisecond
	t.Cleanup(func() { proxyHandshakeTimeout = old })
	env := pxNewEnv(t, nil)
	port := pxEchoServer(t)
	pn, _ := strconv.Atoi(port)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closedPort := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()

	lo := []byte{127, 0, 0, 1}
	cases := []struct {
		name string
		in   []byte
		want []byte // the server's whole answer before it closes
	}{
		{"socks4", []byte{4, 1, 0, 80, 127, 0, 0, 1, 0}, []byte{0, 0x5b, 0, 0, 0, 0, 0, 0}},
		{"bad-version", []byte{6, 1, 0}, nil},
		{"http-to-socks", []byte("GET / HTTP/1.1\r\n\r\n"), nil},
		{"empty", nil, nil},
		{"truncated-greeting", []byte{5}, nil},
		{"truncated-methods", []byte{5, 255, 0, 1, 2}, nil},
		{"no-methods", []byte{5, 0}, []byte{5, 0xff}},
		{"no-acceptable-method", []byte{5, 2, 0x02, 0x80}, []byte{5, 0xff}},
		{"request-bad-version", []byte{5, 1, 0, 4, 1, 0, 1, 127, 0, 0, 1, 0, 80}, []byte{5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"unknown-command", pxReq(9, 1, lo, 80), []byte{5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"bind", pxReq(2, 1, lo, 80), []byte{5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"unknown-atyp", []byte{5, 1, 0, 5, 1, 0, 9, 1, 2, 3, 4, 0, 80}, []byte{5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"truncated-request", []byte{5, 1, 0, 5, 1}, []byte{5, 0}},
		{"truncated-ipv6", []byte{5, 1, 0, 5, 1, 0, 4, 0, 0, 0}, []byte{5, 0}},
		{"huge-domain-length", append([]byte{5, 1, 0, 5, 1, 0, 3, 255}, "short"...), []byte{5, 0}},
		{"empty-domain", pxReq(1, 3, []byte{0}, 80), []byte{5, 0, 5, 4, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"unknown-name", pxReq(1, 3, append([]byte{11}, "nosuch.test"...), 80), []byte{5, 0, 5, 4, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"refused", pxReq(1, 1, lo, closedPort), []byte{5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0}},
		{"ipv6-unreachable", pxReq(1, 4, net.IPv6loopback, uint16(pn)), []byte{5, 0, 5, 3, 0, 1, 0, 0, 0, 0, 0, 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := env.p.Stats()
			got := pxRaw(t, env.socks, tc.in)
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("answer %x, want %x", got, tc.want)
			}
			after := env.p.Stats()
			if tc.want == nil || len(tc.want) == 2 || tc.want[3] >= 7 || tc.want[3] == 1 {
				if after.ProtocolErrors <= before.ProtocolErrors {
					t.Fatalf("protocol error not counted: %+v", after)
				}
			}
		})
	}

	t.Run("slowloris", func(t *testing.T) {
		c, err := net.Dial("tcp", env.socks)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{5, 1}) // and never the method
		c.SetDeadline(time.Now().Add(5 * time.Second))
		start := time.Now()
		b, err := io.ReadAll(c)
		if err != nil || len(b) != 0 {
			t.Fatalf("slow client: %x %v", b, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("closed after %v", d)
		}
	})

	// Still serving: a good client works.
	client := pxSOCKSClient(t, env, nil)
	bp, sum := pxBlobServer(t, 1<<16)
	pxGet(t, client, "http://"+pxLanName+":"+bp+"/blob", 1<<16, sum)
	egWaitFor(t, "connections to end", func() bool { return env.p.Stats().ActiveConns == 0 })
}

func TestProxySOCKSUDPAssociate(t *testing.T) {
	env := pxNewEnv(t, nil)
	echo, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		b := make([]byte, 65535)
		for {
			n, from, err := echo.ReadFrom(b)
			if err != nil {
				return
			}
			echo.WriteTo(append([]byte("echo:"), b[:n]...), from)
		}
	}()
	echoAP := netip.MustParseAddrPort(echo.LocalAddr().String())

	ctrl, err := net.Dial("tcp", env.socks)
	if err != nil {
		t.Fatal(err)
	}
	defer ctrl.Close()
	ctrl.SetDeadline(time.Now().Add(10 * time.Second))
	ctrl.Write(pxReq(3, 1, []byte{0, 0, 0, 0}, 0))
	rep := make([]byte, 2+10)
	if _, err := io.ReadFull(ctrl, rep); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rep[:5], []byte{5, 0, 5, 0, 0}) || rep[5] != 1 {
		t.Fatalf("associate reply %x", rep)
	}
	relay := netip.AddrPortFrom(netip.AddrFrom4([4]byte(rep[6:10])), binary.BigEndian.Uint16(rep[10:12]))

	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	hdrIP := socks5.AppendAddr([]byte{0, 0, 0}, echoAP)
	hdrName := append([]byte{0, 0, 0, 3, byte(len(pxLanName))}, pxLanName...)
	hdrName = binary.BigEndian.AppendUint16(hdrName, echoAP.Port())

	// A fragment is dropped (and counted), never forwarded.
	frag := append([]byte{0, 0, 1}, hdrIP[3:]...)
	uc.WriteToUDPAddrPort(append(frag, "fragment"...), relay)

	buf := make([]byte, 2048)
	for i, hdr := range [][]byte{hdrIP, hdrName, hdrIP} {
		msg := fmt.Sprintf("datagram %d", i)
		var got []byte
		for try := 0; try < 5 && got == nil; try++ {
			uc.WriteToUDPAddrPort(append(append([]byte(nil), hdr...), msg...), relay)
			uc.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, err := uc.Read(buf)
			if err != nil {
				continue
			}
			got = buf[:n]
		}
		if got == nil {
			t.Fatalf("no answer to %q", msg)
		}
		want := append(append([]byte(nil), hdrIP...), "echo:"+msg...)
		if !bytes.Equal(got, want) {
			t.Fatalf("got %x, want %x", got, want)
		}
	}
	// The relay counts a datagram after sending it: give it a moment.
	egWaitFor(t, "counters", func() bool { return env.p.Stats().UDPDatagrams >= 6 })
	st := env.p.Stats()
	if st.UDPAssociates != 1 || st.UDPDropped < 1 || st.UDPDatagrams < 6 {
		t.Fatalf("stats %+v", st)
	}
	// Closing the control connection ends the association.
	ctrl.Close()
	egWaitFor(t, "association to end", func() bool { return env.p.Stats().ActiveConns == 0 })
	uc.WriteToUDPAddrPort(append(append([]byte(nil), hdrIP...), "late"...), relay)
	uc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, err := uc.Read(buf); err == nil {
		t.Fatalf("relay still answering after control closed: %q", buf[:n])
	}
}

func TestProxySOCKSConcurrent(t *testing.T) {
	env := pxNewEnvLog(t, nil, slog.New(slog.NewTextHandler(egTestWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn})))
	port := pxEchoServer(t)
	d, err := xproxy.SOCKS5("tcp", env.socks, nil, xproxy.Direct)
	if err != nil {
		t.Fatal(err)
	}
	const conns = 200
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errs := make(chan error, conns)
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			host := "127.0.0.1"
			if i%2 == 1 {
				host = pxLanName
			}
			c, err := d.(xproxy.ContextDialer).DialContext(ctx, "tcp", net.JoinHostPort(host, port))
			if err != nil {
				errs <- fmt.Errorf("conn %d: dial: %w", i, err)
				return
			}
			defer c.Close()
			dl, _ := ctx.Deadline()
			c.SetDeadline(dl)
			data := make([]byte, 16<<10)
			rand.Read(data)
			go c.Write(data)
			got := make([]byte, len(data))
			_, err = io.ReadFull(c, got)
			if err != nil || !bytes.Equal(got, data) {
				errs <- fmt.Errorf("conn %d: got %d bytes, %v", i, len(got), err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if st := env.p.Stats(); st.Dials != conns {
		t.Fatalf("stats %+v", st)
	}
}

func TestProxyInjectGarbage(t *testing.T) {
	env := pxNewEnv(t, nil)
	for _, b := range [][]byte{nil, {0x45}, {0x60, 0, 0}, bytes.Repeat([]byte{0xff}, 100), make([]byte, 70000)} {
		env.p.Inject(b)
	}
	if st := env.p.Stats(); st.Malformed != 5 {
		t.Fatalf("stats %+v", st)
	}
}
