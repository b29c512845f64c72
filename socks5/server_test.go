package socks5

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/proxy"
)

// hostNetwork is a Network on this machine's loopback, with one name.
type hostNetwork struct{ names map[string]netip.Addr }

func (hostNetwork) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

func (hostNetwork) ListenUDP(dst netip.Addr) (net.PacketConn, error) {
	return net.ListenPacket("udp", "127.0.0.1:0")
}

func (n hostNetwork) LookupHost(_ context.Context, host string) ([]netip.Addr, error) {
	if a, ok := n.names[host]; ok {
		return []netip.Addr{a}, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

func (n hostNetwork) dialName(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, _ := net.SplitHostPort(addr)
	if a, ok := n.names[host]; ok {
		addr = net.JoinHostPort(a.String(), port)
	}
	return n.DialContext(ctx, network, addr)
}

// serve runs s on a loopback listener until the test ends.
func serve(t *testing.T, s *Server) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); s.ServeConn(context.Background(), c) }()
		}
	}()
	return ln.Addr().String()
}

// The server on its own, with a Network of this machine: CONNECT by name
// (resolved by the Network) reaches an echo server; wrong credentials
// are refused and counted; a refused port is answered "connection
// refused".
func TestServerConnect(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	nw := hostNetwork{names: map[string]netip.Addr{"echo.lan": netip.MustParseAddr("127.0.0.1")}}
	var authFailures, protoErrors atomic.Uint64
	s := &Server{Network: namedNetwork{nw}, Auth: &Credentials{User: "u", Password: "p"},
		Counters: Counters{AuthFailures: &authFailures, ProtocolErrors: &protoErrors}, HandshakeTimeout: 2 * time.Second}
	addr := serve(t, s)
	_, port, _ := net.SplitHostPort(echo.Addr().String())

	d, _ := proxy.SOCKS5("tcp", addr, &proxy.Auth{User: "u", Password: "p"}, proxy.Direct)
	c, err := d.Dial("tcp", net.JoinHostPort("echo.lan", port))
	if err != nil {
		t.Fatalf("CONNECT echo.lan: %v", err)
	}
	c.Write([]byte("hello"))
	buf := make([]byte, 5)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo through the proxy: %q %v", buf, err)
	}
	c.Close()

	bad, _ := proxy.SOCKS5("tcp", addr, &proxy.Auth{User: "u", Password: "wrong"}, proxy.Direct)
	if _, err := bad.Dial("tcp", net.JoinHostPort("echo.lan", port)); err == nil {
		t.Fatal("wrong password accepted")
	}
	// The server counts the failure after it has told the client, which
	// may see it first: wait for the count (a bound, not a measure).
	for deadline := time.Now().Add(5 * time.Second); authFailures.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if authFailures.Load() != 1 {
		t.Fatalf("auth failures %d, want 1", authFailures.Load())
	}

	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	_, cport, _ := net.SplitHostPort(closed.Addr().String())
	closed.Close()
	if _, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", cport)); err == nil {
		t.Fatal("CONNECT to a closed port succeeded")
	}
}

// namedNetwork resolves its names in DialContext too, as the tunnel does.
type namedNetwork struct{ hostNetwork }

func (n namedNetwork) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return n.dialName(ctx, network, addr)
}
