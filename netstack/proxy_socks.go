package netstack

import (
	"context"
	"io"
	"net"
	"net/netip"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/nlvpn/nlvpn/socks5"
)

// ServeSOCKS5 serves a SOCKS5 proxy (package socks5) into the tunnel on ln
// until ln is closed (then it returns nil) or the Proxy is. With auth
// non-nil, clients must use username/password authentication; otherwise
// only "no authentication" is offered. UDP ASSOCIATE binds its UDP socket
// on the IP the client connected to.
func (p *Proxy) ServeSOCKS5(ln net.Listener, auth *Credentials) error {
	srv := &socks5.Server{
		Network: proxyNetwork{p}, Auth: auth, Log: p.log,
		Counters: socks5.Counters{ProtocolErrors: &p.c.protoErrors, AuthFailures: &p.c.authFailures,
			UDPAssociates: &p.c.udpAssociates, UDPDatagrams: &p.c.udpDatagrams, UDPDropped: &p.c.udpDropped},
		HandshakeTimeout: proxyHandshakeTimeout, DialTimeout: DefaultProxyDialTimeout,
		Track: func(c io.Closer) (func(), bool) {
			if !p.addCloser(c) {
				return nil, false
			}
			return func() { p.removeCloser(c) }, true
		},
		Splice: func(client, remote net.Conn) { egSplice(client, remote) },
	}
	return p.serve(ln, "socks5", func(c net.Conn) { srv.ServeConn(p.ctx, c) })
}

// proxyNetwork is the Proxy as socks5's Network: the tunnel.
type proxyNetwork struct{ p *Proxy }

func (n proxyNetwork) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return n.p.DialContext(ctx, network, addr)
}

func (n proxyNetwork) LookupHost(ctx context.Context, host string) ([]netip.Addr, error) {
	return n.p.lookup(ctx, host)
}

// ListenUDP is an unbound UDP endpoint of the stack on the client's
// overlay address of dst's family.
func (n proxyNetwork) ListenUDP(dst netip.Addr) (net.PacketConn, error) {
	src := n.p.cfg.Addr
	if dst.Is6() {
		if src = n.p.cfg.Addr6; !src.IsValid() {
			return nil, syscall.EAFNOSUPPORT
		}
	}
	la := tcpip.FullAddress{NIC: stackNIC, Addr: tcpip.AddrFromSlice(src.AsSlice())}
	return gonet.DialUDP(n.p.stack, &la, nil, proxyNetProto(src))
}
