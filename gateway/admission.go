package gateway

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/tcplink"
)

// Defaults for the limits on unauthenticated connections (Config's
// MaxUnauthPerSource, MaxUnauth, RetryAbove), sized for a small server: an
// honest node needs one unauthenticated connection for a few round trips,
// and a whole fleet reconnecting after a gateway restart is spread over
// seconds by the nodes' jittered backoff.
const (
	DefaultMaxUnauthPerSource = 16
	DefaultMaxUnauth          = 1024
	DefaultRetryAbove         = 64
)

// What a stranger can make the gateway hold, and for how long.
//
// A connection is unauthenticated from its first Initial packet (quic-go's
// ConnContext, before any TLS work) until its hello is verified and the
// node admitted in serve. Bounded here:
//   - connections in that state, per source address and in total: beyond
//     either limit quic-go answers CONNECTION_REFUSED, a stateless packet
//     smaller than the Initial it answers, and forgets the attempt;
//   - unproven source addresses: once RetryAbove connections are
//     unauthenticated, or the source is at its limit, a new connection must
//     first echo a Retry token (stateless, again smaller than the Initial),
//     so spoofed sources cannot hold handshakes at all then;
//   - how long: the TLS handshake by quic-go's handshake timeout
//     (2 × HandshakeIdleTimeout of control.QUICConfig), then helloTimeout
//     from accept for the control stream and the hello, then at most
//     refuseLinger for a refusal to reach the node.
//
// Not bounded here: packets that never make a connection (quic-go drops
// Initials beyond its own queue of 1,024 unprocessed packets and Retry or
// refusal replies beyond its send queues), and the CPU of the TLS
// handshakes themselves within these limits.
type admission struct {
	perSource, total, retryAbove int

	on func(r reason, from net.Addr) // a refusal, for the gateway's counters and log

	mu  sync.Mutex
	n   int                        // unauthenticated connections
	src map[netip.Prefix]*srcCount // by source

	retries atomic.Uint64 // Retries demanded
}

// srcCount is one source's unauthenticated connections. Pending ones have
// not proven their address yet (no Retry token, handshake not complete):
// they may be spoofed, so they only ever cost a source the Retry, never a
// proven connection its admission (see admit).
type srcCount struct{ pending, proven int }

func newAdmission(cfg Config, on func(reason, net.Addr)) *admission {
	a := &admission{perSource: cfg.MaxUnauthPerSource, total: cfg.MaxUnauth, retryAbove: cfg.RetryAbove,
		src: make(map[netip.Prefix]*srcCount), on: on}
	if a.perSource <= 0 {
		a.perSource = DefaultMaxUnauthPerSource
	}
	if a.total <= 0 {
		a.total = DefaultMaxUnauth
	}
	if a.retryAbove == 0 {
		a.retryAbove = DefaultRetryAbove
	}
	return a
}

// sourceOf is the unit a per-source limit counts: an IPv4 address, or an
// IPv6 /64, since one host is routinely given a whole /64 and could
// otherwise use a fresh address for every connection.
func sourceOf(addr net.Addr) netip.Prefix {
	var ip netip.Addr
	switch a := addr.(type) {
	case *net.UDPAddr:
		ip = a.AddrPort().Addr()
	case tcplink.Addr:
		ip = a.TCP().Addr()
	default:
		return netip.Prefix{}
	}
	ip = ip.Unmap().WithZone("")
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

// needRetry is the transport's VerifySourceAddress: called for an Initial
// without a valid token, it says whether to answer with a Retry instead of
// starting a handshake.
func (a *admission) needRetry(addr net.Addr) bool {
	if _, ok := addr.(tcplink.Addr); ok {
		return false // TCP's handshake proved the address already
	}
	s := sourceOf(addr)
	a.mu.Lock()
	retry := a.n >= a.retryAbove
	if c := a.src[s]; c != nil && c.pending+c.proven >= a.perSource {
		// Only a source that proves its address may try for a slot at its
		// limit (and one that proves it is refused there, in admit, unless
		// spoofed attempts hold the slots).
		retry = true
	}
	a.mu.Unlock()
	if retry {
		a.retries.Add(1)
	}
	return retry
}

var (
	errTooManyFromSource = errors.New("too many unauthenticated connections from this source")
	errTooMany           = errors.New("too many unauthenticated connections")
)

// admit is the transport's ConnContext: it takes a slot for the new
// connection, or refuses it. The slot goes back when the connection
// closes or its node is admitted (ticket.release).
func (a *admission) admit(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
	s := sourceOf(ci.RemoteAddr)
	verified := ci.AddrVerified
	if _, ok := ci.RemoteAddr.(tcplink.Addr); ok {
		verified = true // by TCP's handshake
	}
	a.mu.Lock()
	if a.n >= a.total {
		a.mu.Unlock()
		a.on(reasonTotalLimit, ci.RemoteAddr)
		return nil, errTooMany
	}
	c := a.src[s]
	if c == nil {
		c = &srcCount{}
	}
	// An unproven connection needs a free slot. A proven one (it echoed a
	// Retry token) needs only fewer proven connections than the limit: the
	// pending ones may be spoofed by someone locking that source out.
	if (verified && c.proven >= a.perSource) || (!verified && c.pending+c.proven >= a.perSource) {
		a.mu.Unlock()
		a.on(reasonPerSourceLimit, ci.RemoteAddr)
		return nil, errTooManyFromSource
	}
	a.src[s] = c
	a.n++
	t := &ticket{a: a, src: s, proven: verified}
	if t.proven {
		c.proven++
	} else {
		c.pending++
	}
	// quic-go cancels ctx when the connection closes or its handshake
	// fails. The timer is a backstop for a connection quic-go never starts
	// (a connection ID collision): by then serve has long closed any real
	// one.
	t.backstop = time.AfterFunc(maxUnauthLife, t.release)
	a.mu.Unlock()
	context.AfterFunc(ctx, t.release)
	return context.WithValue(ctx, ticketKey{}, t), nil
}

// maxUnauthLife is longer than any connection stays unauthenticated: the
// handshake timeout (2 × 5 s), helloTimeout and refuseLinger, with room.
const maxUnauthLife = 30 * time.Second

// unauthenticated is the number of connections holding a slot now.
func (a *admission) unauthenticated() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.n
}

// ticket is one connection's slot.
type ticket struct {
	a        *admission
	src      netip.Prefix
	backstop *time.Timer // guarded by a.mu, as the rest
	proven   bool
	done     bool
}

type ticketKey struct{}

// ticketOf returns qc's slot, or nil for a connection admit did not see.
func ticketOf(qc *quic.Conn) *ticket {
	t, _ := qc.Context().Value(ticketKey{}).(*ticket)
	return t
}

// handshakeDone records that the connection's handshake completed, which
// proves its address (the peer read our Handshake packets), and reports
// whether the source is still within its limit counting it as proven. If
// not, the caller closes it: proven connections were admitted past
// pending ones that turned out real.
func (t *ticket) handshakeDone() bool {
	if t == nil {
		return true
	}
	a := t.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if t.done || t.proven {
		return true
	}
	c := a.src[t.src]
	c.pending--
	c.proven++
	t.proven = true
	return c.proven <= a.perSource
}

// release gives the slot back; calls after the first do nothing.
func (t *ticket) release() {
	if t == nil {
		return
	}
	a := t.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if t.done {
		return
	}
	t.done = true
	if t.backstop != nil {
		t.backstop.Stop()
	}
	c := a.src[t.src]
	if t.proven {
		c.proven--
	} else {
		c.pending--
	}
	if c.pending+c.proven == 0 {
		delete(a.src, t.src)
	}
	a.n--
}

// reason is why the gateway turned a connection away before registering
// its node. Each has a counter (nlvpn_gateway_refused_total) and its own
// log rate limit (logLimiter). The admission limits are checked per
// Initial packet, before there is a connection to speak of, so they count
// refused packets: a ClientHello may span two. So does the Retry counter.
type reason int

const (
	reasonPerSourceLimit reason = iota
	reasonTotalLimit
	reasonHelloTimeout
	reasonBadCertificate
	reasonBadRegistration
	reasonBadToken
	reasonExpired
	reasonRevoked
	reasonTokenUsed
	reasonEnrollFailed
	reasonBadAdvertise
	reasonNoOverlay
	reasonNameInUse
	// reasonUnexpectedMessage is a registered node's message the gateway
	// does not take from it (a node may spam them; one line per window).
	reasonUnexpectedMessage
	// Over TCP, before a QUIC connection exists (tcplink): a TLS
	// handshake that failed or ran out of time, a stream that brought no
	// registered node in time.
	reasonTCPHandshake
	reasonTCPNotAdmitted
	// reasonACMEConnLimit is a connection to the ACME HTTP-01 port closed
	// at once because maxACMEConns were open.
	reasonACMEConnLimit
	numReasons
)

var reasonNames = [numReasons]string{
	reasonPerSourceLimit:    "per_source_limit",
	reasonTotalLimit:        "total_limit",
	reasonHelloTimeout:      "hello_timeout",
	reasonBadCertificate:    "bad_certificate",
	reasonBadRegistration:   "bad_registration",
	reasonBadToken:          "bad_token",
	reasonExpired:           "expired_token",
	reasonRevoked:           "revoked_token",
	reasonTokenUsed:         "token_used",
	reasonEnrollFailed:      "enroll_failed",
	reasonBadAdvertise:      "bad_advertise",
	reasonNoOverlay:         "no_overlay",
	reasonNameInUse:         "name_in_use",
	reasonUnexpectedMessage: "unexpected_message",
	reasonTCPHandshake:      "tcp_tls_handshake",
	reasonTCPNotAdmitted:    "tcp_not_admitted",
	reasonACMEConnLimit:     "acme_http_conn_limit",
}

func (r reason) String() string { return reasonNames[r] }
