package underlay

import "github.com/nlvpn/nlvpn/udpbatch"

// Drops returns the port's drop counters by name, for status output: what
// arrived and had nowhere to go, and what could not be sent.
func (u *Underlay) Drops() map[string]uint64 {
	inFull, sendFailed := u.Conn.Drops()
	var relayIn, relayOut uint64
	if u.Ctrl != nil {
		relayIn, relayOut = u.Ctrl.RelayDrops()
	}
	d := map[string]uint64{
		"frame_unknown_session":  u.c.unknown.Load(),
		"frame_malformed":        u.c.malformed.Load(),
		"frame_not_from_gateway": u.c.foreign.Load(),
		"frame_quic_misrouted":   u.c.misrouted.Load(),
		"frame_queue_full":       u.c.sendFull.Load(),
		"conn_inbound_full":      inFull,
		"path_send_failed":       sendFailed,
		"relay_datagram_bad":     relayIn,
		"relay_datagram_full":    relayOut,
	}
	if u.w != nil {
		d["udp_send_failed"] = u.bio.Stats().WriteErrors
	}
	return d
}

// IOStats returns the frame socket's system call counters (zero without
// the frame socket).
func (u *Underlay) IOStats() udpbatch.Stats {
	if u.bio == nil {
		return udpbatch.Stats{}
	}
	return u.bio.Stats()
}
