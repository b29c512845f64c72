package wire

import "fmt"

// The MTU budget. A node's port sends and receives UDP payloads of at most
// its UDP size (UDPSize: its path MTU less the IP and UDP headers, at most
// GatewayPacketSize), and a session's sizes must fit the smaller UDP
// size of its two ends (the client's and the agent's paths may differ) on
// every path the session's packets can take at any moment: direct, relay as
// UDP frames, and the relay's fallback carrier (frames in DATAGRAMs of each
// node's gateway connection), which is the tightest. For the default
// 1500-byte path:
//
//	path MTU                                 1500
//	− IPv6 + UDP headers (40 + 8)            1452 = GatewayPacketSize = the UDP size
//	                                              (IPv4 leaves 20 spare; 1452 is also quic-go's largest packet)
//	direct and relay as UDP frames:
//	  − frame header (9)                     1443 ≥ PeerPacketSize (37 spare)
//	relay fallback, frames in DATAGRAMs:
//	  − quic-go's datagram reserve (37)      1415 = largest DATAGRAM payload on the gateway connection
//	                                              (type 1 + max connection ID 20 + AEAD tag 16)
//	  − frame header (9)                     1406 = PeerPacketSize
//	PeerPacketSize                           1406
//	− quic-go's datagram reserve (37)        1369 ≥ largest IP packet in one peer DATAGRAM
//	TunMTU                                   1368 (1 spare); TCP MSS follows from it: 1328 (v4), 1308 (v6)
//
// A smaller path (IPv4, which is all the underlay speaks today) has the UDP
// size path MTU − 28, and the same steps follow (SizesFor). PPPoE's 1492
// still gives 1452. A 1280 path (tunnels, some mobile networks) gives
// 1252 → 1206 → 1168. The floor is a peer session's QUIC Initial (1200
// bytes, RFC 9000) in the fallback carrier: UDP size 1246, path MTU 1274;
// MinPathMTU rounds that up to IPv6's minimum link MTU.
//
// Path MTU discovery is off on both QUIC connections so these sizes are
// fixed: a datagram that fits once fits always. Each end advertises its size
// as max_udp_payload_size and never sends more than the other's (quic-go
// patch 0007), so the gateway follows each node's size and the agent each
// session's.
const (
	PeerPacketSize = GatewayPacketSize - quicDatagramReserve - FrameHeaderLen
	TunMTU         = PeerPacketSize - quicDatagramReserve - 1

	// quicDatagramReserve is what quic-go keeps free in a packet for a
	// DATAGRAM frame's packet: type 1 + max connection ID 20 + AEAD tag 16.
	quicDatagramReserve = 37
	// minPeerPacketSize is QUIC's smallest Initial packet, which the peer
	// session's handshake must be able to send on every path.
	minPeerPacketSize = 1200

	// MinUDPSize is the smallest UDP size a session works with.
	MinUDPSize = minPeerPacketSize + FrameHeaderLen + quicDatagramReserve
	// DefaultPathMTU is the path MTU assumed until a node learns otherwise.
	DefaultPathMTU = 1500
	// MinPathMTU is the smallest path MTU accepted (--mtu): IPv6's minimum
	// link MTU, just above the IPv4 floor (MinUDPSize + 28 = 1274).
	MinPathMTU = 1280
	// ipv4UDPHeaders and ipv6UDPHeaders are the IP and UDP headers
	// around a UDP payload.
	ipv4UDPHeaders = 20 + 8
	ipv6UDPHeaders = 40 + 8
)

// UDPSize is the largest UDP payload a node's port sends and receives on a
// path with this MTU (IPv6 or IPv4 headers), capped at
// GatewayPacketSize. It is an error when the path is too small for a
// session (below MinPathMTU or, for IPv6, below MinUDPSize + 48).
func UDPSize(pathMTU int, ipv6 bool) (int, error) {
	hdr := ipv4UDPHeaders
	if ipv6 {
		hdr = ipv6UDPHeaders
	}
	if pathMTU < MinPathMTU || pathMTU-hdr < MinUDPSize {
		return 0, fmt.Errorf("path MTU %d is too small: nlvpn needs at least %d (%d for IPv6)", pathMTU, MinPathMTU, MinUDPSize+ipv6UDPHeaders)
	}
	return min(pathMTU-hdr, GatewayPacketSize), nil
}

// Sizes are one session's sizes, all from the smaller UDP size of its two
// ends.
type Sizes struct {
	UDP  int // largest UDP payload on either node's port
	Peer int // the peer session's QUIC packet size (InitialPacketSize)
	TUN  int // largest IP packet the session carries: the tunnel's MTU
}

// SizesFor returns the sizes of a session between nodes with UDP sizes a
// and b (0: a node that did not say, which is GatewayPacketSize).
// Values outside MinUDPSize..GatewayPacketSize are clamped, so a
// gateway that lies cannot make a session unworkable by size alone.
func SizesFor(a, b int) Sizes {
	udp := min(normUDP(a), normUDP(b))
	peer := udp - quicDatagramReserve - FrameHeaderLen
	return Sizes{UDP: udp, Peer: peer, TUN: peer - quicDatagramReserve - 1}
}

func normUDP(n int) int {
	if n == 0 {
		return GatewayPacketSize
	}
	return max(MinUDPSize, min(n, GatewayPacketSize))
}

// WireUDPSize is what a node with UDP size n says in its session requests
// and answers: nothing (0) for the default, so that a message from a node
// on a full-size path is the same as before the field existed.
func WireUDPSize(n int) int {
	if n >= GatewayPacketSize {
		return 0
	}
	return n
}
