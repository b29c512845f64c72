package metrics

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestCheckAddr(t *testing.T) {
	for _, tt := range []struct {
		addr        string
		allowRemote bool
		notLoopback bool // want ErrNotLoopback
		bad         bool // want a syntax error
	}{
		{addr: "127.0.0.1:9433"},
		{addr: "127.1.2.3:9"},
		{addr: "[::1]:9"},
		{addr: "localhost:9"},
		{addr: "0.0.0.0:9", notLoopback: true},
		{addr: "198.18.0.1:9", notLoopback: true},
		{addr: ":9", notLoopback: true},
		{addr: "[::]:9", notLoopback: true},
		{addr: "[::ffff:127.0.0.1]:9"}, // IPv4-mapped loopback is loopback
		{addr: "gw.example.com:9", notLoopback: true},
		{addr: "0.0.0.0:9", allowRemote: true},
		{addr: "198.18.0.1:9", allowRemote: true},
		{addr: "127.0.0.1", bad: true},
		{addr: "", bad: true},
		{addr: "198.18.0.1", allowRemote: true, bad: true},
	} {
		err := CheckAddr(tt.addr, tt.allowRemote)
		switch {
		case tt.notLoopback:
			if !errors.Is(err, ErrNotLoopback) {
				t.Errorf("CheckAddr(%q, %v) = %v, want ErrNotLoopback", tt.addr, tt.allowRemote, err)
			}
		case tt.bad:
			if err == nil || errors.Is(err, ErrNotLoopback) {
				t.Errorf("CheckAddr(%q, %v) = %v, want a HOST:PORT error", tt.addr, tt.allowRemote, err)
			}
		case err != nil:
			t.Errorf("CheckAddr(%q, %v) = %v, want nil", tt.addr, tt.allowRemote, err)
		}
	}
}

// Serve refuses a non-loopback address without listening on it.
func TestServeRefusesRemote(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:9", "198.18.0.1:9"} {
		s, err := Serve(addr, NewRegistry(), Options{})
		if !errors.Is(err, ErrNotLoopback) {
			if s != nil {
				s.Close()
			}
			t.Fatalf("Serve(%q) = %v, want ErrNotLoopback", addr, err)
		}
		if !strings.Contains(err.Error(), addr) {
			t.Errorf("error %q does not name the address", err)
		}
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func TestServe(t *testing.T) {
	reg := NewRegistry()
	hits := prometheus.NewCounter(prometheus.CounterOpts{Name: "nlvpn_test_hits_total", Help: "Test hits."})
	reg.MustRegister(hits)
	hits.Add(3)
	var unhealthy atomic.Pointer[error]
	s, err := Serve("127.0.0.1:0", reg, Options{
		Health: func() error {
			if e := unhealthy.Load(); e != nil {
				return *e
			}
			return nil
		},
		Handlers: map[string]http.Handler{"/relay": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "{}") })},
	})
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + s.Addr().String()

	code, body := get(t, base+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	for _, want := range []string{
		"nlvpn_test_hits_total 3\n",
		"# TYPE go_goroutines gauge\n",             // Go runtime
		"# TYPE process_cpu_seconds_total counter", // process
		"# TYPE process_resident_memory_bytes gauge",
		"promhttp_metric_handler_requests_total", // the scrapes themselves
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if code, body := get(t, base+"/healthz"); code != 200 || body != "ok\n" {
		t.Errorf("/healthz while healthy: %d %q", code, body)
	}
	notListening := errors.New("the gateway is not listening")
	unhealthy.Store(&notListening)
	if code, body := get(t, base+"/healthz"); code != 503 || !strings.Contains(body, "not listening") {
		t.Errorf("/healthz while not serving: %d %q, want 503 with the reason", code, body)
	}
	if code, body := get(t, base+"/relay"); code != 200 || body != "{}" {
		t.Errorf("/relay: %d %q", code, body)
	}
	if code, _ := get(t, base+"/nothing"); code != 404 {
		t.Errorf("/nothing: %d, want 404", code)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", s.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("still listening after Close")
	}
}

// Without a health check there is no /healthz (agent, client).
func TestServeWithoutHealth(t *testing.T) {
	s, err := Serve("127.0.0.1:0", NewRegistry(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if code, _ := get(t, "http://"+s.Addr().String()+"/healthz"); code != 404 {
		t.Errorf("/healthz without a check: %d, want 404", code)
	}
}

// More than maxConns connections at once: the extra ones are closed at
// once and counted; the endpoint serves again when they go.
func TestServeBoundsConnections(t *testing.T) {
	s, err := Serve("127.0.0.1:0", NewRegistry(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range maxConns {
		c, err := net.DialTimeout("tcp", s.Addr().String(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	extra, err := net.DialTimeout("tcp", s.Addr().String(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer extra.Close()
	extra.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := extra.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("connection %d: read %v, want EOF (closed at once)", maxConns+1, err)
	}
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	// The server may not have seen them all close yet, and then it
	// refuses the scrape too, and counts that refusal as well: the test
	// counts the scrapes it saw refused (closed before a byte of answer)
	// and retries, and the server's count must match its own.
	refused := 1
	for tries := 0; ; tries++ {
		resp, err := scrape(s.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if resp == "" {
			if tries == 100 {
				t.Fatalf("%d scrapes in a row refused after the connections closed", tries+1)
			}
			refused++
			time.Sleep(20 * time.Millisecond)
			continue
		}
		want := fmt.Sprintf("\nnlvpn_metrics_connections_refused_total %d\n", refused)
		if !strings.HasPrefix(resp, "HTTP/1.1 200 ") || !strings.Contains(resp, want) {
			t.Fatalf("after the connections closed (%d refused, %d of them scrapes), want a 200 with %q:\n%s", refused, refused-1, want[1:], resp)
		}
		if refused > 1 {
			t.Logf("%d scrapes refused while the server saw the connections close", refused-1)
		}
		return
	}
}

// scrape asks the server at addr for /metrics on a connection of its own
// and returns the whole answer, headers and all; "" if the server closed
// the connection without answering (a refused connection).
func scrape(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// A refused connection may be closed before the request is written:
	// the write's error is not the answer, the read tells.
	io.WriteString(c, "GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
	resp, err := io.ReadAll(c)
	if len(resp) == 0 && (err == nil || errors.Is(err, syscall.ECONNRESET)) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("scrape: %w after %d bytes", err, len(resp))
	}
	return string(resp), nil
}
