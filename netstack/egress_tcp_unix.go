//go:build unix

package netstack

import (
	"io"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// egCanReadRaw reports whether c is a socket egCopyDownLazy can read.
func egCanReadRaw(c net.Conn) bool {
	_, ok := c.(syscall.Conn)
	return ok
}

// egCopyDownLazy copies the real connection's bytes to the client until
// EOF (then half-closes the tunneled side) or an error (then closes both).
// It waits in the runtime poller holding no buffer and borrows a pooled
// one per read.
func egCopyDownLazy(tunneled *gonet.TCPConn, remote net.Conn) int64 {
	var total int64
	rc, err := remote.(syscall.Conn).SyscallConn()
	if err != nil {
		egEndHalf(tunneled, remote, err)
		return 0
	}
	for {
		var bp *[]byte
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			bp = egSpliceBufPool.Get().(*[]byte)
			n, rerr = unix.Read(int(fd), *bp)
			if rerr == unix.EAGAIN || rerr == unix.EINTR {
				egSpliceBufPool.Put(bp)
				bp = nil
				return false // back to the poller, holding no buffer
			}
			return true
		})
		switch {
		case err != nil: // the conn was closed
		case rerr != nil:
			err = rerr
		case n == 0:
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
