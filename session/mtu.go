package session

import "github.com/nlvpn/nlvpn/wire"

// The MTU budget. Every size below must fit an outer 1500-byte link on
// every path: direct, relay as UDP frames, and the relay's fallback carrier
// (frames in DATAGRAMs of the node↔gateway QUIC connection), which is the
// tightest.
//
//	outer link                               1500
//	− IPv6 + UDP headers (40 + 8)            1452 = wire.GatewayPacketSize (IPv4 leaves 20 more spare)
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
// Relay frames as plain UDP leave 37 bytes unused: the fallback carrier has
// to fit the same QUIC packets, since a session can move onto it at any
// time. Path MTU discovery is off on both connections so these sizes are
// fixed: a datagram that fits once fits always. The cost: a path with an
// MTU below 1500 (PPPoE, some tunnels) needs a smaller GatewayPacketSize.
const (
	PeerPacketSize = wire.GatewayPacketSize - 37 - wire.FrameHeaderLen
	TunMTU         = PeerPacketSize - 37 - 1
)
