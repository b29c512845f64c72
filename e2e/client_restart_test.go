//go:build linux

package e2e

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/proxy"

	"github.com/nlvpn/nlvpn/lab"
)

// TestClientKilledAndRestarted kills the client (no goodbye) while a TCP
// connection through it to the LAN is open and idle, and starts it again
// once the gateway has noticed, so that it gets its overlay address back
// while the agent still holds the old session (until its idle timeout):
// the new session replaces the old one. What happens to the connection
// depends on what held it:
//
//   - TUN mode: the host's kernel, which the restart does not touch. The
//     connection carries on through the new session (an ssh session
//     survives an upgrade of nlvpn), and the LAN end is not closed.
//   - netstack mode: the client process, so the connection died with it.
//     The agent must close the LAN end as soon as the new session comes,
//     not hold it until a retransmission draws a reset (an idle one would
//     be held for ever).
func TestClientKilledAndRestarted(t *testing.T) {
	t.Run("tun", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, coneCone, true)
		w := watchLANConn(t, e.lab, 9101)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := lab.DialContext(ctx, e.lab.NS.Client, "tcp4", net.JoinHostPort(e.lab.LANHost.String(), "9101"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c, "before the restart")
		killClient(t, e, e.client)
		e.client = e.startClient(t)
		sameOverlay(t, e)
		echo(t, c, "after the restart")
		select {
		case <-w.ended:
			t.Fatal("the LAN end of the connection was closed across a restart of a TUN client")
		default:
		}
		if strings.Contains(e.agent.Log(), "started over") {
			t.Errorf("the agent took the restarted TUN client for a new one:\n%s", e.agent.Log())
		}
	})
	t.Run("netstack", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, coneCone, false)
		w := watchLANConn(t, e.lab, 9101)
		const socks = "127.0.0.1:1091"
		start := func() *lab.Process {
			p := e.start(t, e.lab.NS.Client, "netstack-client", "up", "--netstack", "--token-file", e.tokenFile(e.clientTok),
				"--gateway", e.gwAddr(), "--agent", agentName, "--state-dir", filepath.Join(e.dir, "netstack-client"),
				"--socks5", socks, "--http-proxy", "", "--relay")
			e.waitFor(t, readyTimeout, "the LAN host through the SOCKS5 proxy", func() error {
				if !p.Running() {
					return errStop(fmt.Errorf("the netstack client exited (%v)", p.Err()))
				}
				r := runIn(e.lab.NS.Client, 10*time.Second, nil, nil, "curl", "-sS", "-f", "--max-time", "5",
					"--socks5-hostname", socks, fmt.Sprintf("http://%s/health", e.lab.LANHost))
				if r.err != nil {
					return fmt.Errorf("curl: %v: %s", r.err, strings.TrimSpace(r.stderr))
				}
				return nil
			})
			return p
		}
		p := start()
		d, err := proxy.SOCKS5("tcp4", socks, nil, nsDialer{e.lab.NS.Client})
		if err != nil {
			t.Fatal(err)
		}
		c, err := d.Dial("tcp4", net.JoinHostPort(e.lab.LANHost.String(), "9101"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c, "through the first client")
		killClient(t, e, p)
		start()
		back := time.Now()
		sameOverlay(t, e)
		const within = 10 * time.Second
		select {
		case <-w.ended:
			t.Logf("the LAN end closed %v after the client was back", time.Since(back).Round(10*time.Millisecond))
		case <-time.After(within):
			t.Fatalf("the LAN end of a connection that died with the client was still open %v after the client came back; agent log:\n%s", within, e.agent.Log())
		}
		if !strings.Contains(e.agent.Log(), "started over") {
			t.Errorf("the agent did not log closing the old flows:\n%s", e.agent.Log())
		}
	})
}

// lanConn is the one connection a watchLANConn listener takes.
type lanConn struct {
	ended chan struct{} // closed when the LAN end sees the connection end
}

// watchLANConn listens on the LAN host's port, echoes on the first
// connection it accepts and reports when that connection ends.
func watchLANConn(t *testing.T, l *lab.Lab, port int) *lanConn {
	t.Helper()
	ln, err := lab.Listen(l.NS.LAN, "tcp4", net.JoinHostPort(l.LANHost.String(), strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	w := &lanConn{ended: make(chan struct{})}
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer close(w.ended)
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Minute))
		io.Copy(c, c)
	}()
	return w
}

// echo writes msg on c and wants it back within 15 s.
func echo(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("echo %q: %v", msg, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo %q: got %q, %v", msg, got, err)
	}
}

// killClient ends the client without letting it say goodbye and waits
// for the gateway to see it gone (its address is free again).
func killClient(t *testing.T, e *env, p *lab.Process) {
	t.Helper()
	if err := p.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !p.Wait(10 * time.Second) {
		t.Fatal("the killed client did not exit")
	}
	e.waitFor(t, 90*time.Second, "the gateway to see the killed client gone", func() error {
		for _, l := range strings.Split(e.gateway.Log(), "\n") {
			if strings.Contains(l, `msg="node disconnected"`) && strings.Contains(l, "role=client") {
				return nil
			}
		}
		return errors.New("no disconnect logged")
	})
}

// sameOverlay fails the test unless the client's two sessions at the agent
// were for one overlay address (what the test is about).
func sameOverlay(t *testing.T, e *env) {
	t.Helper()
	var addrs []string
	for _, l := range strings.Split(e.agent.Log(), "\n") {
		if strings.Contains(l, `msg="client connected"`) {
			if _, a, ok := strings.Cut(l, "client_overlay="); ok {
				addrs = append(addrs, strings.Fields(a)[0])
			}
		}
	}
	if len(addrs) != 2 || addrs[0] != addrs[1] {
		t.Fatalf("the client's sessions at the agent were for %v; want two for one address", addrs)
	}
}
