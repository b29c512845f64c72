//go:build linux

package e2e

import (
	"context"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// An agent started with --dns-domain tells its clients; a TUN client
// would hand lookups under it to systemd-resolved per link. Here the
// client runs in a lab namespace, where resolved does not serve (nor, in
// CI, anywhere): it must
// say so, with the agent DNS address to use by hand, change nothing, and
// that address must answer for the LAN's names through the tunnel.
func TestSplitDNSFallback(t *testing.T) {
	e := newEnv(t, coneCone, false)
	setAgentResolver(t, e.lab.NS.Agent, e.lab.LANHost)
	// office.lan is the agent's to name; co.uk is not (a public suffix):
	// the client refuses that one and says so.
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--dns-domain", "Office.LAN.", "--dns-domain", "co.uk")
	e.client = e.startClient(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := e.client.WaitLog(ctx, "split DNS not set up"); err != nil {
		t.Fatalf("the client did not say split DNS is not set up: %v\n%s", err, e.client.Log())
	}
	m := regexp.MustCompile(`split DNS not set up.*why="([^"]*)".*domains=\[([^\]]*)\].*agent_dns=(\S+)`).FindStringSubmatch(e.client.Log())
	if m == nil {
		t.Fatalf("the split DNS message lacks the reason, domains or agent address:\n%s", e.client.Log())
	}
	t.Logf("client: why=%q domains=[%s] agent_dns=%s", m[1], m[2], m[3])
	if m[2] != "office.lan" {
		t.Errorf("domains [%s], want [office.lan] (the agent's --dns-domain Office.LAN., normalized; not co.uk)", m[2])
	}
	if !strings.Contains(e.client.Log(), `not resolving a domain the agent names through it" agent=miranda domain=co.uk why="a public suffix"`) {
		t.Errorf("the client did not say it refuses the agent's co.uk:\n%s", e.client.Log())
	}
	// Where /proc/1 can be read the namespace check speaks first; in a
	// container that hides it, the absent resolved does.
	if !regexp.MustCompile(`not in the system's network namespace|systemd-resolved is not running`).MatchString(m[1]) {
		t.Errorf("reason %q, want the namespace or the missing resolved", m[1])
	}
	agentDNS, err := netip.ParseAddr(m[3])
	if err != nil {
		t.Fatalf("agent_dns %q: %v", m[3], err)
	}

	// The address the message names answers for the LAN's names.
	c, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const id = 0x5d15
	q, err := dnsQuery(id, dnsName)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1500)
	for try := 0; ; try++ {
		c.WriteToUDPAddrPort(q, netip.AddrPortFrom(agentDNS, 53))
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if try < 2 {
				continue
			}
			t.Fatalf("no answer from the agent's DNS at %v: %v", agentDNS, err)
		}
		a, err := parseDNSA(buf[:n], id)
		if err != nil || a != e.lab.LANHost {
			t.Fatalf("%s via the agent's DNS = %v, %v; want %v", dnsName, a, err, e.lab.LANHost)
		}
		break
	}
}
