package metrics

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics every node (agent, client) exports alike, from the same
// fields of its status: one definition, so the names and help never drift.
var (
	descTxBytes = prometheus.NewDesc("nlvpn_tunnel_transmit_bytes_total",
		"Bytes of IP packets sent into the tunnel, to all peers since start.", nil, nil)
	descRxBytes = prometheus.NewDesc("nlvpn_tunnel_receive_bytes_total",
		"Bytes of IP packets received from the tunnel, from all peers since start.", nil, nil)
	descDropped = prometheus.NewDesc("nlvpn_packets_dropped_total",
		"Packets lost inside this node, by where (the names of `nlvpn status --json` drops).", []string{"reason"}, nil)
	descGatewayConnected = prometheus.NewDesc("nlvpn_gateway_connected",
		"1 while connected to the gateway over this transport (udp, tcp, tcp_proxy), 0 otherwise.", []string{"transport"}, nil)
)

// transports are the values of nlvpn_gateway_connected's label.
var transports = []string{"udp", "tcp", "tcp_proxy"}

// Node is what a node's status says that every node exports alike.
type Node struct {
	TxBytes, RxBytes uint64
	Drops            map[string]uint64
	Transport        string // status' transport: "udp", "tcp", "tcp via proxy HOST:PORT", "" while disconnected
}

// DescribeNode sends the descriptions of Node's metrics.
func DescribeNode(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTxBytes, descRxBytes, descDropped, descGatewayConnected} {
		ch <- d
	}
}

// CollectNode sends n's metrics. The proxy's address never becomes a
// label value: a transport through a proxy is "tcp_proxy".
func CollectNode(ch chan<- prometheus.Metric, n Node) {
	ch <- prometheus.MustNewConstMetric(descTxBytes, prometheus.CounterValue, float64(n.TxBytes))
	ch <- prometheus.MustNewConstMetric(descRxBytes, prometheus.CounterValue, float64(n.RxBytes))
	for k, v := range n.Drops {
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(v), k)
	}
	now := n.Transport
	if strings.HasPrefix(now, "tcp via proxy") {
		now = "tcp_proxy"
	}
	for _, k := range transports {
		ch <- prometheus.MustNewConstMetric(descGatewayConnected, prometheus.GaugeValue, B2F(now == k), k)
	}
}

// B2F is a gauge's value for a condition.
func B2F(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
