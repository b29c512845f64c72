package client

import (
	"encoding/json"
	"errors"
	"net"
	"os"
	"time"

	"github.com/nlvpn/nlvpn/wire"
)

// Status is what `nlvpn status --json` prints. Scripts rely on these names.
type Status struct {
	Agent        string  `json:"agent"`
	Path         string  `json:"path"`   // "direct" or "relay" ("none" while a direct-only tunnel has no path)
	Remote       string  `json:"remote"` // the peer's direct address, or the gateway's
	RTTMillis    float64 `json:"rtt_ms"`
	TxBytes      uint64  `json:"tx_bytes"`
	RxBytes      uint64  `json:"rx_bytes"`
	SinceSwitchS float64 `json:"since_switch_s"`
	Session      string  `json:"session,omitempty"`
	DropsQueue   uint64  `json:"drops_queue_full"`
	// Where packets were lost, for diagnosing throughput: by the peer
	// connection (QUIC's own count), and in our queues.
	QUICPacketsSent uint64 `json:"quic_packets_sent"`
	QUICPacketsLost uint64 `json:"quic_packets_lost"`
	QUICCwnd        uint64 `json:"quic_cwnd"`
	DropsInbound    uint64 `json:"drops_inbound"`
	DropsTUNWrite   uint64 `json:"drops_tun_write"`
	DropsForeign    uint64 `json:"drops_foreign"` // from the agent, not from its addresses
}

// Status reports the tunnel's state now.
func (c *Client) Status() Status {
	c.pmu.Lock()
	ps := c.path
	c.pmu.Unlock()
	st := Status{Agent: c.cfg.Agent, Path: ps.kind, Remote: ps.remote, SinceSwitchS: time.Since(ps.since).Seconds()}
	if s := c.cur.Load(); s != nil {
		ss := s.Stats()
		st.TxBytes, st.RxBytes, st.DropsQueue = ss.TxBytes, ss.RxBytes, ss.DropQueueFull
		cs := s.Conn.ConnectionStats()
		st.RTTMillis = float64(cs.SmoothedRTT.Microseconds()) / 1000
		st.QUICPacketsSent, st.QUICPacketsLost, st.QUICCwnd = cs.PacketsSent, cs.PacketsLost, cs.CongestionWindow
		st.Session = wire.SessionID(s.ID)
	}
	st.DropsInbound, _ = c.u.Conn.Drops()
	st.DropsForeign = c.dropForeign.Load()
	if c.tunw != nil {
		st.DropsTUNWrite = c.tunw.Drops()
	}
	return st
}

// serveStatus answers each connection on a unix socket with one JSON
// Status. The socket is 0600 (in a 0700 state directory): only this user
// can read it.
func (c *Client) serveStatus(path string) (stop func(), err error) {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		// A stale socket from a run that was killed; a live one would answer.
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return nil, errors.New("another nlvpn up is already running with this state directory (" + path + ")")
		}
		os.Remove(path)
	}
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, err
	}
	os.Chmod(path, 0o600)
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conn.SetWriteDeadline(time.Now().Add(2 * time.Second))
			json.NewEncoder(conn).Encode(c.Status())
			conn.Close()
		}
	}()
	return func() { ln.Close(); os.Remove(path) }, nil
}
