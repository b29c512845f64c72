//go:build linux

package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/nlvpn/nlvpn/lab"
)

// routedTun is the routed agent's TUN device in these tests.
const routedTun = "nlvpn-agt-e2e"

// ipForward reads net.ipv4.ip_forward in namespace ns.
func ipForward(t *testing.T, ns string) string {
	t.Helper()
	out, err := lab.Output(t.Context(), ns, "cat", "/proc/sys/net/ipv4/ip_forward")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// TestRoutedAgent runs the agent with --routed: the kernel forwards the
// clients' packets. A transfer both ways arrives whole, from the agent's
// LAN address (masqueraded: the LAN host needs no route back); the policy
// still refuses what it does not allow; a LAN host that routes the overlay
// through the agent cannot start anything toward the client, and that is
// counted; when the agent stops, its device, routes, nftables table and
// IP forwarding are gone.
func TestRoutedAgent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	if got := ipForward(t, e.lab.NS.Agent); got != "0" {
		t.Fatalf("ip_forward in the agent's namespace is %s before the test; want 0", got)
	}
	polFile := filepath.Join(e.dir, "policy")
	pol := fmt.Sprintf("allow client:alice %s %d tcp\nallow * %s * icmp\n", e.lab.LANHost, httpPort, e.lab.LANSubnet)
	if err := os.WriteFile(polFile, []byte(pol), 0o644); err != nil {
		t.Fatal(err)
	}
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--policy", polFile, "--routed", "--tun", routedTun)
	e.startClientMode(t)

	if got := ipForward(t, e.lab.NS.Agent); got != "1" {
		t.Errorf("ip_forward is %s while the routed agent runs; want 1", got)
	}
	if err := e.download(t, 8<<20, 31); err != nil {
		t.Fatalf("download through the routed agent: %v", err)
	}
	if err := e.upload(t, 8<<20, 32); err != nil {
		t.Fatalf("upload through the routed agent: %v", err)
	}
	who, err := e.curl(10*time.Second, fmt.Sprintf("http://%s/whoami", net.JoinHostPort(e.lab.LANHost.String(), strconv.Itoa(httpPort))))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(who); got != e.lab.AgentLANAddr.String() {
		t.Errorf("the LAN host saw the connection from %s; want the agent's LAN address %s (masquerade)", got, e.lab.AgentLANAddr)
	}
	if _, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "1", "-W", "2", e.lab.LANHost.String()); err != nil {
		t.Errorf("ping through the routed agent (allowed by the policy): %v", err)
	}
	// Not allowed by the policy: the echo port.
	err = lab.Do(e.lab.NS.Client, func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(e.lab.LANHost.String(), strconv.Itoa(tcpEchoPort)), 3*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
	if err == nil {
		t.Error("TCP to the echo port passed the routed agent; the policy allows only the web port")
	}
	if st := agentDenied(t, e); st["policy"] == 0 {
		t.Errorf("denied counters %v: want the echo port's SYNs counted under policy", st)
	}

	// The LAN host routes the overlay through the agent and pings the
	// client: nothing may pass.
	m := regexp.MustCompile(` overlay=(100\.\d+\.\d+\.\d+)`).FindStringSubmatch(e.client.Log())
	if m == nil {
		t.Fatalf("no overlay address in the client's log:\n%s", e.client.Log())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := lab.Output(ctx, e.lab.NS.LAN, "ip", "route", "add", m[1]+"/32", "via", e.lab.AgentLANAddr.String()); err != nil {
		t.Fatal(err)
	}
	if _, err := lab.Output(ctx, e.lab.NS.LAN, "ping", "-c", "3", "-i", "0.2", "-W", "1", m[1]); err == nil {
		t.Error("a LAN host pinged the client's overlay address through the routed agent")
	}
	st := e.agentStatus(t)
	if want := "routed via " + routedTun; st.Egress != want {
		t.Errorf("agent status egress %q, want %q", st.Egress, want)
	}
	if st.Drops["routed_lan_started"] == 0 {
		t.Errorf("agent drops %v: want the LAN host's pings counted in routed_lan_started", st.Drops)
	}
	for _, k := range []string{"routed_tun_write", "routed_unsupported", "routed_invalid", "routed_to_host", "no_session"} {
		if st.Drops[k] != 0 {
			t.Errorf("agent drop %s = %d after clean transfers; want 0", k, st.Drops[k])
		}
	}

	// The client leaves: its connections are forgotten by the agent's
	// kernel at once (left there, the LAN's late replies would be
	// translated back to its overlay address and, with no route into the
	// device any more, leave by the default route).
	client := netip.MustParseAddr(m[1])
	if n := trackedFrom(t, e.lab.NS.Agent, client); n == 0 {
		t.Fatal("no connection of the client in the agent's conntrack while it is connected: the check below tests nothing")
	}
	e.client.Stop()
	e.waitFor(t, 10*time.Second, "the agent to forget the client's connections", func() error {
		if n := trackedFrom(t, e.lab.NS.Agent, client); n > 0 {
			return fmt.Errorf("%d connections of %s still tracked", n, client)
		}
		return nil
	})

	// Stop: everything the agent set up is gone.
	e.agent.Stop()
	if out, err := lab.Output(ctx, e.lab.NS.Agent, "ip", "link", "show", routedTun); err == nil {
		t.Errorf("the agent's TUN device outlived it: %s", out)
	}
	if out, err := lab.Output(ctx, e.lab.NS.Agent, "nft", "list", "table", "inet", "nlvpn-forward-"+routedTun); err == nil {
		t.Errorf("the agent's nftables table outlived it:\n%s", out)
	}
	if out, _ := lab.Output(ctx, e.lab.NS.Agent, "ip", "route", "show", m[1]); strings.TrimSpace(out) != "" {
		t.Errorf("the client's route outlived the agent: %s", out)
	}
	if got := ipForward(t, e.lab.NS.Agent); got != "0" {
		t.Errorf("ip_forward is %s after the agent stopped; want 0 as before", got)
	}
}

// trackedFrom counts the kernel's tracked connections in ns whose
// original source is addr.
func trackedFrom(t *testing.T, ns string, addr netip.Addr) int {
	t.Helper()
	n := 0
	err := lab.Do(ns, func() error {
		flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, netlink.InetFamily(unix.AF_INET))
		for _, f := range flows {
			if a, ok := netip.AddrFromSlice(f.Forward.SrcIP); ok && a.Unmap() == addr {
				n++
			}
		}
		return err
	})
	if err != nil {
		t.Fatalf("conntrack in %s: %v", ns, err)
	}
	return n
}

// TestRoutedAgentLimit: a routed agent bounds the connections one client
// holds (--max-tcp-per-client plus --max-udp-per-client, counted by the
// kernel's connection tracking): past the bound new connections fail and
// the refusals are counted; once the client closes its connections it
// may open new ones.
func TestRoutedAgentLimit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--routed", "--tun", routedTun,
		"--max-tcp-per-client", "3", "--max-udp-per-client", "2")
	e.startClientMode(t)

	const bound, tries = 5, 12
	target := net.JoinHostPort(e.lab.LANHost.String(), strconv.Itoa(tcpEchoPort))
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	failed := 0
	for i := 0; i < tries; i++ {
		err := lab.Do(e.lab.NS.Client, func() error {
			c, err := net.DialTimeout("tcp", target, 2*time.Second)
			if err == nil {
				held = append(held, c)
			}
			return err
		})
		if err != nil {
			failed++
		}
	}
	t.Logf("%d of %d connections held, %d failed", len(held), tries, failed)
	if len(held) > bound {
		t.Errorf("the client holds %d connections through the agent; the bound is %d", len(held), bound)
	}
	if len(held) == 0 {
		t.Fatal("no connection at all got through: the test tests nothing")
	}
	if n := e.agentStatus(t).Limited["routed_connections"]; n == 0 {
		t.Error("connections over the bound were refused but not counted (limited.routed_connections is 0)")
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	// Closed connections no longer count (a TCP in TIME_WAIT is done).
	e.waitFor(t, 15*time.Second, "a new connection after closing the others", func() error {
		return lab.Do(e.lab.NS.Client, func() error {
			c, err := net.DialTimeout("tcp", target, 2*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
	})

	// Someone deletes the agent's device: the agent ends with an error
	// (a service manager restarts it) instead of running on with no way
	// back from the LAN, and still takes its table away.
	e.client.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := lab.Output(ctx, e.lab.NS.Agent, "ip", "link", "del", routedTun); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, 10*time.Second, "the agent to end after its device was deleted", func() error {
		if e.agent.Running() {
			return errors.New("still running")
		}
		return nil
	})
	if code := e.agent.ExitCode(); code == 0 || !strings.Contains(e.agent.Log(), "routed egress: reading TUN device") {
		t.Errorf("agent exit code %d after its device went; want an error naming the routed egress. Log:\n%s", code, e.agent.Log())
	}
	if out, err := lab.Output(ctx, e.lab.NS.Agent, "nft", "list", "table", "inet", "nlvpn-forward-"+routedTun); err == nil {
		t.Errorf("the agent's nftables table outlived it:\n%s", out)
	}
}
