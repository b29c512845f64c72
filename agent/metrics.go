package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/nlvpn/nlvpn/metrics"
)

// The agent's metrics, read from Status at scrape time: the counters the
// agent keeps anyway, nothing counted twice on the hot path. Labels take
// the fixed names `nlvpn status` shows (reasons, kinds, paths); no
// session IDs, client names or addresses, which stay in `nlvpn status`.
var (
	descSessions = prometheus.NewDesc("nlvpn_agent_sessions",
		"Connected clients' sessions now, by path (direct, relay).", []string{"path"}, nil)
	descDenied = prometheus.NewDesc("nlvpn_agent_denied_total",
		"New flows the policy refused, and session offers refused, by reason.", []string{"reason"}, nil)
	descLimited = prometheus.NewDesc("nlvpn_agent_limited_total",
		"New flows, dials, echoes, DNS queries and gateway requests refused at a bound, by kind.", []string{"kind"}, nil)
	descFlows = prometheus.NewDesc("nlvpn_agent_flows",
		"Flows the clients hold open at the agent now, by kind.", []string{"kind"}, nil)
	descProbes = prometheus.NewDesc("nlvpn_agent_probes_total",
		"Hole-punch probes, by event (sent, refused_<reason>, limited_<budget>, wide round counts, ...).", []string{"event"}, nil)
	descDNS = prometheus.NewDesc("nlvpn_agent_dns_total",
		"What the DNS forwarder for clients did, by event (the names of `nlvpn status --json` dns: queries, answered, nxdomain, cache_hits, timeouts, ...).", []string{"event"}, nil)
	descFragmented = prometheus.NewDesc("nlvpn_agent_fragmented_packets_total",
		"IPv4 packets split for a session whose MTU is smaller than the netstack's (a client on a small path).", nil, nil)
	descTCPRetransmits = prometheus.NewDesc("nlvpn_agent_tcp_retransmits_total",
		"Segments the agent's netstack retransmitted on the flows it terminates.", nil, nil)
	descTCPTimeouts = prometheus.NewDesc("nlvpn_agent_tcp_timeouts_total",
		"Retransmission timeouts on the flows the agent's netstack terminates.", nil, nil)
	descRevocationSerial = prometheus.NewDesc("nlvpn_agent_revocation_serial",
		"Serial of the authority's revocation list in force (0: none).", nil, nil)
	descRevocationsRefused = prometheus.NewDesc("nlvpn_agent_revocations_refused_total",
		"Revocation lists from the gateway that did not verify.", nil, nil)
)

// flowKinds are the kinds a client's held flows are counted by.
var flowKinds = []string{"tcp_flows", "udp_flows", "dials", "icmp_echoes"}

// statusCollector is the agent's prometheus.Collector: each scrape reads
// status once.
type statusCollector struct{ status func() Status }

func (statusCollector) Describe(ch chan<- *prometheus.Desc) {
	metrics.DescribeNode(ch)
	for _, d := range []*prometheus.Desc{descSessions, descDenied, descLimited,
		descFlows, descProbes, descDNS, descFragmented, descTCPRetransmits, descTCPTimeouts, descRevocationSerial, descRevocationsRefused} {
		ch <- d
	}
}

func (c statusCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.status()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	byPath := map[string]int{"direct": 0, "relay": 0}
	flows := make(map[string]int, len(flowKinds))
	for _, k := range flowKinds {
		flows[k] = 0
	}
	for _, s := range st.Sessions {
		byPath[s.Path]++
		for _, k := range flowKinds {
			flows[k] += s.Flows[k]
		}
	}
	for p, n := range byPath {
		gauge(descSessions, float64(n), p)
	}
	for k, n := range flows {
		gauge(descFlows, float64(n), k)
	}
	metrics.CollectNode(ch, metrics.Node{TxBytes: st.TxBytesTotal, RxBytes: st.RxBytesTotal, Drops: st.Drops, Transport: st.Transport})
	for _, m := range []struct {
		d *prometheus.Desc
		m map[string]uint64
	}{{descDenied, st.Denied}, {descLimited, st.Limited}, {descProbes, st.Probes}, {descDNS, st.DNS}} {
		for k, v := range m.m {
			counter(m.d, v, k)
		}
	}
	counter(descFragmented, st.Fragmented)
	counter(descTCPRetransmits, st.TCPRetransmits)
	counter(descTCPTimeouts, st.TCPTimeouts)
	gauge(descRevocationSerial, float64(st.RevocationSerial))
	counter(descRevocationsRefused, st.RevocationsRefused)
}
