package gateway

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// The ACME HTTP-01 port is open to anyone: it answers only challenges
// (404 otherwise), and holds at most maxACMEConns connections; more are
// closed at once and counted.
func TestACMEPortBounded(t *testing.T) {
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr().String()
	free.Close()
	// The CA is unreachable: the gateway keeps serving the port and says
	// why it has no certificate.
	tg := startGatewayIn(t, t.TempDir(), func(c *Config) {
		c.ACME = &ACMEConfig{Domain: "gw.nlvpn.test", Directory: "http://127.0.0.1:1/dir", HTTPAddr: addr}
	})
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	dial := func() net.Conn {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	// Until the listener is up.
	deadline := time.Now().Add(3 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the HTTP-01 port never listened: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	if r.StatusCode != http.StatusNotFound {
		t.Fatalf("GET / on the HTTP-01 port: %s, want 404", r.Status)
	}
	time.Sleep(100 * time.Millisecond) // the GET's connection closes
	for range maxACMEConns {
		conns = append(conns, dial())
	}
	time.Sleep(100 * time.Millisecond) // the server has seen them all
	extra := dial()
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := extra.Read(make([]byte, 1)); err == nil || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("connection %d: read %d, %v; want it closed at once", maxACMEConns+1, n, err)
	} else if err != io.EOF && !strings.Contains(err.Error(), "reset") {
		t.Logf("connection %d closed: %v", maxACMEConns+1, err)
	}
	if got := tg.g.refusals[reasonACMEConnLimit].Load(); got < 1 {
		t.Fatalf("refusals at the bound: %d, want at least 1", got)
	}
}
