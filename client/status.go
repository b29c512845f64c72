package client

import (
	"time"

	"github.com/nlvpn/nlvpn/status"
	"github.com/nlvpn/nlvpn/wire"
)

// Status is what `nlvpn status --json` prints. Scripts rely on these names.
type Status struct {
	Role         string  `json:"role"` // "client"
	Agent        string  `json:"agent"`
	Path         string  `json:"path"`   // "direct" or "relay" ("none" while a direct-only tunnel has no path)
	Remote       string  `json:"remote"` // the peer's direct address, or the gateway's
	RTTMillis    float64 `json:"rtt_ms"`
	TxBytes      uint64  `json:"tx_bytes"`
	RxBytes      uint64  `json:"rx_bytes"`
	SinceSwitchS float64 `json:"since_switch_s"`
	Session      string  `json:"session,omitempty"`
	// MTU is the session's: the largest IP packet the tunnel carries (the
	// TUN device's MTU follows it). UDPSize is this node's UDP size (its
	// path MTU less headers, learned or --mtu).
	MTU        int    `json:"mtu,omitempty"`
	UDPSize    int    `json:"udp_size"`
	DropsQueue uint64 `json:"drops_queue_full"`
	// Where packets were lost, for diagnosing throughput: by the peer
	// connection (QUIC's own count), and in our queues.
	QUICPacketsSent uint64 `json:"quic_packets_sent"`
	QUICPacketsLost uint64 `json:"quic_packets_lost"`
	QUICCwnd        uint64 `json:"quic_cwnd"`
	DropsInbound    uint64 `json:"drops_inbound"`
	DropsTUNWrite   uint64 `json:"drops_tun_write"`
	DropsForeign    uint64 `json:"drops_foreign"` // from the agent, not from its addresses
	// Drops counts packets lost inside the client, by where (the fields
	// above and the node port's own counters).
	Drops map[string]uint64 `json:"drops"`
	// Transport is how the client reaches the gateway: "udp", "tcp" or
	// "tcp via proxy HOST:PORT"; empty while disconnected.
	Transport string `json:"transport"`
	// RelayUDP says relay frames go as UDP datagrams to the gateway's port
	// (false: in the gateway connection, the fallback).
	RelayUDP bool `json:"relay_udp"`
	// InboundRefused counts packets from the tunnel that were not part of
	// a connection this machine opened (TUN mode, without --accept-inbound).
	InboundRefused uint64 `json:"inbound_refused"`
	// ProbesRefused counts the agent's hole-punch candidates this client
	// did not probe: not the agent's public address nor on this machine's
	// LAN (loopback, link-local, other networks' private addresses, ...).
	ProbesRefused uint64 `json:"probes_refused"`
	// TxBytesTotal and RxBytesTotal count since start, over every session
	// (tx_bytes and rx_bytes: the current one's).
	TxBytesTotal uint64 `json:"tx_bytes_total"`
	RxBytesTotal uint64 `json:"rx_bytes_total"`
}

// Status reports the tunnel's state now.
func (c *Client) Status() Status {
	c.pmu.Lock()
	ps := c.path
	c.pmu.Unlock()
	if gw := c.u.Ctrl.Gateway(); ps.kind == "relay" && gw != "" {
		ps.remote = gw // the gateway the node is on now (it may have moved)
	}
	st := Status{Role: "client", Agent: c.cfg.Agent, Path: ps.kind, Remote: ps.remote, SinceSwitchS: time.Since(ps.since).Seconds()}
	c.tmu.Lock()
	s := c.cur.Load()
	drops := c.ended.Total()
	st.TxBytesTotal, st.RxBytesTotal = c.ended.Bytes()
	if s != nil {
		ss := s.Stats()
		st.TxBytesTotal += ss.TxBytes
		st.RxBytesTotal += ss.RxBytes
		drops.Add(s.Drops())
	}
	c.tmu.Unlock()
	if s != nil {
		ss := s.Stats()
		st.TxBytes, st.RxBytes, st.DropsQueue = ss.TxBytes, ss.RxBytes, ss.DropQueueFull
		cs := s.Conn.ConnectionStats()
		st.RTTMillis = float64(cs.SmoothedRTT.Microseconds()) / 1000
		st.QUICPacketsSent, st.QUICPacketsLost, st.QUICCwnd = cs.PacketsSent, cs.PacketsLost, cs.CongestionWindow
		st.Session = wire.SessionID(s.ID)
		st.MTU = s.MTU()
	}
	if c.u.Ctrl != nil {
		st.UDPSize = c.u.Ctrl.UDPSize()
	}
	st.DropsInbound, _ = c.u.Conn.Drops()
	st.DropsForeign = c.dropForeign.Load()
	st.ProbesRefused = c.probesRefused.Load()
	if c.tunw != nil {
		st.DropsTUNWrite = c.tunw.Drops()
	}
	if c.inbound != nil {
		st.InboundRefused, _ = c.inbound.Refused()
	}
	st.Drops = c.u.Drops()
	drops.Into(st.Drops)
	st.Drops["tun_write"] = st.DropsTUNWrite
	st.Drops["foreign_source"] = st.DropsForeign
	if c.stackDrops != nil {
		for k, v := range c.stackDrops() {
			st.Drops[k] = v
		}
	}
	st.RelayUDP = c.u.RelayOverUDP()
	st.Transport = c.u.Ctrl.Transport()
	return st
}

// serveStatus serves Status on the unix socket at path (see package status).
func (c *Client) serveStatus(path string) (stop func(), err error) {
	return status.Serve(path, func() any { return c.Status() })
}
