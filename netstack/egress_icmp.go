package netstack

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/nlvpn/nlvpn/wire"
)

// ICMP echo forwarding.
//
// gVisor does not forward echo requests to arbitrary destinations (in
// promiscuous mode it would even answer them itself, faking reachability),
// so Inject takes echo requests out before the stack sees them. Each
// allowed echo is re-sent from the host by a worker goroutine on its own
// ICMP socket: an unprivileged ping socket (SOCK_DGRAM, IPPROTO_ICMP) when
// net.ipv4.ping_group_range lets this process have one, a raw socket
// otherwise (root or CAP_NET_RAW). The reply is matched on that socket and
// turned back into an IP packet from the target to the client.
//
// Ping sockets rewrite the ICMP id to the socket's "port", and every raw
// socket sees every ICMP packet of the host, so the client's id is never put
// on the wire: a ping socket matches by socket (plus seq and payload), a raw
// socket by an id the Egress allocates (plus seq, source and payload).

func (e *Egress) handleEcho(r egEchoRequest) {
	if !e.allow(r.src, netip.AddrPortFrom(r.dst, 0), "icmp") {
		e.c.denied.Add(1)
		e.log.Debug("icmp echo denied", "proto", "icmp", "src", r.src, "dst", r.dst)
		return
	}
	if ipLen := len(r.data) + 8 + egIPHeaderLen(r.v6); ipLen > e.mtu {
		// The reply would not fit the tunnel.
		e.c.echoDropped.Add(1)
		return
	}
	client := wire.OverlayOwner(r.src) // its IPv6 overlay address counts as its IPv4 one
	if !e.ledger.acquire(client, egEcho) {
		e.c.echoDropped.Add(1)
		return
	}
	select {
	case e.echoSlots <- struct{}{}:
	default:
		e.ledger.release(client, egEcho)
		e.c.echoDropped.Add(1)
		return
	}
	if !e.track() {
		<-e.echoSlots
		e.ledger.release(client, egEcho)
		return
	}
	r.data = bytes.Clone(r.data)
	if r.data == nil {
		r.data = []byte{}
	}
	go func() {
		defer e.wg.Done()
		defer func() { <-e.echoSlots; e.ledger.release(client, egEcho) }()
		e.forwardEcho(r)
	}()
}

func egIPHeaderLen(v6 bool) int {
	if v6 {
		return 40
	}
	return 20
}

// Kinds of ICMP socket an echo can be sent from, in order of preference.
const (
	egEchoPing = "ping" // unprivileged SOCK_DGRAM ping socket
	egEchoRaw  = "raw"  // raw socket: root or CAP_NET_RAW
)

var egDefaultEchoModes = []string{egEchoPing, egEchoRaw}

// egListenEcho opens a socket for one echo, trying modes in order.
func egListenEcho(v6 bool, modes []string) (c *icmp.PacketConn, raw bool, err error) {
	var errs []error
	for _, mode := range modes {
		network, addr := "udp4", "0.0.0.0"
		switch {
		case mode == egEchoPing && v6:
			network, addr = "udp6", "::"
		case mode == egEchoRaw && !v6:
			network = "ip4:icmp"
		case mode == egEchoRaw && v6:
			network, addr = "ip6:ipv6-icmp", "::"
		}
		c, err := icmp.ListenPacket(network, addr)
		if err == nil {
			return c, mode == egEchoRaw, nil
		}
		errs = append(errs, err)
	}
	return nil, false, errors.Join(errs...)
}

func (e *Egress) forwardEcho(r egEchoRequest) {
	log := e.log.With("proto", "icmp", "src", r.src, "dst", r.dst, "id", r.id, "seq", r.seq)
	c, raw, err := egListenEcho(r.v6, e.echoModes)
	if err != nil {
		e.c.echoDropped.Add(1)
		log.Info("icmp echo: no ICMP socket (ping_group_range closed and no CAP_NET_RAW?)", "error", err)
		return
	}
	if !e.addCloser(c) {
		return
	}
	defer e.removeCloser(c)
	if raw {
		log = log.With("socket", egEchoRaw)
	} else {
		log = log.With("socket", egEchoPing)
	}

	var reqType, replyType icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	proto := egProtoICMPv4
	if r.v6 {
		reqType, replyType, proto = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, egProtoICMPv6
	}
	wireID := uint16(0) // rewritten by a ping socket
	if raw {
		wireID = uint16(e.echoID.Add(1))
	}
	msg := icmp.Message{Type: reqType, Body: &icmp.Echo{ID: int(wireID), Seq: int(r.seq), Data: r.data}}
	wb, err := msg.Marshal(nil) // the kernel fills in the ICMPv6 checksum
	if err != nil {
		e.c.echoDropped.Add(1)
		return
	}
	var dst net.Addr = &net.IPAddr{IP: r.dst.AsSlice()}
	if !raw {
		dst = &net.UDPAddr{IP: r.dst.AsSlice()}
	}
	if _, err := c.WriteTo(wb, dst); err != nil {
		e.c.echoDropped.Add(1)
		log.Debug("icmp echo: send failed", "error", err)
		return
	}
	e.c.icmpEchoes.Add(1)

	_ = c.SetReadDeadline(time.Now().Add(e.echoWait))
	// Room for a reply that can match (same data) behind the largest IP
	// header, and one byte more so that a longer datagram, cut to fit, still
	// fails the match. Not 64 KiB: on a raw IPv4 socket Go moves the whole
	// buffer down over the IP header on every read (net.stripIPv4Header),
	// which made a 64 KiB buffer most of the agent's CPU time per echo.
	buf := make([]byte, 60+8+len(r.data)+1)
	for {
		n, peer, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				e.c.echoTimeouts.Add(1)
				log.Debug("icmp echo: timeout")
			}
			return
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyType {
			continue
		}
		echo, ok := m.Body.(*icmp.Echo)
		if !ok || echo.Seq != int(r.seq) || !bytes.Equal(echo.Data, r.data) {
			continue
		}
		if raw && (echo.ID != int(wireID) || !egPeerIs(peer, r)) {
			continue
		}
		e.c.echoReplies.Add(1)
		log.Debug("icmp echo: reply")
		e.emit(egBuildEchoReply(r, r.data))
		return
	}
}

func egPeerIs(peer net.Addr, r egEchoRequest) bool {
	var ip net.IP
	switch a := peer.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	default:
		return false
	}
	want := r.dst.AsSlice()
	return ip.Equal(want)
}
