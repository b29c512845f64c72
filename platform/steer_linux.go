package platform

import (
	"context"
	"fmt"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// ListenUDPPair opens the node's UDP port as two sockets in one
// SO_REUSEPORT group, with a classic BPF program that steers each
// arriving datagram by its first byte: QUIC packets (fixed bit 0x40 set)
// to quic, nlvpn's own frames (probes, direct traffic) to frames.
//
// Why two sockets: quic-go keeps its fast path (GSO, ECN, batched reads)
// only on a socket of its own, and hands non-QUIC packets on through a
// queue of 32 that overflows under load, costing direct-path throughput.
// One port keeps one NAT mapping, which is what hole punching needs: both
// sockets send from the same address and port.
//
// If the kernel refuses the steering program, frames is nil and the caller
// falls back to quic-go's non-QUIC packet queue.
func ListenUDPPair(addr string) (quic, frames *net.UDPConn, err error) {
	quic, err = listenReusePort(addr)
	if err != nil {
		return nil, nil, err
	}
	port := quic.LocalAddr().(*net.UDPAddr).Port
	host, _, _ := net.SplitHostPort(addr)
	prog, err := steeringProgram()
	if err != nil {
		return quic, nil, nil
	}
	frames, err = listenReusePort(net.JoinHostPort(host, fmt.Sprint(port)))
	if err != nil {
		return quic, nil, nil
	}
	// Attached after both sockets joined the group: on an unbound socket
	// the kernel would make it a group of its own, and the bind would fail.
	if err := attach(frames, prog); err != nil {
		frames.Close()
		return quic, nil, nil
	}
	return quic, frames, nil
}

func attach(c *net.UDPConn, prog []bpf.RawInstruction) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		fp := unix.SockFprog{Len: uint16(len(prog)), Filter: (*unix.SockFilter)(unsafe.Pointer(&prog[0]))}
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &fp)
	})
	if err != nil {
		return err
	}
	return serr
}

// steeringProgram returns index 0 (the first socket of the group, quic)
// when the payload's first byte has the QUIC fixed bit, else 1 (frames).
// For UDP the program sees the datagram's payload at offset 0.
func steeringProgram() ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 0, Size: 1},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x40, SkipTrue: 1},
		bpf.RetConstant{Val: 1},
		bpf.RetConstant{Val: 0},
	})
}

func listenReusePort(addr string) (*net.UDPConn, error) {
	var serr error
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		err := c.Control(func(fd uintptr) {
			setBuffers(int(fd))
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp", addr)
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}
