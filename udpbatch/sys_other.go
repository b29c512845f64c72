//go:build !linux

package udpbatch

import (
	"net"
	"net/netip"
)

// sysConn without batch system calls: one datagram per call, trains
// written as separate datagrams.
type sysConn struct{ uc *net.UDPConn }

func (s *sysConn) init(uc *net.UDPConn, _ int) error { s.uc = uc; return nil }
func (s *sysConn) enableGRO() bool                   { return false }
func (s *sysConn) hasGSO() bool                      { return false }

func (s *sysConn) readBatch(c *Conn, ms []Message) (int, error) {
	if len(ms) == 0 {
		return 0, nil
	}
	n, from, err := s.uc.ReadFromUDPAddrPort(ms[0].Buf)
	if err != nil {
		return 0, err
	}
	ms[0].N, ms[0].Seg = n, 0
	ms[0].Addr = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	return 1, nil
}

func (s *sysConn) writeBatch(c *Conn, ms []Message) (failed int, lastErr error) {
	for i := range ms {
		m := &ms[i]
		seg := m.Seg
		if seg <= 0 {
			seg = len(m.Buf)
		}
		for b := m.Buf; len(b) > 0; {
			n := min(seg, len(b))
			if _, err := s.uc.WriteToUDPAddrPort(b[:n], m.Addr); err != nil {
				failed++
				lastErr = err
				c.writeErrors.Add(1)
			} else {
				c.writeDatagrams.Add(1)
				c.writeCalls.Add(1)
			}
			b = b[n:]
		}
	}
	return failed, lastErr
}
