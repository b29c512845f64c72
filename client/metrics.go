package client

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// The client's metrics, read from Status at scrape time: the counters the
// client keeps anyway, nothing counted twice on the hot path. Labels take
// fixed names only (paths, drop reasons); no session ID or address, which
// stay in `nlvpn status`.
var (
	descTxBytes = prometheus.NewDesc("nlvpn_tunnel_transmit_bytes_total",
		"Bytes of IP packets sent into the tunnel, to all peers since start.", nil, nil)
	descRxBytes = prometheus.NewDesc("nlvpn_tunnel_receive_bytes_total",
		"Bytes of IP packets received from the tunnel, from all peers since start.", nil, nil)
	descDropped = prometheus.NewDesc("nlvpn_packets_dropped_total",
		"Packets lost inside this node, by where (the names of `nlvpn status --json` drops).", []string{"reason"}, nil)
	descPath = prometheus.NewDesc("nlvpn_client_path",
		"1 for the path the tunnel uses now (direct, relay; none while a direct-only tunnel has none), 0 for the others.", []string{"path"}, nil)
	descRTT = prometheus.NewDesc("nlvpn_client_rtt_seconds",
		"Smoothed round-trip time of the session with the agent.", nil, nil)
	descRelayUDP = prometheus.NewDesc("nlvpn_client_relay_udp",
		"1 while relay frames go as UDP datagrams to the gateway's port, 0 while they ride the gateway connection.", nil, nil)
	descGatewayConnected = prometheus.NewDesc("nlvpn_gateway_connected",
		"1 while connected to the gateway over this transport (udp, tcp, tcp_proxy), 0 otherwise.", []string{"transport"}, nil)
	descInboundRefused = prometheus.NewDesc("nlvpn_client_inbound_refused_total",
		"Packets from the tunnel refused: not part of a connection this machine opened (TUN mode without --accept-inbound).", nil, nil)
	descProbesRefused = prometheus.NewDesc("nlvpn_client_probes_refused_total",
		"The agent's hole-punch candidates this client would not probe.", nil, nil)
)

// transports are the values of nlvpn_gateway_connected's label.
var transports = []string{"udp", "tcp", "tcp_proxy"}

// transportOf names Status.Transport ("udp", "tcp", "tcp via proxy
// HOST:PORT", "") by a label value, without the proxy's address.
func transportOf(s string) string {
	if strings.HasPrefix(s, "tcp via proxy") {
		return "tcp_proxy"
	}
	return s
}

// paths are the values of nlvpn_client_path's label.
var paths = []string{"direct", "relay", "none"}

// statusCollector is the client's prometheus.Collector: each scrape reads
// status once.
type statusCollector struct{ status func() Status }

func (statusCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTxBytes, descRxBytes, descDropped, descPath, descRTT, descRelayUDP,
		descGatewayConnected, descInboundRefused, descProbesRefused} {
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
	counter(descTxBytes, st.TxBytesTotal)
	counter(descRxBytes, st.RxBytesTotal)
	for k, v := range st.Drops {
		counter(descDropped, v, k)
	}
	for _, p := range paths {
		gauge(descPath, b2f(st.Path == p), p)
	}
	gauge(descRTT, st.RTTMillis/1000)
	gauge(descRelayUDP, b2f(st.RelayUDP))
	for _, k := range transports {
		gauge(descGatewayConnected, b2f(transportOf(st.Transport) == k), k)
	}
	counter(descInboundRefused, st.InboundRefused)
	counter(descProbesRefused, st.ProbesRefused)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
