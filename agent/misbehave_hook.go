package agent

import (
	"log/slog"
	"net/netip"

	"github.com/nlvpn/nlvpn/session"
)

// misbehave is nil in every real build. A test build (-tags
// nlvpn_misbehave, misbehave.go) sets it to play a compromised agent: it
// runs once per client session, as soon as the client has connected, with
// the session and the client's overlay address.
var misbehave func(a *Agent, s *session.Session, client netip.Addr, log *slog.Logger)
