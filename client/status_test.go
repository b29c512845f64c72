package client

import (
	"encoding/json"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/underlay"
)

// statusClient is a Client with just what Status needs: no session yet.
func statusClient() *Client {
	return &Client{
		cfg:  Config{Agent: "miranda"},
		u:    &underlay.Underlay{Conn: session.NewConn(nil)},
		path: pathState{kind: "relay", remote: "127.0.0.1:4433", since: time.Now().Add(-3 * time.Second)},
	}
}

// sockDir is a short temporary directory: unix socket paths are limited to
// 108 bytes, and t.TempDir's names can be longer.
func sockDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "nlst")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func readStatus(t *testing.T, path string) map[string]any {
	t.Helper()
	conn, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(conn)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("status is not JSON: %v: %q", err, b)
	}
	return m
}

func TestServeStatusJSON(t *testing.T) {
	path := filepath.Join(sockDir(t), "status.sock")
	c := statusClient()
	stop, err := c.serveStatus(path)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()

	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("%s is not a socket: %v", path, fi.Mode())
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Fatalf("status socket mode %o, want 600", m)
	}

	m := readStatus(t, path)
	// Scripts rely on these names (README, `nlvpn status --json`).
	for _, k := range []string{"agent", "path", "remote", "rtt_ms", "tx_bytes", "rx_bytes", "since_switch_s"} {
		if _, ok := m[k]; !ok {
			t.Errorf("status JSON lacks %q: %v", k, m)
		}
	}
	if m["path"] != "relay" || m["remote"] != "127.0.0.1:4433" || m["agent"] != "miranda" {
		t.Fatalf("status = %v", m)
	}
	if s, _ := m["since_switch_s"].(float64); s < 2 || s > 60 {
		t.Fatalf("since_switch_s = %v, want about 3", m["since_switch_s"])
	}
	// Each connection gets a fresh answer.
	c.pmu.Lock()
	c.path = pathState{kind: "direct", remote: "127.0.0.1:5555", since: time.Now()}
	c.pmu.Unlock()
	if m := readStatus(t, path); m["path"] != "direct" || m["remote"] != "127.0.0.1:5555" {
		t.Fatalf("after the switch: %v", m)
	}

	stop()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("stop left the socket file behind: %v", err)
	}
}

func TestServeStatusRefusesSecondInstance(t *testing.T) {
	path := filepath.Join(sockDir(t), "status.sock")
	stop, err := statusClient().serveStatus(path)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	stop2, err := statusClient().serveStatus(path)
	if err == nil {
		stop2()
		t.Fatal("a second serveStatus on a live socket succeeded")
	}
	if !strings.Contains(err.Error(), "already running") {
		t.Fatalf("error %q should say another one is already running", err)
	}
	// The first one is untouched.
	if m := readStatus(t, path); m["agent"] != "miranda" {
		t.Fatalf("first instance broken: %v", m)
	}
}

func TestServeStatusReplacesStaleSocket(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stale func(t *testing.T, path string)
	}{
		{"listener closed without unlinking", func(t *testing.T, path string) {
			ln, err := net.Listen("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			ln.(*net.UnixListener).SetUnlinkOnClose(false)
			ln.Close()
		}},
		{"leftover socket nobody listens on", func(t *testing.T, path string) {
			// A bound but never listening socket: what a killed process
			// can leave (connect gets ECONNREFUSED).
			conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(sockDir(t), "status.sock")
			tc.stale(t, path)
			if fi, err := os.Lstat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
				t.Fatalf("test setup: no stale socket at %s (%v)", path, err)
			}
			stop, err := statusClient().serveStatus(path)
			if err != nil {
				t.Fatalf("stale socket not replaced: %v", err)
			}
			defer stop()
			if m := readStatus(t, path); m["path"] != "relay" {
				t.Fatalf("status = %v", m)
			}
		})
	}
}

func TestServeStatusLeavesNonSocketAlone(t *testing.T) {
	// A regular file where the socket goes is not ours to delete.
	path := filepath.Join(sockDir(t), "status.sock")
	if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	stop, err := statusClient().serveStatus(path)
	if err == nil {
		stop()
		t.Fatal("serveStatus replaced a regular file")
	}
	if b, _ := os.ReadFile(path); string(b) != "precious" {
		t.Fatalf("regular file clobbered: %q", b)
	}
}
