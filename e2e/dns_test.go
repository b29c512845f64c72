//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/lab/labdns"
)

// officeDNSPort is where the LAN host's office.lan server listens (port 53
// is the small resolver of startLANServers).
const officeDNSPort = 5353

// officeDNS is the LAN's authoritative office.lan server, counting the
// queries it got over each transport.
type officeDNS struct {
	addr     netip.AddrPort
	udp, tcp atomic.Int64
}

// startOfficeDNS serves labdns.Office on the LAN host (UDP and TCP) from
// this test process until cleanup.
func startOfficeDNS(t *testing.T, l *lab.Lab) *officeDNS {
	t.Helper()
	o := &officeDNS{addr: netip.AddrPortFrom(l.LANHost, officeDNSPort)}
	zone := labdns.Office(l.LANHost)
	pc, err := lab.ListenPacket(l.NS.LAN, "udp4", o.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := lab.Listen(l.NS.LAN, "tcp4", o.addr.String())
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		labdns.ServeUDP(pc, func(q []byte, tcp bool) []byte { o.udp.Add(1); return zone.Answer(q, tcp) })
	}()
	go func() {
		defer wg.Done()
		labdns.ServeTCP(ln, func(q []byte, tcp bool) []byte { o.tcp.Add(1); return zone.Answer(q, tcp) })
	}()
	t.Cleanup(func() { pc.Close(); ln.Close(); wg.Wait() })
	return o
}

var agentOverlayRE = regexp.MustCompile(`agent_overlay=(100\.\d+\.\d+\.\d+)`)

// agentOverlay is the agent's overlay address as the client's log says it.
func agentOverlay(t *testing.T, p *lab.Process) netip.Addr {
	t.Helper()
	m := agentOverlayRE.FindStringSubmatch(p.Log())
	if m == nil {
		t.Fatalf("no agent_overlay in the client's log:\n%s", p.Log())
	}
	return netip.MustParseAddr(m[1])
}

// dig runs dig in the client namespace against server and returns its
// answer section, one record a line with the TTL left out (it counts
// down) and blanks collapsed.
func (e *env) dig(t *testing.T, server netip.Addr, args ...string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	full := append([]string{"dig", "@" + server.String(), "+time=3", "+tries=2", "+noall", "+answer"}, args...)
	out, stderr, err := lab.Run(ctx, e.lab.NS.Client, full...)
	if err != nil {
		t.Fatalf("%s: %v\n%s%s", strings.Join(full, " "), err, out, stderr)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(l)
		if len(f) < 4 || strings.HasPrefix(l, ";") {
			continue
		}
		lines = append(lines, strings.Join(append([]string{f[0]}, f[2:]...), " "))
	}
	return lines
}

// TestAgentDNSForwarder (issue 11): the agent, told the LAN's resolver
// with --dns-server, forwards clients' queries of every type to it and
// the answers come back intact: SRV, PTR, MX, TXT, a CNAME chain, over UDP
// and TCP, and a truncated answer retried over TCP, from a TUN client with
// dig; and a name behind a CNAME chain resolved for a netstack client's
// SOCKS5 proxy.
func TestAgentDNSForwarder(t *testing.T) {
	if _, err := exec.LookPath("dig"); err != nil {
		t.Skip("dig (bind9-dnsutils) not found")
	}
	t.Parallel()
	e := newEnv(t, coneCone, false)
	office := startOfficeDNS(t, e.lab)
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--dns-server", office.addr.String())
	if !strings.Contains(e.agent.Log(), office.addr.String()) {
		t.Fatalf("the agent does not say it forwards to %v:\n%s", office.addr, e.agent.Log())
	}
	e.client = e.startClient(t)
	dns := agentOverlay(t, e.client)
	host := e.lab.LANHost.String()

	for _, tc := range []struct {
		what string
		args []string
		want []string
	}{
		{"SRV", []string{"_ldap._tcp.office.lan", "SRV"}, []string{"_ldap._tcp.office.lan. IN SRV 0 100 389 dc1.office.lan."}},
		{"SRV over TCP", []string{"+tcp", "_kerberos._udp.office.lan", "SRV"}, []string{"_kerberos._udp.office.lan. IN SRV 0 100 88 dc1.office.lan."}},
		{"PTR", []string{"-x", host}, []string{reverseName(e.lab.LANHost) + " IN PTR nas.office.lan."}},
		{"PTR over TCP", []string{"+tcp", "-x", host}, []string{reverseName(e.lab.LANHost) + " IN PTR nas.office.lan."}},
		{"CNAME chain", []string{"www.office.lan", "A"}, []string{
			"www.office.lan. IN CNAME web.office.lan.", "web.office.lan. IN CNAME nas.office.lan.", "nas.office.lan. IN A " + host}},
		{"MX", []string{"office.lan", "MX"}, []string{"office.lan. IN MX 10 mail.office.lan."}},
		{"TXT", []string{"office.lan", "TXT"}, []string{`office.lan. IN TXT "v=spf1 mx -all"`}},
		{"no such name", []string{"nosuch.office.lan", "A"}, nil},
	} {
		got := e.dig(t, dns, tc.args...)
		if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
			t.Errorf("%s: dig %v answered\n%s\nwant\n%s", tc.what, tc.args, strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
		}
	}

	// NXDOMAIN comes back as such (with the zone's SOA).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	out, _, err := lab.Run(ctx, e.lab.NS.Client, "dig", "@"+dns.String(), "+time=3", "+tries=2", "nosuch.office.lan", "A")
	cancel()
	if err != nil || !strings.Contains(string(out), "status: NXDOMAIN") || !strings.Contains(string(out), "office.lan.\t") || !strings.Contains(string(out), "SOA") {
		t.Errorf("NXDOMAIN: %v\n%s", err, out)
	}

	// 40 strings of 60 bytes do not fit a UDP answer: dig gets TC, asks
	// again over TCP, and the agent asks the LAN server over TCP.
	tcpBefore := office.tcp.Load()
	big := e.dig(t, dns, "big.office.lan", "TXT")
	if len(big) != 1 || strings.Count(big[0], `"`) != 80 {
		t.Errorf("big TXT: %d records: %.200q", len(big), big)
	}
	if office.tcp.Load() == tcpBefore {
		t.Error("the LAN server got no TCP query for the truncated answer")
	}
	t.Logf("the LAN server got %d queries over UDP, %d over TCP", office.udp.Load(), office.tcp.Load())

	// The agent's status counts it: the second NXDOMAIN and the PTR over
	// TCP came from its cache, the big TXT went back truncated.
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	raw, _, err := lab.Run(ctx, e.lab.NS.Agent, nlvpnBin, "status", "--json", "--state-dir", e.agentStateDir())
	cancel()
	var st struct {
		DNS map[string]uint64 `json:"dns"`
	}
	if err != nil || json.Unmarshal(raw, &st) != nil {
		t.Fatalf("agent status: %v\n%s", err, raw)
	}
	t.Logf("agent dns counters: %v", st.DNS)
	if st.DNS["queries"] < 11 || st.DNS["cache_hits"] < 2 || st.DNS["truncated"] < 1 || st.DNS["nxdomain"] < 2 || st.DNS["servfail"] != 0 || st.DNS["mismatched"] != 0 {
		t.Errorf("agent dns counters %v: want at least 11 queries, 2 cache hits, 1 truncated, 2 nxdomain; no SERVFAIL, none mismatched", st.DNS)
	}

	// The netstack client's proxy resolves names through the agent too:
	// www.office.lan, two CNAMEs from the LAN host.
	socks := "127.0.0.1:1090"
	proxy := e.start(t, e.lab.NS.Client, "netstack-client", "up", "--netstack", "--token-file", e.tokenFile(e.clientTok),
		"--gateway", e.gwAddr(), "--agent", agentName, "--state-dir", filepath.Join(e.dir, "netstack-client"),
		"--socks5", socks, "--http-proxy", "", "--relay")
	e.waitFor(t, readyTimeout, "www.office.lan through the SOCKS5 proxy", func() error {
		if !proxy.Running() {
			return errStop(fmt.Errorf("the netstack client exited (%v)", proxy.Err()))
		}
		// Not e.curl: its --noproxy would bypass the proxy.
		r := runIn(e.lab.NS.Client, 10*time.Second, nil, nil, "curl", "-sS", "-f", "--max-time", "5",
			"--socks5-hostname", socks, "http://www.office.lan/health")
		if r.err != nil {
			return fmt.Errorf("curl: %v: %s", r.err, strings.TrimSpace(r.stderr))
		}
		if strings.TrimSpace(r.stdout) != "ok" {
			return fmt.Errorf("body %q", r.stdout)
		}
		return nil
	})
}

// reverseName is a's in-addr.arpa name.
func reverseName(a netip.Addr) string {
	b := a.As4()
	return fmt.Sprintf("%d.%d.%d.%d.in-addr.arpa.", b[3], b[2], b[1], b[0])
}
