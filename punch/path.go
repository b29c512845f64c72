package punch

import (
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// Fallback is the path a session takes while it has no direct path: the
// relay (nil: session.Conn's default), or, for a direct-only session, none.
func Fallback(mode string) session.Path {
	if mode == wire.ModeDirect {
		return Blackhole{}
	}
	return nil
}

// Blackhole is the path of a direct-only session before it has a direct
// path: nothing may go through the relay, so packets wait for QUIC to
// retransmit them once the direct path exists.
type Blackhole struct{}

// Send implements session.Path.
func (Blackhole) Send(uint64, []byte) error { return nil }
