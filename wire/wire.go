// Package wire defines the messages nodes and the gateway exchange: control
// messages on a QUIC stream (length-prefixed JSON), and the binary header of
// the frames that carry a peer session's packets through the relay or
// directly between nodes.
package wire

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
)

// ALPN protocol names.
const (
	ALPNGateway = "nlvpn-gw/1"
	// ALPNGatewayTCP is the TLS stream over TCP that carries a node's
	// gateway connection where UDP does not pass (tcplink).
	ALPNGatewayTCP = "nlvpn-gw-tcp/1"
	ALPNPeer       = "nlvpn-peer/1"
)

// OverlayPrefix is the range of overlay addresses (RFC 6598 shared address
// space). The gateway hands them out; nodes refuse any outside it.
var OverlayPrefix = netip.MustParsePrefix("100.64.0.0/10")

// OverlayPrefix6 is the IPv6 overlay: a unique local (RFC 4193) /96 whose
// last 32 bits are a node's IPv4 overlay address, so each node has one
// IPv6 overlay address with no second allocation, and every node can tell
// whose it is (Overlay6, OverlayOwner). The /48 part was drawn at random
// once for nlvpn, as RFC 4193 asks.
var OverlayPrefix6 = netip.MustParsePrefix("fd6e:6c76:706e::/96")

// Overlay6 is the IPv6 overlay address of the node with IPv4 overlay
// address a (the invalid address if a is not one).
func Overlay6(a netip.Addr) netip.Addr {
	if !a.Is4() || !OverlayPrefix.Contains(a) {
		return netip.Addr{}
	}
	b := OverlayPrefix6.Addr().As16()
	v4 := a.As4()
	copy(b[12:], v4[:])
	return netip.AddrFrom16(b)
}

// OverlayOwner is the IPv4 overlay address of the node an overlay address
// belongs to: a itself for IPv4, the embedded one for an address in
// OverlayPrefix6; any other address is returned unchanged (unmapped).
func OverlayOwner(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() && OverlayPrefix6.Contains(a) {
		b := a.As16()
		if v4 := netip.AddrFrom4([4]byte(b[12:])); OverlayPrefix.Contains(v4) {
			return v4
		}
	}
	return a
}

// MaxMessageSize bounds one control message. A peer announcing more is
// hostile or broken; the stream is closed.
const MaxMessageSize = 64 << 10

// Message types.
const (
	TypeHello   = "hello"   // node → gateway, first message
	TypeWelcome = "welcome" // gateway → node, reply to hello
	TypeError   = "error"   // either way; reply to a request or a fatal notice
	TypeConnect = "connect" // client → gateway: open a session to an agent
	TypeSession = "session" // gateway → client (reply to connect) and → agent (offer)
	TypeAccept  = "accept"  // agent → gateway, reply to a session offer
	// TypeGone tells a node that the other end of one of its sessions left
	// the gateway (its relay route is gone), so it can re-attach at once.
	TypeGone = "gone"
	// TypeRevoked tells an agent to end sessions whose client's token was
	// revoked (a notice, no reply): the direct path does not pass the
	// gateway.
	TypeRevoked = "revoked"
	// TypeMoved tells a node that the other end of one of its sessions
	// now reaches the gateway from a new public address (its NAT rebound,
	// it changed networks), so it can probe there for the direct path.
	TypeMoved = "moved"
	// TypePeerInfo travels inside the peer session, agent → client: the
	// agent's own word on what it serves, so the gateway cannot add routes.
	TypePeerInfo = "peer_info"
	// TypeAgents asks the gateway (client → gateway, a request with an
	// empty list) which agents this client may use, online or not; the
	// reply carries them.
	TypeAgents = "agents"
	// TypePing (node → gateway, a request) asks for a sign of life; the
	// gateway answers with a TypePing of the same ID. A node asks when
	// the relay goes quiet, to tell a dead gateway from a quiet peer
	// sooner than QUIC's idle timeout would.
	TypePing = "ping"
)

// Error codes. Fatal ones mean retrying with the same input cannot help.
const (
	CodeBadToken     = "bad_token"
	CodeExpired      = "expired_token"
	CodeRevoked      = "revoked_token"
	CodeTokenUsed    = "token_used"
	CodeForbidden    = "forbidden"
	CodeUnknownAgent = "unknown_agent"
	CodeNameInUse    = "name_in_use"
	CodeBadRequest   = "bad_request"
	CodeUnavailable  = "unavailable"
	// CodeAgentElsewhere (a reply to Connect) says the agent is online on
	// another gateway of the same cluster, named by Error.Gateway. The
	// client moves its gateway connection there and asks again, so that
	// one gateway, the agent's, relays the session. Not fatal.
	CodeAgentElsewhere = "agent_elsewhere"
)

// Message is the envelope of every control message. Exactly the field named
// by Type is set. ID pairs a reply with its request (0: not a request).
type Message struct {
	Type    string    `json:"type"`
	ID      uint64    `json:"id,omitempty"`
	Hello   *Hello    `json:"hello,omitempty"`
	Welcome *Welcome  `json:"welcome,omitempty"`
	Error   *Error    `json:"error,omitempty"`
	Connect *Connect  `json:"connect,omitempty"`
	Session *Session  `json:"session,omitempty"`
	Accept  *Accept   `json:"accept,omitempty"`
	Gone    *Gone     `json:"gone,omitempty"`
	Revoked *Revoked  `json:"revoked,omitempty"`
	Moved   *Moved    `json:"moved,omitempty"`
	Peer    *PeerInfo `json:"peer,omitempty"`
	Agents  *Agents   `json:"agents,omitempty"`
}

// Agents lists the agents a client may use (the gateway's directory,
// filtered by the client's credential). Truncated says the gateway left
// some out to keep the message within MaxMessageSize.
type Agents struct {
	Agents    []AgentInfo `json:"agents,omitempty"`
	Truncated bool        `json:"truncated,omitempty"`
}

// AgentInfo is one agent in the gateway's directory: the subnets it
// advertised when it last registered, and when it was last connected
// (unix seconds; 0 while Online or when unknown).
type AgentInfo struct {
	Name      string         `json:"name"`
	Online    bool           `json:"online"`
	Advertise []netip.Prefix `json:"advertise,omitempty"`
	LastSeen  int64          `json:"last_seen,omitempty"`
}

// PeerInfo is what an agent tells a client at the start of a session.
type PeerInfo struct {
	Name      string         `json:"name"`
	Overlay   netip.Addr     `json:"overlay"`
	Advertise []netip.Prefix `json:"advertise"`
	// DNSDomains are the LAN's domains (office.lan) whose names the
	// agent's DNS on its overlay address resolves: a TUN client sends
	// lookups under them there (split DNS) and no others.
	DNSDomains []string `json:"dns_domains,omitempty"`
}

// MaxDNSDomains bounds the domains an agent may name.
const MaxDNSDomains = 16

// ValidDomain reports whether s is a DNS name fit for a routing domain:
// lower-case letters, digits and hyphens in dot-separated labels of 1 to
// 63 characters, at most 253 in all, no trailing dot. Nothing a shell or
// a resolver's command line could read as anything but a name.
func ValidDomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	label := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.':
			if label == 0 || s[i-1] == '-' {
				return false
			}
			label = 0
			continue
		case c == '-':
			if label == 0 {
				return false
			}
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		default:
			return false
		}
		label++
		if label > 63 {
			return false
		}
	}
	return label > 0 && s[len(s)-1] != '-'
}

// Hello authenticates a node. Its key is the one in its TLS certificate.
type Hello struct {
	Token     string         `json:"token"`               // the node's credential (token.Verify), bound to its key
	Advertise []netip.Prefix `json:"advertise,omitempty"` // agents: subnets offered
	Version   string         `json:"version,omitempty"`
	// Overlay is the address the node had before a reconnect; the gateway
	// gives it back if it is still the node's and free.
	Overlay netip.Addr `json:"overlay,omitempty"`
}

// Welcome confirms registration.
type Welcome struct {
	Name     string         `json:"name"`
	Role     string         `json:"role"`
	Overlay  netip.Addr     `json:"overlay"`  // this node's overlay address
	Observed netip.AddrPort `json:"observed"` // this node's public address as the gateway sees it
	// RelayToken is what this node's relay checks (FrameRelayCheck) carry
	// after the frame header, so that the gateway answers and trusts only
	// checks from the node itself, not ones with its address forged.
	RelayToken []byte `json:"relay_token,omitempty"`
	// Revocations (to agents) is the authority's signed revocation list
	// the gateway holds (token.ParseRevocations), if any.
	Revocations string `json:"revocations,omitempty"`
	// Features are what the gateway serves beyond protocol version 1
	// (FeaturePing): a node asks for nothing else, so a new node works
	// with an older gateway, which answers a message it does not know with
	// an error or by closing the stream.
	Features []string `json:"features,omitempty"`
}

// Has reports whether the gateway that sent w serves feature f.
func (w *Welcome) Has(f string) bool { return slices.Contains(w.Features, f) }

// Gateway features (Welcome.Features).
const (
	// FeaturePing: the gateway answers TypePing, at most one a second per
	// node.
	FeaturePing = "ping"
	// MaxFeatures bounds Welcome.Features.
	MaxFeatures = 32
)

// Error reports a failure.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	// Gateway (with CodeAgentElsewhere) is the HOST:PORT of the gateway
	// the agent is on. The node verifies it as it does every gateway of
	// its network (the token's pin, or the CA and the host's name), so a
	// gateway can send a node only to another gateway of the network.
	Gateway string `json:"gateway,omitempty"`
}

func (e *Error) Error() string { return e.Message }

// Fatal reports whether retrying cannot help.
func (e *Error) Fatal() bool {
	switch e.Code {
	case CodeBadToken, CodeExpired, CodeTokenUsed, CodeRevoked, CodeForbidden, CodeUnknownAgent, CodeNameInUse, CodeBadRequest:
		return true
	}
	return false
}

// Connect asks the gateway for a session with an agent. Resume names a
// session this client had before (e.g. before a gateway restart) so the
// existing end-to-end connection can carry on over the new relay route.
type Connect struct {
	Agent  string `json:"agent"`
	Resume uint64 `json:"resume,omitempty"`
	Mode   string `json:"mode,omitempty"` // ModeAuto (""), ModeDirect or ModeRelay
	// Instance is drawn at random once per client process: the agent
	// tells a client that started over (its old flows are dead) from one
	// that moved to a new session (they carry on).
	Instance uint64 `json:"instance,omitempty"`
	Punch
}

// Connection modes.
const (
	ModeAuto   = ""       // relay at once, direct as soon as it is confirmed
	ModeDirect = "direct" // direct only; never a relayed byte
	ModeRelay  = "relay"  // relay only; no probes
)

// MaxCandidates bounds the candidate addresses a node may announce.
const MaxCandidates = 16

// Punch is what a node tells its peer, through the gateway, for hole
// punching: where it may be reached, and its signed ephemeral half of the
// probe key (see package punch).
type Punch struct {
	Candidates []netip.AddrPort `json:"candidates,omitempty"`
	ProbePub   string           `json:"probe_pub,omitempty"`
	ProbeSig   string           `json:"probe_sig,omitempty"`
	// UDPSize is the largest UDP payload the node's port sends and
	// receives (its path MTU less the headers; UDPSize), said only
	// when below GatewayPacketSize: 0 (absent, and what older nodes send)
	// means GatewayPacketSize. The session's packets fit both ends'.
	UDPSize int `json:"udp_size,omitempty"`
}

// Session describes the other end of a session. The gateway vouches for the
// peer's key; the session's own TLS handshake proves the peer holds it.
type Session struct {
	ID       uint64 `json:"id"`
	PeerName string `json:"peer_name"`
	// PeerCredential is the peer's credential (token.Verify): the agent
	// and the client check it against their authority and the peer's key
	// themselves, and take the peer's name, groups and expiry from it,
	// not from the gateway's word.
	PeerCredential string         `json:"peer_credential"`
	PeerKey        string         `json:"peer_key"`
	PeerAddr       netip.Addr     `json:"peer_overlay"`
	Advertise      []netip.Prefix `json:"advertise,omitempty"` // the agent's, as registered
	Mode           string         `json:"mode,omitempty"`
	// PeerObserved is the public address the gateway sees the peer's
	// connection come from. The peer's own candidates name its observed
	// address too, but a peer may name anyone's: this is the one public
	// address an agent probes. Absent from a gateway that does not send
	// it (the agent then takes the client's first candidate).
	PeerObserved netip.AddrPort `json:"peer_observed,omitzero"`
	// Resumed (to a client) says the agent still holds the session's
	// end-to-end connection, so the client may keep using it.
	Resumed bool `json:"resumed,omitempty"`
	// PeerInstance (to an agent) is the client's Connect.Instance. Only
	// the gateway's word: it decides no more than when a replaced
	// session's flows are closed, which a gateway could force anyway by
	// dropping them.
	PeerInstance uint64 `json:"peer_instance,omitempty"`
	Punch               // the peer's
}

// Accept is the agent's yes to a session offer. Resumed says the agent
// still has a live end-to-end connection for that session ID.
type Accept struct {
	ID      uint64 `json:"id"`
	Resumed bool   `json:"resumed,omitempty"`
	Punch
}

// Revoked names sessions to end: their client's token was revoked; and
// carries the authority's signed revocation list when it changed, which
// the agent checks and enforces itself (IDs are the gateway's word only).
type Revoked struct {
	IDs  []uint64 `json:"ids,omitempty"`
	List string   `json:"list,omitempty"`
}

// Gone names a session whose other end left.
type Gone struct {
	ID uint64 `json:"id"`
}

// Moved says that the other end of session ID now comes from Addr, as
// the gateway sees its connection (a notice, no reply).
type Moved struct {
	ID   uint64         `json:"id"`
	Addr netip.AddrPort `json:"addr"`
}

// WriteMessage writes m with a 4-byte big-endian length prefix.
func WriteMessage(w io.Writer, m *Message) error {
	body, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(body) > MaxMessageSize {
		return fmt.Errorf("control message of %d bytes exceeds %d", len(body), MaxMessageSize)
	}
	buf := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	copy(buf[4:], body)
	_, err = w.Write(buf)
	return err
}

// ErrTooLarge is returned for a length prefix over MaxMessageSize.
var ErrTooLarge = errors.New("control message too large")

// ReadMessage reads one message written by WriteMessage and checks that it
// is well formed: a known type with its body present.
func ReadMessage(r io.Reader) (*Message, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxMessageSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("truncated control message: %w", err)
	}
	return DecodeMessage(body)
}

// DecodeMessage parses and checks one JSON message body.
func DecodeMessage(body []byte) (*Message, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	m := new(Message)
	if err := dec.Decode(m); err != nil {
		return nil, fmt.Errorf("bad control message: %w", err)
	}
	if dec.More() {
		return nil, errors.New("bad control message: trailing data")
	}
	if err := m.check(); err != nil {
		return nil, fmt.Errorf("bad control message: %w", err)
	}
	return m, nil
}

func (m *Message) check() error {
	var present bool
	switch m.Type {
	case TypeHello:
		present = m.Hello != nil
	case TypeWelcome:
		present = m.Welcome != nil
	case TypeError:
		present = m.Error != nil
	case TypeConnect:
		present = m.Connect != nil
	case TypeSession:
		present = m.Session != nil
	case TypeAccept:
		present = m.Accept != nil
	case TypePeerInfo:
		present = m.Peer != nil
	case TypeGone:
		present = m.Gone != nil
	case TypeRevoked:
		present = m.Revoked != nil
	case TypeMoved:
		present = m.Moved != nil
	case TypeAgents:
		present = m.Agents != nil
	case TypePing:
		present = true // it has no body
	default:
		return fmt.Errorf("unknown type %q", m.Type)
	}
	if !present {
		return fmt.Errorf("%s message without its body", m.Type)
	}
	n := 0
	for _, p := range []bool{m.Hello != nil, m.Welcome != nil, m.Error != nil, m.Connect != nil, m.Session != nil, m.Accept != nil, m.Peer != nil, m.Gone != nil, m.Revoked != nil, m.Moved != nil, m.Agents != nil} {
		if p {
			n++
		}
	}
	want := 1
	if m.Type == TypePing {
		want = 0
	}
	if n != want {
		return fmt.Errorf("%s message with %d bodies", m.Type, n)
	}
	var p *Punch
	switch {
	case m.Connect != nil:
		p = &m.Connect.Punch
		if c := m.Connect.Mode; c != ModeAuto && c != ModeDirect && c != ModeRelay {
			return fmt.Errorf("unknown mode %q", c)
		}
	case m.Session != nil:
		p = &m.Session.Punch
	case m.Accept != nil:
		p = &m.Accept.Punch
	}
	if m.Welcome != nil && len(m.Welcome.Features) > MaxFeatures {
		return fmt.Errorf("%d features, more than %d", len(m.Welcome.Features), MaxFeatures)
	}
	if m.Moved != nil && (m.Moved.ID == 0 || !m.Moved.Addr.IsValid()) {
		return errors.New("moved message without a session or an address")
	}
	if m.Peer != nil {
		if len(m.Peer.DNSDomains) > MaxDNSDomains {
			return fmt.Errorf("%d DNS domains, more than %d", len(m.Peer.DNSDomains), MaxDNSDomains)
		}
		for _, d := range m.Peer.DNSDomains {
			if !ValidDomain(d) {
				return fmt.Errorf("DNS domain %q is not a valid name", d)
			}
		}
	}
	if p != nil && len(p.Candidates) > MaxCandidates {
		return fmt.Errorf("%d candidates, more than %d", len(p.Candidates), MaxCandidates)
	}
	return nil
}

// ProtocolVersion is what a node says in Hello. Version 1 nodes send relay
// frames either as UDP datagrams to the gateway's port or, where those do
// not pass, in DATAGRAMs of their gateway connection; a gateway serves both.
const ProtocolVersion = "1"

// Frame kinds: the first byte of a frame. All stay below 0x40 so that a
// QUIC stack sharing the socket sees a frame as "not QUIC" (the QUIC fixed
// bit 0x40 is clear) and hands it to us, and so that the port's steering
// program sends it to the frame socket.
const (
	// FrameRelay carries a peer session's QUIC packet through the gateway:
	// as a UDP datagram between a node's port and the gateway's port, or
	// in a DATAGRAM of the node's gateway connection (the fallback).
	FrameRelay byte = 0x01
	// FrameDirect carries it in a UDP datagram straight between nodes.
	FrameDirect byte = 0x02
	// FrameProbe is a hole-punch probe or keepalive between nodes.
	FrameProbe byte = 0x03
	// FrameRelayCheck goes from a node to the gateway's port and back,
	// unchanged, with a nonce in the session ID field and the node's relay
	// token (Welcome.RelayToken) after the header: it proves that relay
	// frames pass as UDP both ways. The gateway answers only a node's own
	// address (the one its gateway connection comes from) and only a check
	// with that node's token, with one frame of the same size: no
	// reflection, no amplification.
	FrameRelayCheck byte = 0x04
)

// GatewayPacketSize is the node↔gateway QUIC connection's fixed packet
// size: a 1500-byte link minus IPv6 and UDP headers (IPv4 leaves 20 spare).
// See session's MTU budget for what rides inside.
const GatewayPacketSize = 1452

// FrameHeaderLen is kind (1) + session ID (8).
const FrameHeaderLen = 9

// AppendFrameHeader appends a frame header for session id.
func AppendFrameHeader(b []byte, kind byte, id uint64) []byte {
	b = append(b, kind)
	return binary.BigEndian.AppendUint64(b, id)
}

// SessionID formats a session ID the one way logs and metrics show it.
func SessionID(id uint64) string { return fmt.Sprintf("%016x", id) }

// FrameHeader returns the header of a frame: written into a caller's
// array, so building a frame on the hot path allocates nothing.
func FrameHeader(kind byte, id uint64) [FrameHeaderLen]byte {
	var h [FrameHeaderLen]byte
	h[0] = kind
	binary.BigEndian.PutUint64(h[1:], id)
	return h
}

// NewFrame builds a frame of the given kind around payload, in a new
// buffer of exactly its size.
func NewFrame(kind byte, id uint64, payload []byte) []byte {
	b := make([]byte, 0, FrameHeaderLen+len(payload))
	b = AppendFrameHeader(b, kind, id)
	return append(b, payload...)
}

// ErrShortFrame is returned for a frame shorter than its header.
var ErrShortFrame = errors.New("frame shorter than its header")

// ParseFrame splits a frame into kind, session ID and payload. The payload
// aliases b.
func ParseFrame(b []byte) (kind byte, id uint64, payload []byte, err error) {
	if len(b) < FrameHeaderLen {
		return 0, 0, nil, ErrShortFrame
	}
	kind = b[0]
	switch kind {
	case FrameRelay, FrameDirect, FrameProbe, FrameRelayCheck:
	default:
		return 0, 0, nil, ErrFrameKind
	}
	id = binary.BigEndian.Uint64(b[1:9])
	if id == 0 {
		return 0, 0, nil, ErrFrameSession0
	}
	return kind, id, b[FrameHeaderLen:], nil
}

// Errors of ParseFrame, made once: garbage from anyone is parsed per
// datagram, and must cost no allocation.
var (
	ErrFrameKind     = errors.New("unknown frame kind")
	ErrFrameSession0 = errors.New("frame for session 0")
)
