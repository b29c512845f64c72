package connectproxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for in, want := range map[string]string{
		"http://proxy.lan:3128":      "proxy.lan:3128",
		"proxy.lan:3128":             "proxy.lan:3128",
		"http://u:p@10.0.1.1:8080":   "10.0.1.1:8080",
		"http://proxy.lan":           "proxy.lan:80",
		"http://[2001:db8::1]:3128/": "[2001:db8::1]:3128",
	} {
		u, err := Parse(in)
		if err != nil || u.Host != want {
			t.Errorf("Parse(%q) = %v, %v; want host %s", in, u, err, want)
		}
	}
	for _, in := range []string{"https://proxy:443", "socks5://p:1080", "http://", ""} {
		if u, err := Parse(in); err == nil {
			t.Errorf("Parse(%q) = %v; want an error", in, u)
		}
	}
}

func TestFromEnvironment(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://10.0.1.1:3128")
	t.Setenv("https_proxy", "")
	t.Setenv("NO_PROXY", "gw.internal,198.18.9.0/24")
	t.Setenv("no_proxy", "")
	for target, want := range map[string]string{
		"198.18.1.2:4433":  "10.0.1.1:3128",
		"gw.example:443":   "10.0.1.1:3128",
		"gw.internal:4433": "",
		"198.18.9.7:4433":  "",
		"127.0.0.1:4433":   "",
	} {
		u, err := FromEnvironment(target)
		got := ""
		if u != nil {
			got = u.Host
		}
		if err != nil || got != want {
			t.Errorf("FromEnvironment(%q) = %q, %v; want %q", target, got, err, want)
		}
	}
}

// echo listens on loopback and echoes each connection.
func echo(t *testing.T) string {
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
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

func TestDialThroughProxy(t *testing.T) {
	target := echo(t)
	srv := &Server{}
	ps := httptest.NewServer(srv)
	defer ps.Close()
	u, err := Parse(ps.URL)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := (&Dialer{Proxy: u}).DialContext(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("through the proxy"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, err := io.ReadAtLeast(c, buf, len("through the proxy"))
	if err != nil || string(buf[:n]) != "through the proxy" {
		t.Fatalf("echo %q, %v", buf[:n], err)
	}
	if srv.Tunnels() != 1 {
		t.Fatalf("%d tunnels", srv.Tunnels())
	}
}

// A proxy that refuses, answers garbage, answers without end, or never
// answers gives an error that names it, within the context's time.
func TestDialProxyFailures(t *testing.T) {
	cases := map[string]http.HandlerFunc{
		"refused": func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "no", http.StatusForbidden)
		},
	}
	for name, h := range cases {
		ps := httptest.NewServer(h)
		u, _ := Parse(ps.URL)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := (&Dialer{Proxy: u}).DialContext(ctx, "198.18.1.2:4433")
		cancel()
		ps.Close()
		if err == nil || !strings.Contains(err.Error(), "403") {
			t.Errorf("%s: %v; want a refusal naming the status", name, err)
		}
	}
	raw := func(answer func(c net.Conn)) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			answer(c)
		}()
		return "http://" + ln.Addr().String()
	}
	for name, answer := range map[string]func(net.Conn){
		"garbage": func(c net.Conn) { c.Write([]byte("SSH-2.0-nope\r\n\r\n")) },
		"endless": func(c net.Conn) {
			c.Write([]byte("HTTP/1.1 200 OK\r\n"))
			c.Write([]byte(strings.Repeat("X-A: b\r\n", 10000)))
		},
		"silent":   func(c net.Conn) { time.Sleep(3 * time.Second) },
		"hangs up": func(c net.Conn) {},
	} {
		u, _ := Parse(raw(answer))
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		start := time.Now()
		c, err := (&Dialer{Proxy: u}).DialContext(ctx, "198.18.1.2:4433")
		cancel()
		if err == nil {
			c.Close()
			t.Errorf("%s: dial succeeded", name)
			continue
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("%s: took %v", name, el)
		}
		if !strings.Contains(err.Error(), "proxy") {
			t.Errorf("%s: error %q does not name the proxy", name, err)
		}
	}
}
