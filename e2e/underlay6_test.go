//go:build linux

package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// Both NATs symmetric for IPv4, so IPv4 punching cannot work (see
// TestSymmetricStaysOnRelay), but both sides have global IPv6 behind their
// routers' stateful firewalls: the nodes announce their IPv6 addresses,
// both probe, each firewall opens for the other, and the client goes
// direct over IPv6. A 20 MB download is intact and the relay stays quiet.
func TestIPv6PunchSymmetricNATs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{ClientNAT: lab.Symmetric, AgentNAT: lab.Symmetric, Internet6: true}, false)
	start := time.Now()
	e.startClientMode(t)
	st := e.waitPath(t, "direct", 20*time.Second)
	took := time.Since(start)
	remote, err := netip.ParseAddrPort(st.Remote)
	if err != nil || remote.Addr() != e.lab.AgentAddr6 {
		t.Fatalf("direct path to %q, want the agent's IPv6 address %v", st.Remote, e.lab.AgentAddr6)
	}
	t.Logf("direct over IPv6 to %v %.2f s after `up` started (IPv4: symmetric <-> symmetric)", remote, took.Seconds())
	before := e.relayedBytes(t)
	if err := e.download(t, 20<<20, 66); err != nil {
		t.Fatalf("20 MB on the IPv6 direct path: %v", err)
	}
	if after := e.relayedBytes(t); after-before > 4096 {
		t.Fatalf("the relay carried %d bytes during a 20 MB transfer on the direct path", after-before)
	}
	if st, err := e.status(t); err != nil || st.Path != "direct" {
		t.Fatalf("after the download: status %+v %v, want direct", st, err)
	}
}

// A client on an IPv6-only network (no IPv4 route at all) reaches the
// gateway at its IPv6 address, which the gateway's default --listen :4433
// serves next to IPv4: it registers (the gateway observes its IPv6
// address), and the tunnel carries a download: direct over IPv6 (the
// agent has IPv6 too), on the relay with --relay (the gateway relays to
// the client's IPv6 address), and with --transport tcp over the TCP
// fallback, which listens on IPv6 too.
func TestIPv6OnlyClient(t *testing.T) {
	t.Parallel()
	e := newEnv(t, lab.Options{ClientNAT: lab.Cone, AgentNAT: lab.Cone, Internet6: true, ClientIPv6Only: true}, false)
	gw6 := e.lab.GatewayAddrPort6(gwPort).String()
	if _, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-4", "-c", "1", "-W", "1", e.lab.Gateway.String()); err == nil {
		t.Fatal("the IPv6-only client reaches the gateway's IPv4 address")
	}
	registered := regexp.MustCompile(`registered with gateway.* gateway=(\S+) .*observed=(\S+) transport=(\w+)`)
	// A gateway name with an A and an AAAA record, the A first: the node
	// dials the address it has a route to.
	setNetnsHosts(t, e.lab.NS.Client, fmt.Sprintf("%s gw.lab.test\n%s gw.lab.test\n", e.lab.Gateway, e.lab.Gateway6))
	byName := fmt.Sprintf("gw.lab.test:%d", gwPort)
	for _, tc := range []struct {
		name, transport, gateway string
		relay                    bool
		size                     int64
	}{
		{"udp", "udp", gw6, false, 20 << 20},
		{"udp relay", "udp", gw6, true, 8 << 20},
		{"tcp", "tcp", gw6, false, 4 << 20},
		{"udp by name", "udp", byName, false, 4 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			args := []string{"up", "--token-file", e.tokenFile(e.clientTok), "--gateway", tc.gateway, "--agent", agentName,
				"--state-dir", e.clientStateDir(), "--tun", tunName, "--transport", tc.transport}
			if tc.relay {
				args = append(args, "--relay")
			}
			c := e.start(t, e.lab.NS.Client, "client-v6only-"+tc.transport, args...)
			defer c.Stop()
			e.waitFor(t, readyTimeout, "the tunnel to come up", func() error {
				if !c.Running() {
					return errStop(fmt.Errorf("client exited with code %d", c.ExitCode()))
				}
				return e.httpHealth()
			})
			up := time.Since(start)
			m := registered.FindStringSubmatch(c.Log())
			if m == nil || (m[1] != gw6 && m[1] != tc.gateway) || m[3] != tc.transport {
				t.Fatalf("want a registration with the gateway at %s over %s in the client's log:\n%s", gw6, tc.transport, c.Log())
			}
			// Over UDP the gateway observes the client's IPv6 address (its
			// punching candidate); over TCP it observes none, by design.
			if tc.transport == "udp" {
				obs, err := netip.ParseAddrPort(m[2])
				if err != nil || obs.Addr() != e.lab.ClientAddr6 {
					t.Fatalf("the gateway observed the client at %q, want its IPv6 address %v", m[2], e.lab.ClientAddr6)
				}
			}
			if !tc.relay {
				// Both sides have IPv6: the direct path forms over it.
				st := e.waitPath(t, "direct", 20*time.Second)
				if r, err := netip.ParseAddrPort(st.Remote); err != nil || r.Addr() != e.lab.AgentAddr6 {
					t.Fatalf("direct path to %q, want the agent's IPv6 address %v", st.Remote, e.lab.AgentAddr6)
				}
			}
			relayed := e.relayedBytes(t)
			if err := e.download(t, tc.size, 67); err != nil {
				t.Fatalf("%d MB: %v", tc.size>>20, err)
			}
			if relayed = e.relayedBytes(t) - relayed; tc.relay && relayed < uint64(tc.size) {
				t.Fatalf("--relay: the gateway relayed %d bytes of a %d-byte download", relayed, tc.size)
			}
			st, err := e.status(t)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(st.Transport, tc.transport) {
				t.Fatalf("status transport %q, want %s", st.Transport, tc.transport)
			}
			t.Logf("%s: tunnel up %.2f s after start; path %s (%s); %d MB intact, %d bytes relayed", tc.name, up.Seconds(), st.Path, st.Remote, tc.size>>20, relayed)
		})
	}
}
