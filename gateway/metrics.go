package gateway

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nlvpn/nlvpn/token"
)

// The gateway's metrics. Every value is read from counters the gateway
// keeps anyway, at scrape time: nothing is counted twice on the hot path.
// Labels take a fixed set of values (reasons, roles); no session IDs, node
// names or keys, which stay in /relay and the logs.
var (
	descRegistrations = prometheus.NewDesc("nlvpn_gateway_registrations_total",
		"Nodes admitted (a valid credential, welcomed), reconnections included.", nil, nil)
	descRegistrationsRefused = prometheus.NewDesc("nlvpn_gateway_registrations_refused_total",
		"Registrations answered with an error (bad or expired token, revoked, name in use, ...).", nil, nil)
	descRefused = prometheus.NewDesc("nlvpn_gateway_refused_total",
		"Connections turned away, or registered nodes' messages refused, by reason.", []string{"reason"}, nil)
	descRetries = prometheus.NewDesc("nlvpn_gateway_retries_total",
		"QUIC Retries demanded of new connections (many unauthenticated connections at once).", nil, nil)
	descUnauthenticated = prometheus.NewDesc("nlvpn_gateway_unauthenticated_connections",
		"Connections not yet registered now.", nil, nil)
	descNodes = prometheus.NewDesc("nlvpn_gateway_nodes",
		"Registered nodes connected now, by role.", []string{"role"}, nil)
	descTCPStreams = prometheus.NewDesc("nlvpn_gateway_tcp_streams",
		"Node connections over TCP/TLS (the fallback where UDP is blocked) now.", nil, nil)
	descTCPPackets = prometheus.NewDesc("nlvpn_gateway_tcp_packets_total",
		"Packets carried over TCP/TLS node connections, by direction (in, out).", []string{"direction"}, nil)
	descTCPDropped = prometheus.NewDesc("nlvpn_gateway_tcp_dropped_total",
		"Packets over TCP/TLS not sent, by reason (queue_full: the stream's write queue; no_stream: gone).", []string{"reason"}, nil)
	descTCPClosed = prometheus.NewDesc("nlvpn_gateway_tcp_closed_total",
		"TCP/TLS streams closed by the gateway, by reason (bad_frame, write_timeout).", []string{"reason"}, nil)
	descRelayFrames = prometheus.NewDesc("nlvpn_relay_frames_total",
		"Session frames the relay forwarded.", nil, nil)
	descRelayUDPFrames = prometheus.NewDesc("nlvpn_relay_udp_frames_total",
		"Of the forwarded frames, those sent as UDP datagrams (the rest in the node's gateway connection).", nil, nil)
	descRelayBytes = prometheus.NewDesc("nlvpn_relay_bytes_total",
		"Bytes of session frames the relay forwarded (end-to-end encrypted packets).", nil, nil)
	descRelayDropped = prometheus.NewDesc("nlvpn_relay_frames_dropped_total",
		"Session frames the relay did not forward, by reason.", []string{"reason"}, nil)
	descRelayChecks = prometheus.NewDesc("nlvpn_relay_checks_total",
		"Relay path checks from nodes, by result (answered, refused: not from a node's address).", []string{"result"}, nil)
	descRelayRoutes = prometheus.NewDesc("nlvpn_relay_routes",
		"Relay routes (client-agent sessions) now.", nil, nil)
	descRelaySyscalls = prometheus.NewDesc("nlvpn_relay_socket_calls_total",
		"System calls on the relay's frame socket, by direction (read: recvmmsg, write: sendmmsg); datagrams per call is what batching buys.", []string{"direction"}, nil)
	descRelayDatagrams = prometheus.NewDesc("nlvpn_relay_socket_datagrams_total",
		"Datagrams through the relay's frame socket, by direction (read, write).", []string{"direction"}, nil)

	// With --cluster only.
	descClusterConnected = prometheus.NewDesc("nlvpn_gateway_cluster_connected",
		"1 while the cluster's NATS is reachable, else 0.", nil, nil)
	descClusterOps = prometheus.NewDesc("nlvpn_gateway_cluster_kv_ops_total",
		"Reads and writes of the cluster's key-value buckets that went to NATS.", nil, nil)
	descClusterErrors = prometheus.NewDesc("nlvpn_gateway_cluster_kv_errors_total",
		"Of the cluster's key-value operations, those that failed.", nil, nil)
	descClusterDropped = prometheus.NewDesc("nlvpn_gateway_cluster_dropped_total",
		"Entries from the cluster not held: a bound hit, too large, or malformed.", nil, nil)
	descNameConflicts = prometheus.NewDesc("nlvpn_gateway_cluster_name_conflicts_total",
		"Agents let go here because another gateway held their name with another key (both admitted it while cut off from each other, the cluster's claim won).", nil, nil)
	descClusterPruned = prometheus.NewDesc("nlvpn_gateway_cluster_pruned_total",
		"Entries gone from the cluster's buckets because their token expired, by kind: directory (deleted by this gateway: the agent offline and its token expired a week ago), enrollment (expired in NATS with their token, dropped from this gateway's cache).", []string{"kind"}, nil)
	descRedirects = prometheus.NewDesc("nlvpn_gateway_redirects_total",
		"Connects answered agent_elsewhere: the agent is on another gateway of the cluster.", nil, nil)
)

// Describe sends the descriptions of the gateway's metrics
// (prometheus.Collector).
func (g *Gateway) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descRegistrations, descRegistrationsRefused, descRefused, descRetries,
		descUnauthenticated, descNodes, descTCPStreams, descTCPPackets, descTCPDropped, descTCPClosed, descRelayFrames, descRelayUDPFrames, descRelayBytes, descRelayDropped,
		descRelayChecks, descRelayRoutes, descRelaySyscalls, descRelayDatagrams, descClusterConnected, descClusterOps, descClusterErrors, descClusterDropped, descNameConflicts, descClusterPruned, descRedirects} {
		ch <- d
	}
}

// Collect reads the gateway's counters now (prometheus.Collector).
func (g *Gateway) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v int64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, float64(v), labels...)
	}
	counter(descRegistrations, g.registrations.Load())
	counter(descRegistrationsRefused, g.rejected.Load())
	for r := range numReasons {
		counter(descRefused, g.refusals[r].Load(), r.String())
	}
	counter(descRetries, g.adm.retries.Load())
	gauge(descUnauthenticated, int64(g.adm.unauthenticated()))
	gauge(descNodes, g.onlineAgents.Load(), token.RoleAgent)
	gauge(descNodes, g.onlineClients.Load(), token.RoleClient)

	ts := g.TCPStats()
	gauge(descTCPStreams, int64(g.tcpStreams()))
	counter(descTCPPackets, ts.PacketsIn, "in")
	counter(descTCPPackets, ts.PacketsOut, "out")
	counter(descTCPDropped, ts.DropQueueFull, "queue_full")
	counter(descTCPDropped, ts.DropNoStream, "no_stream")
	counter(descTCPClosed, ts.BadFrames, "bad_frame")
	counter(descTCPClosed, ts.WriteTimeouts, "write_timeout")

	s := g.hub.Counters()
	counter(descRelayFrames, s.Frames)
	counter(descRelayUDPFrames, s.UDPFrames)
	counter(descRelayBytes, s.Bytes)
	for _, d := range []struct {
		reason string
		n      uint64
	}{{"unknown_session", s.DropUnknown}, {"not_endpoint", s.DropNotEndpoint}, {"queue_full", s.DropQueueFull},
		{"unfair", s.DropUnfair}, {"malformed", s.DropMalformed}, {"send_failed", s.DropSendFailed}} {
		counter(descRelayDropped, d.n, d.reason)
	}
	counter(descRelayChecks, s.ChecksAnswered, "answered")
	counter(descRelayChecks, s.ChecksRefused, "refused")
	gauge(descRelayRoutes, int64(s.Routes))
	if bio := g.frameIO.Load(); bio != nil {
		io := bio.Stats()
		counter(descRelaySyscalls, io.ReadCalls, "read")
		counter(descRelaySyscalls, io.WriteCalls, "write")
		counter(descRelayDatagrams, io.ReadDatagrams, "read")
		counter(descRelayDatagrams, io.WriteDatagrams, "write")
	}

	if c := g.clusterNow(); c != nil {
		cs := c.Stats()
		up := int64(0)
		if cs.Connected {
			up = 1
		}
		gauge(descClusterConnected, up)
		counter(descClusterOps, cs.KVOps)
		counter(descClusterErrors, cs.KVErrors)
		counter(descClusterDropped, cs.Dropped)
		counter(descNameConflicts, cs.NamesLost)
		counter(descClusterPruned, cs.DirectoryPruned, "directory")
		counter(descClusterPruned, cs.EnrollmentsExpired, "enrollment")
		counter(descRedirects, g.redirects.Load())
	}
}

// nodeOnline counts a registered node of role as connected until the
// returned func runs.
func (g *Gateway) nodeOnline(role string) (gone func()) {
	g.registrations.Add(1)
	n := &g.onlineClients
	if role == token.RoleAgent {
		n = &g.onlineAgents
	}
	n.Add(1)
	return func() { n.Add(-1) }
}

// RelayHandler serves the relay's counters as JSON, per session too (IDs,
// node names and relayed bytes), so anyone can check the relay went quiet
// after a switch to a direct path. It shows byte counts and names only,
// never traffic.
func (g *Gateway) RelayHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(g.hub.Stats())
	})
}

// Healthy reports whether the gateway serves: its QUIC listener is open
// and accepting connections.
func (g *Gateway) Healthy() error {
	if !g.serving.Load() {
		return errors.New("the gateway is not listening")
	}
	return nil
}
