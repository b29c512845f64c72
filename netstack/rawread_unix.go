//go:build unix

package netstack

import (
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// egReadPooled reads once from the socket behind rc into a buffer from
// pool, waiting for data in the runtime poller while holding no buffer:
// an idle flow costs no copy buffer. On success the caller owns bp and
// puts it back; on an error bp is nil. n == 0 without an error is an
// empty datagram or, on a stream, EOF.
func egReadPooled(rc syscall.RawConn, pool *sync.Pool) (bp *[]byte, n int, err error) {
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		bp = pool.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *bp)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			pool.Put(bp)
			bp = nil
			return false // back to the poller, holding no buffer
		}
		return true
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		if bp != nil {
			pool.Put(bp)
		}
		return nil, 0, err
	}
	return bp, n, nil
}
