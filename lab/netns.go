//go:build linux

package lab

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"

	"golang.org/x/sys/unix"
)

const netnsDir = "/run/netns"

// Do runs fn on an OS thread that has entered the named network namespace.
// Sockets created inside fn (net.Listen, net.Dial, ...) stay in that
// namespace for their whole life, so they can be used from any goroutine
// afterwards. Goroutines started by fn do NOT inherit the namespace.
//
// The thread's original namespace is restored before it is released; if
// that fails the thread is left locked and the Go runtime discards it.
func Do(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restored := false
		defer func() {
			if restored {
				runtime.UnlockOSThread()
			}
			// else: exit with the thread locked; the runtime kills it.
		}()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			restored = true
			errc <- fmt.Errorf("lab: open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		target, err := unix.Open(filepath.Join(netnsDir, ns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			restored = true
			errc <- fmt.Errorf("lab: open netns %s: %w", ns, err)
			return
		}
		defer unix.Close(target)
		if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
			restored = true
			errc <- fmt.Errorf("lab: setns %s: %w", ns, err)
			return
		}
		var ferr error
		func() {
			defer func() {
				if r := recover(); r != nil {
					ferr = fmt.Errorf("lab: panic in netns %s: %v", ns, r)
				}
			}()
			ferr = fn()
		}()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("lab: restore netns after %s: %w (fn: %v)", ns, err, ferr)
			return
		}
		restored = true
		errc <- ferr
	}()
	return <-errc
}

// Listen opens a listener inside ns.
func Listen(ns, network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := Do(ns, func() (err error) {
		ln, err = net.Listen(network, addr)
		return err
	})
	return ln, err
}

// ListenPacket opens a packet conn inside ns.
func ListenPacket(ns, network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := Do(ns, func() (err error) {
		pc, err = net.ListenPacket(network, addr)
		return err
	})
	return pc, err
}

// ListenUDP opens a UDP socket inside ns.
func ListenUDP(ns string, laddr *net.UDPAddr) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := Do(ns, func() (err error) {
		c, err = net.ListenUDP("udp", laddr)
		return err
	})
	return c, err
}

// DialContext dials from inside ns. Use IP literals: name resolution
// would run outside the namespace's view.
func DialContext(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := Do(ns, func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// Dialer returns a dial function (for http.Transport.DialContext and the
// like) whose sockets are created inside ns.
func Dialer(ns string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return DialContext(ctx, ns, network, addr)
	}
}
