package session

import "sync"

// Drops are a session's packets lost inside the node, by where.
type Drops struct {
	QueueFull     uint64 // Send/SendWait: the send queue was full
	TooLarge      uint64 // Send: a packet over the session's MTU
	SendFailed    uint64 // the connection was closing
	RxTooLarge    uint64 // a received datagram over wire.TunMTU
	QUICQueueFull uint64 // received packets quic-go's queue had no room for
	RxEarly       uint64 // received datagrams that overflowed the queue before Start
}

// Drops returns the session's drop counters now.
func (s *Session) Drops() Drops {
	st, qs := s.Stats(), s.Conn.ConnectionStats()
	return Drops{QueueFull: st.DropQueueFull, TooLarge: st.DropTooLarge, SendFailed: st.DropSend,
		RxTooLarge: st.DropRxTooLarge, QUICQueueFull: qs.PacketsDropped, RxEarly: qs.DatagramsDropped}
}

// Add adds o to d.
func (d *Drops) Add(o Drops) {
	d.QueueFull += o.QueueFull
	d.TooLarge += o.TooLarge
	d.SendFailed += o.SendFailed
	d.RxTooLarge += o.RxTooLarge
	d.QUICQueueFull += o.QUICQueueFull
	d.RxEarly += o.RxEarly
}

// Into writes d into m under the names `nlvpn status` shows.
func (d Drops) Into(m map[string]uint64) {
	m["session_queue_full"] = d.QueueFull
	m["session_too_large"] = d.TooLarge
	m["session_send_failed"] = d.SendFailed
	m["session_rx_too_large"] = d.RxTooLarge
	m["quic_queue_full"] = d.QUICQueueFull
	m["session_rx_early"] = d.RxEarly
}

// Ended keeps the drops and bytes of sessions that have ended, so that a
// node's totals (live sessions plus these) never go back when a session
// does.
type Ended struct {
	mu     sync.Mutex
	d      Drops
	tx, rx uint64
}

// Add records the final drops and bytes of a session that has ended.
func (e *Ended) Add(s *Session) {
	d, st := s.Drops(), s.Stats()
	e.mu.Lock()
	e.d.Add(d)
	e.tx += st.TxBytes
	e.rx += st.RxBytes
	e.mu.Unlock()
}

// Bytes returns the bytes the ended sessions sent and received.
func (e *Ended) Bytes() (tx, rx uint64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.tx, e.rx
}

// Total returns the ended sessions' drops.
func (e *Ended) Total() Drops {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.d
}
