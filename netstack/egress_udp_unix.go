//go:build unix

package netstack

import (
	"net"
	"syscall"
	"time"
)

// copyDownRaw is copyDown for a real socket, read with egReadPooled. It
// returns false at once when remote is not a socket.
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
		bp, n, err := egReadPooled(rc, &egUDPBufPool)
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
