//go:build unix

package netstack

import (
	"errors"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/net/icmp"
	"golang.org/x/sys/unix"
)

// egEchoWriter sends echoes without ever blocking: handleEcho runs on the
// Inject goroutine, which a full socket buffer must not stall (the echo is
// dropped and counted instead).
type egEchoWriter struct {
	rc syscall.RawConn
	v6 bool
}

func egNewEchoSender(c *icmp.PacketConn, v6, _ bool) (egEchoSender, error) {
	var pc net.PacketConn
	if v6 {
		pc = c.IPv6PacketConn().PacketConn
	} else {
		pc = c.IPv4PacketConn().PacketConn
	}
	sc, ok := pc.(syscall.Conn)
	if !ok {
		return nil, errors.New("icmp socket without a file descriptor")
	}
	rc, err := sc.SyscallConn()
	return egEchoWriter{rc: rc, v6: v6}, err
}

func (w egEchoWriter) send(msg []byte, dst netip.Addr) error {
	var sa unix.Sockaddr
	if w.v6 {
		sa = &unix.SockaddrInet6{Addr: dst.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	}
	var serr error
	err := w.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), msg, unix.MSG_DONTWAIT, sa)
		return true // EAGAIN included: drop, never wait
	})
	if err != nil {
		return err
	}
	return serr
}
