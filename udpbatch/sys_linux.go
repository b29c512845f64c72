//go:build linux

package udpbatch

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mmsghdr is struct mmsghdr: a msghdr and the byte count the kernel fills.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// cmsgLen is the control space for one UDP_GRO or UDP_SEGMENT message
// (a uint16), the only control message either way.
var cmsgLen = unix.CmsgSpace(2)

// side is the preallocated system call state of one direction: one reader
// and one writer use the Conn at once, each with its own.
type side struct {
	hdrs  []mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
	oob   []byte
	msg   []int // write: the message each entry belongs to
}

func newSide(n int) side {
	return side{hdrs: make([]mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n),
		oob: make([]byte, n*cmsgLen), msg: make([]int, n)}
}

type sysConn struct {
	rc syscall.RawConn
	v6 bool // an AF_INET6 socket (IPv4 peers as v4-mapped addresses)
	r  side
	w  side

	// The functions handed to RawConn.Read/Write and their in/out state,
	// made once: a closure made per call would be an allocation per batch.
	readFn, writeFn func(fd uintptr) bool
	rn, rgot        int
	rerr            syscall.Errno
	wh              []mmsghdr
	wn              int
	werr            syscall.Errno
}

// writeEntries bounds the datagrams one sendmmsg carries when trains are
// written as separate datagrams.
const writeEntries = 256

func (s *sysConn) init(uc *net.UDPConn, maxBatch int) error {
	rc, err := uc.SyscallConn()
	if err != nil {
		return err
	}
	s.rc = rc
	var serr error
	err = rc.Control(func(fd uintptr) {
		var sa unix.Sockaddr
		sa, serr = unix.Getsockname(int(fd))
		_, s.v6 = sa.(*unix.SockaddrInet6)
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return serr
	}
	s.r = newSide(max(1, maxBatch))
	s.w = newSide(max(writeEntries, maxBatch))
	s.readFn, s.writeFn = s.recvmmsg, s.sendmmsgFn
	return nil
}

func (s *sysConn) recvmmsg(fd uintptr) bool {
	for {
		r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&s.r.hdrs[0])), uintptr(s.rn), unix.MSG_DONTWAIT, 0, 0)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rgot, s.rerr = int(r), e
		return true
	}
}

func (s *sysConn) sendmmsgFn(fd uintptr) bool {
	for {
		r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&s.wh[0])), uintptr(len(s.wh)), 0, 0, 0)
		switch e {
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.wn, s.werr = int(r), e
		return true
	}
}

func (s *sysConn) enableGRO() bool {
	var ok bool
	s.rc.Control(func(fd uintptr) {
		ok = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	})
	return ok
}

func (s *sysConn) hasGSO() bool {
	var ok bool
	s.rc.Control(func(fd uintptr) {
		_, err := unix.GetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_SEGMENT)
		ok = err == nil
	})
	return ok
}

func (s *sysConn) readBatch(c *Conn, ms []Message) (int, error) {
	n := min(len(ms), len(s.r.hdrs))
	if n == 0 {
		return 0, nil
	}
	for i := range ms[:n] {
		b := ms[i].Buf
		if len(b) == 0 {
			return 0, errors.New("udpbatch: read into an empty buffer")
		}
		s.r.iovs[i] = unix.Iovec{Base: &b[0]}
		s.r.iovs[i].SetLen(len(b))
		h := &s.r.hdrs[i].hdr
		*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&s.r.names[i])), Namelen: unix.SizeofSockaddrInet6,
			Iov: &s.r.iovs[i], Control: &s.r.oob[i*cmsgLen]}
		h.SetIovlen(1)
		h.SetControllen(cmsgLen)
	}
	s.rn = n
	err := s.rc.Read(s.readFn)
	got, errno := s.rgot, s.rerr
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, &net.OpError{Op: "recvmmsg", Net: "udp", Err: errno}
	}
	for i := range ms[:got] {
		m, h := &ms[i], &s.r.hdrs[i]
		m.N, m.Seg = int(h.n), 0
		m.Addr = sockaddrToAddrPort(&s.r.names[i])
		if h.hdr.Flags&unix.MSG_TRUNC != 0 {
			m.N = 0 // truncated: nothing of it can be trusted
			continue
		}
		if h.hdr.Controllen > 0 {
			m.Seg = groSize(s.r.oob[i*cmsgLen : i*cmsgLen+int(h.hdr.Controllen)])
		}
	}
	return got, nil
}

// groSize finds the UDP_GRO segment size among control messages.
func groSize(oob []byte) int {
	for len(oob) >= unix.SizeofCmsghdr {
		h, data, rest, err := unix.ParseOneSocketControlMessage(oob)
		if err != nil {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && len(data) >= 2 {
			return int(binary.NativeEndian.Uint16(data))
		}
		oob = rest
	}
	return 0
}

func sockaddrToAddrPort(sa *unix.RawSockaddrInet6) netip.AddrPort {
	port := binary.BigEndian.Uint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:])
	switch sa.Family {
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), port)
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), port)
	}
	return netip.AddrPort{}
}

// putSockaddr writes ap as the socket's family wants it and returns the
// length, or 0 if the socket cannot reach it (IPv6 from an IPv4 socket).
func (s *sysConn) putSockaddr(sa *unix.RawSockaddrInet6, ap netip.AddrPort) uint32 {
	a := ap.Addr()
	if s.v6 {
		*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], ap.Port())
		return unix.SizeofSockaddrInet6
	}
	a = a.Unmap()
	if !a.Is4() {
		return 0
	}
	sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
	*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.As4()}
	binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa4.Port))[:], ap.Port())
	return unix.SizeofSockaddrInet4
}

// gsoRefused tells a kernel or route that cannot do UDP GSO from an
// ordinary send error (a network change, a full buffer), which must not
// turn GSO off for good.
func gsoRefused(err error) bool {
	return errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOPROTOOPT)
}

func (s *sysConn) writeBatch(c *Conn, ms []Message) (failed int, lastErr error) {
	mi := 0  // next message to build entries from
	off := 0 // how much of message mi went out already (a train split into datagrams)
	for mi < len(ms) {
		gso := c.gso.Load()
		// Build as many entries as fit, from message mi on.
		k := 0
		for mi < len(ms) && k < len(s.w.hdrs) {
			m := &ms[mi]
			if len(m.Buf) == 0 {
				mi++
				continue
			}
			seg := m.Seg
			if seg <= 0 || seg >= len(m.Buf) {
				seg = 0
			}
			if gso || seg == 0 {
				if !s.entry(k, m.Buf, m.Addr, seg, mi) {
					failed += datagramsIn(m.Buf, seg)
					mi++
					continue
				}
				k++
				mi++
				continue
			}
			// No GSO: the train goes as separate datagrams.
			for off < len(m.Buf) && k < len(s.w.hdrs) {
				end := min(off+seg, len(m.Buf))
				if !s.entry(k, m.Buf[off:end], m.Addr, 0, mi) {
					failed++
				} else {
					k++
				}
				off = end
			}
			if off >= len(m.Buf) {
				off = 0
				mi++
			}
		}
		// Send the entries; a failed one is skipped and counted.
		sent := 0
		for sent < k {
			r, err := s.sendmmsg(s.w.hdrs[sent:k])
			if err == nil {
				for _, e := range s.w.hdrs[sent : sent+r] {
					c.writeDatagrams.Add(uint64(entryDatagrams(&e)))
				}
				sent += r
				c.writeCalls.Add(1)
				continue
			}
			e := &s.w.hdrs[sent]
			if e.hdr.Controllen > 0 && gsoRefused(err) {
				// The kernel or route cannot do GSO: from now on trains go
				// as separate datagrams, starting again with this message.
				c.gso.Store(false)
				mi = s.w.msg[sent]
				off = 0
				break
			}
			lastErr = err
			n := entryDatagrams(e)
			failed += n
			c.writeErrors.Add(uint64(n))
			sent++
		}
	}
	return failed, lastErr
}

// entry fills write entry k; false if the address is unusable.
func (s *sysConn) entry(k int, b []byte, to netip.AddrPort, seg, msg int) bool {
	nl := s.putSockaddr(&s.w.names[k], to)
	if nl == 0 {
		return false
	}
	s.w.iovs[k] = unix.Iovec{Base: &b[0]}
	s.w.iovs[k].SetLen(len(b))
	h := &s.w.hdrs[k].hdr
	*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&s.w.names[k])), Namelen: nl, Iov: &s.w.iovs[k]}
	h.SetIovlen(1)
	if seg > 0 {
		oob := s.w.oob[k*cmsgLen : (k+1)*cmsgLen]
		ch := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		ch.Level, ch.Type = unix.SOL_UDP, unix.UDP_SEGMENT
		ch.SetLen(unix.CmsgLen(2))
		binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(seg))
		h.Control = &oob[0]
		h.SetControllen(cmsgLen)
	}
	s.w.msg[k] = msg
	return true
}

func entryDatagrams(e *mmsghdr) int {
	l := int(e.hdr.Iov.Len)
	if e.hdr.Controllen == 0 {
		return 1
	}
	seg := int(binary.NativeEndian.Uint16(unsafe.Slice(e.hdr.Control, cmsgLen)[unix.CmsgLen(0):]))
	if seg <= 0 {
		return 1
	}
	return (l + seg - 1) / seg
}

func datagramsIn(b []byte, seg int) int {
	if seg <= 0 {
		return 1
	}
	return (len(b) + seg - 1) / seg
}

// sendmmsg makes one system call for hdrs, waiting while the socket's send
// buffer is full. It returns how many entries went out, or the error of
// the first one, which did not.
func (s *sysConn) sendmmsg(hdrs []mmsghdr) (int, error) {
	s.wh = hdrs
	err := s.rc.Write(s.writeFn)
	n, errno := s.wn, s.werr
	s.wh = nil
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, &net.OpError{Op: "sendmmsg", Net: "udp", Err: errno}
	}
	if n == 0 {
		return 0, &net.OpError{Op: "sendmmsg", Net: "udp", Err: unix.EIO}
	}
	return n, nil
}
