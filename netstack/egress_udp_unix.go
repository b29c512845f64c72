//go:build unix

package netstack

import (
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// copyDownRaw is copyDown for a real socket: it waits for a datagram in the
// runtime poller holding no buffer, and borrows a pooled one only to read
// it. It returns false at once when remote is not a socket.
func (f *udpFlow) copyDownRaw(remote net.Conn) bool {
	sc, ok := remote.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	for {
		left := f.idleLeft()
		if left <= 0 {
			return true
		}
		_ = remote.SetReadDeadline(time.Now().Add(left))
		var bp *[]byte
		var n int
		var rerr error
		err := rc.Read(func(fd uintptr) bool {
			bp = egUDPBufPool.Get().(*[]byte)
			n, rerr = unix.Read(int(fd), *bp)
			if rerr == unix.EAGAIN || rerr == unix.EINTR {
				egUDPBufPool.Put(bp)
				bp = nil
				return false // back to the poller, holding no buffer
			}
			return true
		})
		if err == nil && rerr != nil {
			egUDPBufPool.Put(bp)
			err = rerr
		}
		if err != nil {
			if egRetryable(err) {
				continue
			}
			return true
		}
		ok := f.forwardDown((*bp)[:n])
		egUDPBufPool.Put(bp)
		if !ok {
			return true
		}
	}
}
