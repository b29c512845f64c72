package client

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/nlvpn/nlvpn/metrics"
)

// The client's metrics, read from Status at scrape time: the counters the
// client keeps anyway, nothing counted twice on the hot path. Labels take
// fixed names only (paths, drop reasons); no session ID or address, which
// stay in `nlvpn status`.
var (
	descPath = prometheus.NewDesc("nlvpn_client_path",
		"1 for the path the tunnel uses now (direct, relay; none while a direct-only tunnel has none), 0 for the others.", []string{"path"}, nil)
	descRTT = prometheus.NewDesc("nlvpn_client_rtt_seconds",
		"Smoothed round-trip time of the session with the agent.", nil, nil)
	descRelayUDP = prometheus.NewDesc("nlvpn_client_relay_udp",
		"1 while relay frames go as UDP datagrams to the gateway's port, 0 while they ride the gateway connection.", nil, nil)
	descInboundRefused = prometheus.NewDesc("nlvpn_client_inbound_refused_total",
		"Packets from the tunnel refused: not part of a connection this machine opened (TUN mode without --accept-inbound).", nil, nil)
	descProbesRefused = prometheus.NewDesc("nlvpn_client_probes_refused_total",
		"The agent's hole-punch candidates this client would not probe.", nil, nil)
)

// paths are the values of nlvpn_client_path's label.
var paths = []string{"direct", "relay", "none"}

// statusCollector is the client's prometheus.Collector: each scrape reads
// status once.
type statusCollector struct{ status func() Status }

func (statusCollector) Describe(ch chan<- *prometheus.Desc) {
	metrics.DescribeNode(ch)
	for _, d := range []*prometheus.Desc{descPath, descRTT, descRelayUDP, descInboundRefused, descProbesRefused} {
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
	metrics.CollectNode(ch, metrics.Node{TxBytes: st.TxBytesTotal, RxBytes: st.RxBytesTotal, Drops: st.Drops, Transport: st.Transport})
	for _, p := range paths {
		gauge(descPath, metrics.B2F(st.Path == p), p)
	}
	gauge(descRTT, st.RTTMillis/1000)
	gauge(descRelayUDP, metrics.B2F(st.RelayUDP))
	counter(descInboundRefused, st.InboundRefused)
	counter(descProbesRefused, st.ProbesRefused)
}
