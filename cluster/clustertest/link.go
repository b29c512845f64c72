// Package clustertest holds what tests of a cluster of gateways share:
// a link to NATS that a test can cut for one gateway while the others
// keep theirs (a split that stopping the server cannot make).
package clustertest

import (
	"io"
	"net"
	"strings"
	"sync"
	"testing"
)

// Link relays TCP from a loopback port to a NATS server until Cut, and
// again after Restore.
type Link struct {
	l      net.Listener
	target string

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
}

// NewLink starts a link to the NATS server at url (nats://HOST:PORT or
// HOST:PORT), closed when the test ends.
func NewLink(tb testing.TB, url string) *Link {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	k := &Link{l: l, target: strings.TrimPrefix(url, "nats://"), conns: map[net.Conn]struct{}{}}
	go k.accept()
	tb.Cleanup(func() {
		l.Close()
		k.Cut()
	})
	return k
}

// URL is the link's end for a gateway to connect to.
func (k *Link) URL() string { return "nats://" + k.l.Addr().String() }

// Cut closes every connection through the link, and from now on each new
// one as soon as it comes: the gateway sees NATS go away and fail to come
// back.
func (k *Link) Cut() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.cut = true
	for c := range k.conns {
		c.Close()
	}
	clear(k.conns)
}

// Restore lets connections through again.
func (k *Link) Restore() {
	k.mu.Lock()
	k.cut = false
	k.mu.Unlock()
}

func (k *Link) accept() {
	for {
		in, err := k.l.Accept()
		if err != nil {
			return
		}
		go k.relay(in)
	}
}

func (k *Link) relay(in net.Conn) {
	out, err := net.Dial("tcp", k.target)
	if err != nil {
		in.Close()
		return
	}
	k.mu.Lock()
	if k.cut {
		k.mu.Unlock()
		in.Close()
		out.Close()
		return
	}
	k.conns[in], k.conns[out] = struct{}{}, struct{}{}
	k.mu.Unlock()
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src)
		done <- struct{}{}
	}
	go pipe(out, in)
	go pipe(in, out)
	<-done // one way ended: end both
	in.Close()
	out.Close()
	k.mu.Lock()
	delete(k.conns, in)
	delete(k.conns, out)
	k.mu.Unlock()
}
