package platform

import (
	"errors"
	"net/netip"
)

// SplitDNS is what a TUN client asks of the system resolver: lookups of
// names under Domains (and only those) go to Server through the TUN
// device Interface.
type SplitDNS struct {
	Interface string
	Server    netip.Addr
	Domains   []string // wire.ValidDomain names
}

// ErrNoSplitDNS says the system has no resolver that can route lookups
// per domain here; the error's text says why, for the user.
var ErrNoSplitDNS = errors.New("split DNS is not available")
