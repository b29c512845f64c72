package httpproxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// startProxy serves a Server on a loopback listener until the test ends.
func startProxy(t *testing.T, cfg Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := New(cfg)
	t.Cleanup(func() { ln.Close(); s.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.Handle(c)
		}
	}()
	return ln.Addr().String()
}

// The proxy on its own, dialing this machine: an absolute-form GET is
// forwarded, CONNECT is spliced both ways, credentials are required
// (407, counted) and a request that is not a proxy request is refused
// (400, counted).
func TestServer(t *testing.T) {
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello "+r.URL.Path) }))
	defer web.Close()
	var d net.Dialer
	var authFailures, protoErrors atomic.Uint64
	addr := startProxy(t, Config{Dial: d.DialContext, Auth: &Credentials{User: "u", Password: "p"},
		Counters: Counters{AuthFailures: &authFailures, ProtocolErrors: &protoErrors}, HeaderTimeout: 2 * time.Second})

	proxyURL, _ := url.Parse("http://u:p@" + addr)
	c := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)}, Timeout: 5 * time.Second}
	r, err := c.Get(web.URL + "/x")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(r.Body)
	r.Body.Close()
	if string(body) != "hello /x" {
		t.Fatalf("GET through the proxy: %s %q", r.Status, body)
	}

	// CONNECT, then the client speaks HTTP to the web server itself.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	host := strings.TrimPrefix(web.URL, "http://")
	auth := base64.StdEncoding.EncodeToString([]byte("u:p"))
	fmt.Fprintf(conn, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Basic %s\r\n\r\nGET /y HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", host, host, auth, host)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(conn)
	cr, err := http.ReadResponse(br, nil)
	if err != nil || cr.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT: %v %v", cr, err)
	}
	gr, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(gr.Body)
	if string(body) != "hello /y" {
		t.Fatalf("through CONNECT: %q", body)
	}

	noAuth := &http.Client{Transport: &http.Transport{Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: addr})}, Timeout: 5 * time.Second}
	if r, err := noAuth.Get(web.URL); err != nil || r.StatusCode != http.StatusProxyAuthRequired {
		t.Fatalf("without credentials: %v %v", r, err)
	}
	if authFailures.Load() != 1 {
		t.Fatalf("auth failures %d, want 1", authFailures.Load())
	}
	req, _ := http.NewRequestWithContext(context.Background(), "GET", "http://"+addr+"/not-a-proxy-request", nil)
	req.Header.Set("Proxy-Authorization", "Basic "+auth)
	if r, err := http.DefaultClient.Do(req); err != nil || r.StatusCode != http.StatusBadRequest {
		t.Fatalf("a plain request to the proxy: %v %v", r, err)
	}
	if protoErrors.Load() != 1 {
		t.Fatalf("protocol errors %d, want 1", protoErrors.Load())
	}
}
