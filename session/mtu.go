package session

// The MTU budget. Every size below must fit an outer 1500-byte link on the
// worst path, which is the relay: the peer session's QUIC packet inside a
// relay frame inside a DATAGRAM of the node↔gateway QUIC connection.
//
//	outer link                         1500
//	− IPv6 + UDP headers (40 + 8)      1452 = GatewayPacketSize (IPv4 leaves 20 more spare)
//	− quic-go's datagram reserve (37)  1415 = largest DATAGRAM payload on the gateway connection
//	                                        (type 1 + max connection ID 20 + AEAD tag 16; the real
//	                                        header is ≤ 1+4+4 with our 4-byte IDs, so ≥ 9 spare)
//	− relay frame header (9)           1406 ≥ PeerPacketSize 1400 (6 spare)
//	PeerPacketSize                     1400 (direct path: 1400 + 9 + 48 = 1457 ≤ 1500)
//	− quic-go's datagram reserve (37)  1363 = largest IP packet in one peer DATAGRAM
//	TunMTU                             1360 (3 spare); TCP MSS follows from it: 1320 (v4), 1300 (v6)
//
// Path MTU discovery is off on both connections so these sizes are fixed:
// a datagram that fits once fits always. The cost: a path with an MTU
// below 1500 (PPPoE, some tunnels) needs a smaller GatewayPacketSize.
const (
	GatewayPacketSize = 1452
	PeerPacketSize    = 1400
	TunMTU            = 1360
)
