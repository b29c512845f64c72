package client

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/nlvpn/nlvpn/netstack"
	"github.com/nlvpn/nlvpn/session"
	"github.com/nlvpn/nlvpn/wire"
)

// NetstackConfig selects the unprivileged mode: instead of a TUN device,
// a userspace netstack holds the client's overlay address and local
// proxies (or the caller, through Ready) open connections through it.
type NetstackConfig struct {
	SOCKS5 string // listen address of the SOCKS5 proxy; empty: none
	HTTP   string // listen address of the HTTP proxy; empty: none
	Auth   *netstack.Credentials
	// Ready, if set, is called once with the netstack when the tunnel is
	// up: `nlvpn connect` and `nlvpn forward` dial through it.
	Ready func(px *netstack.Proxy)
}

// DNSPort is where an agent answers name lookups on its overlay address,
// with its own resolver, so names only the remote LAN knows work.
const DNSPort = 53

func (c *Client) startNetstack(ctx context.Context, w *wire.Welcome, info *wire.PeerInfo) (stop func(), err error) {
	nc := c.cfg.Netstack
	px, err := netstack.NewProxy(netstack.ProxyConfig{
		// The first session's MTU (a later session's may differ: send
		// splits what is over it), but not below what the netstack takes
		// (IPv6's minimum, 1280).
		Addr: w.Overlay, Addr6: wire.Overlay6(w.Overlay), MTU: max(c.cur.Load().MTU(), minIPv6MTU), DNS: netip.AddrPortFrom(info.Overlay, DNSPort), Logger: c.log,
		Release: session.ReleasePacket,
	}, func(pkts [][]byte) {
		for _, p := range pkts {
			c.send(p)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("start netstack: %w", err)
	}
	// Batched on the netstack's own goroutine (its GRO merges a flow's
	// segments), not on the QUIC connection's.
	c.deliver = func(pkt []byte) { px.Submit(pkt) }
	c.stackDrops = px.StackDrops
	var lns []net.Listener
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
		px.Close()
	}
	serve := func(addr, what string, fn func(net.Listener, *netstack.Credentials) error) error {
		if addr == "" {
			return nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("%s proxy on %s: %w", what, addr, err)
		}
		lns = append(lns, ln)
		go fn(ln, nc.Auth)
		return nil
	}
	if err := serve(nc.SOCKS5, "SOCKS5", px.ServeSOCKS5); err != nil {
		closeAll()
		return nil, err
	}
	if err := serve(nc.HTTP, "HTTP", px.ServeHTTP); err != nil {
		closeAll()
		return nil, err
	}
	args := []any{"mode", "netstack", "overlay", w.Overlay, "agent_overlay", info.Overlay, "subnets", info.Advertise, "path", c.pathKind()}
	if nc.SOCKS5 != "" {
		args = append(args, "socks5", nc.SOCKS5)
	}
	if nc.HTTP != "" {
		args = append(args, "http_proxy", nc.HTTP)
	}
	c.log.Info("tunnel up", args...)
	if nc.Ready != nil {
		nc.Ready(px)
	}
	return closeAll, nil
}
