package agent

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The agent's metrics sum what `nlvpn status` shows per session into
// series with fixed labels: no session ID, client name or address.
func TestAgentMetrics(t *testing.T) {
	st := Status{Role: "agent", Name: "miranda",
		Sessions: []SessionStatus{
			{Client: "alice", Session: "00000000deadbeef", Path: "direct", Remote: "198.18.0.7:4000", TxBytes: 100, RxBytes: 50,
				Flows: map[string]int{"tcp_flows": 3, "udp_flows": 1}},
			{Client: "bob", Session: "00000000cafef00d", Path: "relay", TxBytes: 10, RxBytes: 5,
				Flows: map[string]int{"tcp_flows": 2, "icmp_echoes": 1}},
		},
		Transport: "tcp via proxy 10.9.9.9:3128", Fragmented: 2,
		TxBytesTotal: 1110, RxBytesTotal: 555,
		Drops:          map[string]uint64{"spoofed_source": 4, "session_queue_full": 0},
		Denied:         map[string]uint64{"policy": 2, "offer_refused": 1},
		Limited:        map[string]uint64{"tcp_flows": 7},
		Probes:         map[string]uint64{"sent": 9, "refused_loopback": 1},
		DNS:            map[string]uint64{"queries": 6, "answered": 5},
		TCPRetransmits: 12, RevocationSerial: 3,
	}
	m := statusCollector{func() Status { return st }}
	problems, err := testutil.CollectAndLint(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	want := `
# HELP nlvpn_agent_sessions Connected clients' sessions now, by path (direct, relay).
# TYPE nlvpn_agent_sessions gauge
nlvpn_agent_sessions{path="direct"} 1
nlvpn_agent_sessions{path="relay"} 1
# HELP nlvpn_agent_flows Flows the clients hold open at the agent now, by kind.
# TYPE nlvpn_agent_flows gauge
nlvpn_agent_flows{kind="dials"} 0
nlvpn_agent_flows{kind="icmp_echoes"} 1
nlvpn_agent_flows{kind="tcp_flows"} 5
nlvpn_agent_flows{kind="udp_flows"} 1
# HELP nlvpn_tunnel_transmit_bytes_total Bytes of IP packets sent into the tunnel, to all peers since start.
# TYPE nlvpn_tunnel_transmit_bytes_total counter
nlvpn_tunnel_transmit_bytes_total 1110
# HELP nlvpn_tunnel_receive_bytes_total Bytes of IP packets received from the tunnel, from all peers since start.
# TYPE nlvpn_tunnel_receive_bytes_total counter
nlvpn_tunnel_receive_bytes_total 555
# HELP nlvpn_packets_dropped_total Packets lost inside this node, by where (the names of ` + "`nlvpn status --json`" + ` drops).
# TYPE nlvpn_packets_dropped_total counter
nlvpn_packets_dropped_total{reason="session_queue_full"} 0
nlvpn_packets_dropped_total{reason="spoofed_source"} 4
# HELP nlvpn_agent_denied_total New flows the policy refused, and session offers refused, by reason.
# TYPE nlvpn_agent_denied_total counter
nlvpn_agent_denied_total{reason="offer_refused"} 1
nlvpn_agent_denied_total{reason="policy"} 2
# HELP nlvpn_agent_dns_total What the DNS forwarder for clients did, by event (the names of ` + "`nlvpn status --json`" + ` dns: queries, answered, nxdomain, cache_hits, timeouts, ...).
# TYPE nlvpn_agent_dns_total counter
nlvpn_agent_dns_total{event="answered"} 5
nlvpn_agent_dns_total{event="queries"} 6
# HELP nlvpn_gateway_connected 1 while connected to the gateway over this transport (udp, tcp, tcp_proxy), 0 otherwise.
# TYPE nlvpn_gateway_connected gauge
nlvpn_gateway_connected{transport="tcp"} 0
nlvpn_gateway_connected{transport="tcp_proxy"} 1
nlvpn_gateway_connected{transport="udp"} 0
# HELP nlvpn_agent_tcp_retransmits_total Segments the agent's netstack retransmitted on the flows it terminates.
# TYPE nlvpn_agent_tcp_retransmits_total counter
nlvpn_agent_tcp_retransmits_total 12
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "nlvpn_agent_sessions", "nlvpn_agent_flows",
		"nlvpn_tunnel_transmit_bytes_total", "nlvpn_tunnel_receive_bytes_total", "nlvpn_packets_dropped_total",
		"nlvpn_agent_denied_total", "nlvpn_agent_dns_total", "nlvpn_gateway_connected", "nlvpn_agent_tcp_retransmits_total"); err != nil {
		t.Error(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, s := range mf.GetMetric() {
			for _, lp := range s.GetLabel() {
				for _, secret := range []string{"deadbeef", "cafef00d", "alice", "bob", "198.18.0.7", "10.9.9.9"} {
					if strings.Contains(lp.GetValue(), secret) {
						t.Errorf("%s label %s=%q carries %q", mf.GetName(), lp.GetName(), lp.GetValue(), secret)
					}
				}
			}
		}
	}
}
