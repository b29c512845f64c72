package platform

import (
	"context"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// SocketBuffer is the send and receive buffer asked for on the node's UDP
// socket. With the kernel's defaults, bursts of QUIC packets overflow the
// receive buffer and throughput drops by a third.
const SocketBuffer = 8 << 20

// ListenUDP opens the node's one UDP socket with large buffers. It tries
// SO_RCVBUFFORCE/SO_SNDBUFFORCE (root or CAP_NET_ADMIN: past
// net.core.rmem_max) and falls back to the capped SO_RCVBUF/SO_SNDBUF.
func ListenUDP(addr string) (*net.UDPConn, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { setBuffers(int(fd)) })
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

func setBuffers(fd int) {
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, SocketBuffer) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, SocketBuffer)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, SocketBuffer) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, SocketBuffer)
	}
}
