package agent

import (
	"net/netip"

	"github.com/nlvpn/nlvpn/netstack"
	"github.com/nlvpn/nlvpn/status"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// Status is what `nlvpn status --json --state-dir AGENT-STATE` prints for a
// running agent. Scripts (and `make bench`) rely on these names.
type Status struct {
	Role     string          `json:"role"` // "agent"
	Name     string          `json:"name"`
	Sessions []SessionStatus `json:"sessions"`
	// Transport is how the agent reaches the gateway: "udp", "tcp" or
	// "tcp via proxy HOST:PORT"; empty while disconnected.
	Transport string `json:"transport"`
	// Egress is how clients' packets reach the LAN: "netstack", or
	// "routed via DEVICE" (Config.Routed).
	Egress string `json:"egress"`
	// TxBytesTotal and RxBytesTotal count the tunnel's bytes to and from
	// all clients since start, ended sessions included.
	TxBytesTotal uint64 `json:"tx_bytes_total"`
	RxBytesTotal uint64 `json:"rx_bytes_total"`
	// Drops counts packets lost inside the agent, by where.
	Drops map[string]uint64 `json:"drops"`
	// Denied counts new flows (TCP SYNs, UDP datagrams, ICMP echoes) the
	// policy refused, by reason: not_advertised, loopback, host_address,
	// link_local, policy; and offer_refused, session offers refused (a
	// client credential that does not hold, another client's address),
	// offers_full, offers refused because too many were pending.
	Denied map[string]uint64 `json:"denied"`
	// Limited counts new flows, dials, echoes and DNS queries refused
	// because a client's or the agent's bound was hit (all clients, since
	// start): tcp_flows, udp_flows, dials, icmp_echoes, dns_queries (a
	// client's bound), dns_queries_all_clients (the agent's); and
	// gateway_requests, the gateway's requests answered "busy"; with
	// Routed, routed_connections and routed_connections_all_clients (new
	// connections over a client's or all clients' bound).
	Limited map[string]uint64 `json:"limited"`
	// DNS counts what the DNS forwarder for clients did (dnsfwd.Stats):
	// queries, answered, nxdomain, servfail, other_rcode, notimp,
	// malformed, cache_hits, coalesced, cache_evicted, truncated, timeouts and
	// mismatched (resolver replies dropped: wrong ID or question).
	DNS map[string]uint64 `json:"dns"`
	// Probes counts hole-punch probes: sent, refused_<reason> (candidates
	// the agent will not probe: loopback, link_local, foreign_private, ...),
	// limited_<budget> (probes not sent because a rate bound was hit) and
	// stopped_gone.
	Probes map[string]uint64 `json:"probes"`
	// RevocationSerial is the serial of the authority's revocation list in
	// force (0: none); RevocationsRefused counts lists from the gateway
	// that did not verify.
	RevocationSerial   uint64 `json:"revocation_serial"`
	RevocationsRefused uint64 `json:"revocations_refused"`
	// TCPRetransmits and TCPTimeouts count the netstack's loss recovery for
	// the flows it terminates (all clients).
	TCPRetransmits uint64 `json:"tcp_retransmits"`
	TCPTimeouts    uint64 `json:"tcp_timeouts"`
	// TCP is the netstack's TCP sender counters in detail: segments_sent,
	// retransmits, timeouts, fast_recovery, sack_recovery, tlp_recovery,
	// fast_retransmit, slow_start_retransmits, spurious_recovery,
	// spurious_rto_recovery, dsack_acked_segments, and ours:
	// syn_restamped, syn_stamps_forgotten (netstack/synstamp.go).
	TCP map[string]uint64 `json:"tcp"`
	// UDPSize is the agent's UDP size (its path MTU less headers);
	// Fragmented counts IPv4 packets split for a session whose MTU is
	// smaller than the netstack's (a client on a small path).
	UDPSize    int    `json:"udp_size"`
	Fragmented uint64 `json:"fragmented"`
}

// SessionStatus is one connected client.
type SessionStatus struct {
	Client          string  `json:"client"`
	Session         string  `json:"session"`
	Path            string  `json:"path"` // "direct" or "relay"
	Remote          string  `json:"remote,omitempty"`
	RTTMillis       float64 `json:"rtt_ms"`
	TxBytes         uint64  `json:"tx_bytes"`
	RxBytes         uint64  `json:"rx_bytes"`
	MTU             int     `json:"mtu"` // the session's: the largest IP packet it carries
	QUICPacketsSent uint64  `json:"quic_packets_sent"`
	QUICPacketsLost uint64  `json:"quic_packets_lost"`
	// Flows is what this client holds at the agent now: tcp_flows,
	// udp_flows, dials, icmp_echoes. Limited is how often its own bounds
	// were hit while it held something, by the same names.
	Flows   map[string]int    `json:"flows"`
	Limited map[string]uint64 `json:"limited,omitempty"`
}

// Status reports the agent's sessions and drop counters now.
func (a *Agent) Status() Status {
	st := Status{Role: "agent", Transport: a.u.Ctrl.Transport(), Fragmented: a.fragmented.Load()}
	if a.u.Ctrl != nil {
		st.UDPSize = a.u.Ctrl.UDPSize()
	}
	if w := a.u.Ctrl.Welcome(); w != nil {
		st.Name = w.Name
	}
	a.mu.Lock()
	type entry struct {
		cs *clientState
		d  *underlay.Direct
	}
	var es []entry
	for _, cs := range a.byClient {
		es = append(es, entry{cs, a.punches[cs.sess.ID]})
	}
	// Totals over running and ended sessions, read under mu: a session
	// moves from one to the other under it.
	drops := a.ended.Total()
	st.TxBytesTotal, st.RxBytesTotal = a.ended.Bytes()
	for s := range a.running {
		ss := s.Stats()
		st.TxBytesTotal += ss.TxBytes
		st.RxBytesTotal += ss.RxBytes
		drops.Add(s.Drops())
	}
	a.mu.Unlock()
	held := make(map[netip.Addr]netstack.EgressClient)
	for _, c := range a.eg.Clients() {
		held[c.Addr] = c
	}
	for _, e := range es {
		s := e.cs.sess
		ss := s.Stats()
		cs := s.Conn.ConnectionStats()
		one := SessionStatus{Client: e.cs.offer.PeerName, Session: wire.SessionID(s.ID), Path: "relay",
			RTTMillis: float64(cs.SmoothedRTT.Microseconds()) / 1000, TxBytes: ss.TxBytes, RxBytes: ss.RxBytes, MTU: s.MTU(),
			QUICPacketsSent: cs.PacketsSent, QUICPacketsLost: cs.PacketsLost}
		if c, ok := held[e.cs.offer.PeerAddr.Unmap()]; ok {
			one.Flows, one.Limited = c.Held, c.Limited
		}
		if e.d != nil {
			if remote, _, ok := e.d.Remote(); ok {
				one.Path, one.Remote = "direct", remote.String()
			}
		}
		st.Sessions = append(st.Sessions, one)
	}
	st.Drops = a.u.Drops()
	drops.Into(st.Drops)
	for k, v := range map[string]uint64{
		"spoofed_source": a.dropSpoofed.Load(),
		"no_session":     a.dropNoSession.Load(),
		"unoffered_conn": a.dropUnoffered.Load(),
	} {
		st.Drops[k] = v
	}
	for k, v := range a.eg.StackDrops() {
		st.Drops[k] = v
	}
	st.TCPRetransmits, st.TCPTimeouts = a.eg.StackRecovery()
	st.TCP = a.eg.StackTCP()
	st.Denied = a.denied.snapshot()
	st.Limited = a.eg.Limited()
	st.Egress = "netstack"
	if r := a.rt; r != nil {
		st.Egress = "routed via " + r.dev.Name()
		st.Drops["routed_unsupported"] = r.unsupported.Load()
		st.Drops["routed_tun_write"] = r.w.Drops()
		st.Drops["routed_fragment_denied"] = r.laterDenied.Load()
		if d, err := r.fw.Drops(); err == nil {
			st.Drops["routed_lan_started"] = d.LANStarted
			st.Drops["routed_invalid"] = d.Invalid
			st.Drops["routed_to_host"] = d.ToHost
			st.Limited["routed_connections"] = d.PeerLimit
			st.Limited["routed_connections_all_clients"] = d.TotalLimit
		}
	}
	dns := a.dns.Stats()
	st.Limited["dns_queries"] = dns.ClientLimited
	st.Limited["dns_queries_all_clients"] = dns.Dropped
	st.Drops["dns_mismatched_replies"] = dns.Mismatched
	st.Drops["dns_unread_answers"] = dns.Unread
	st.DNS = map[string]uint64{
		"queries": dns.Queries, "answered": dns.Answered, "nxdomain": dns.NXDomain, "servfail": dns.ServFail,
		"other_rcode": dns.Other, "notimp": dns.NotImpl, "malformed": dns.Malformed, "cache_hits": dns.CacheHits, "coalesced": dns.Coalesced,
		"cache_evicted": dns.CacheEvicted, "truncated": dns.Truncated, "timeouts": dns.Timeouts, "mismatched": dns.Mismatched,
	}
	st.Limited["gateway_requests"] = a.u.Ctrl.RequestsBusy()
	st.Probes = a.probes.snapshot()
	if rs := a.revoked.Load(); rs != nil {
		st.RevocationSerial = rs.Serial
	}
	st.RevocationsRefused = a.revocationsRefused.Load()
	return st
}

func (a *Agent) serveStatus(path string) (stop func(), err error) {
	return status.Serve(path, func() any { return a.Status() })
}
