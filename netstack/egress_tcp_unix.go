//go:build unix

package netstack

import (
	"io"
	"net"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// egCanReadRaw reports whether c is a socket egCopyDownLazy can read.
func egCanReadRaw(c net.Conn) bool {
	_, ok := c.(syscall.Conn)
	return ok
}

// egCopyDownLazy copies the real connection's bytes to the client until
// EOF (then half-closes the tunneled side) or an error (then closes both).
// It reads with egReadPooled.
func egCopyDownLazy(tunneled *gonet.TCPConn, remote net.Conn) int64 {
	var total int64
	rc, err := remote.(syscall.Conn).SyscallConn()
	if err != nil {
		egEndHalf(tunneled, remote, err)
		return 0
	}
	for {
		bp, n, err := egReadPooled(rc, &egSpliceBufPool)
		if err == nil && n == 0 {
			err = io.EOF
		}
		if err == nil {
			total += int64(n)
			_, err = tunneled.Write((*bp)[:n])
		}
		if bp != nil {
			egSpliceBufPool.Put(bp)
		}
		if err != nil {
			egEndHalf(tunneled, remote, err)
			return total
		}
	}
}
