package platform

import (
	"net"
	"testing"
	"time"
)

// The kernel must steer QUIC packets to the first socket and nlvpn frames
// to the second, on one port.
func TestListenUDPPairSteers(t *testing.T) {
	q, f, err := ListenUDPPair("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if f == nil {
		t.Skip("kernel refused the reuseport steering program")
	}
	defer f.Close()
	if q.LocalAddr().String() != f.LocalAddr().String() {
		t.Fatalf("two ports: %v and %v", q.LocalAddr(), f.LocalAddr())
	}
	s, err := net.DialUDP("udp", nil, q.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for i := 0; i < 20; i++ {
		s.Write([]byte{0x40 | byte(i), 'q'}) // QUIC fixed bit
		s.Write([]byte{0x02, 'f'})           // an nlvpn frame kind
	}
	count := func(c *net.UDPConn, want byte) int {
		n := 0
		buf := make([]byte, 64)
		for {
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			k, err := c.Read(buf)
			if err != nil {
				return n
			}
			if k != 2 || buf[1] != want {
				t.Errorf("socket got %q, want only %q packets", buf[:k], want)
			}
			n++
		}
	}
	if n := count(q, 'q'); n != 20 {
		t.Errorf("QUIC socket got %d of 20 QUIC packets", n)
	}
	if n := count(f, 'f'); n != 20 {
		t.Errorf("frame socket got %d of 20 frames", n)
	}
}
