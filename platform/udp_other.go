//go:build !linux

package platform

import "net"

// ListenUDP opens the node's one UDP socket.
func ListenUDP(addr string) (*net.UDPConn, error) {
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, err
	}
	c, err := net.ListenUDP("udp", ua)
	if err != nil {
		return nil, err
	}
	c.SetReadBuffer(8 << 20)
	c.SetWriteBuffer(8 << 20)
	return c, nil
}

// ListenUDPPair opens the node's UDP socket; frames is nil here: the
// caller uses quic-go's non-QUIC packet queue.
func ListenUDPPair(addr string) (quic, frames *net.UDPConn, err error) {
	quic, err = ListenUDP(addr)
	return quic, nil, err
}
