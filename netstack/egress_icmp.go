package netstack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/nlvpn/nlvpn/packet"
	"github.com/nlvpn/nlvpn/wire"
)

// ICMP echo forwarding.
//
// gVisor does not forward echo requests to arbitrary destinations (in
// promiscuous mode it would even answer them itself, faking reachability),
// so Inject takes echo requests out before the stack sees them. Each
// allowed echo is re-sent from the host on one long-lived ICMP socket per
// address family (opened at the first echo): an unprivileged ping socket
// (SOCK_DGRAM, IPPROTO_ICMP) when net.ipv4.ping_group_range lets this
// process have one, a raw socket otherwise (root or CAP_NET_RAW). One reader
// goroutine per socket matches replies to the outstanding echoes and turns
// each back into an IP packet from the target to the client. A socket, a
// goroutine and a netpoller registration per echo cost most of the agent's
// share of a tunnel ping (BenchmarkEgressICMPEcho).
//
// The client's id and seq are never put on the wire: ping sockets rewrite
// the id to the socket's "port", and every raw socket sees every ICMP packet
// of the host, so each outstanding echo gets a wire seq of its own (and, on
// a raw socket, the id we chose for the socket). A reply is handed to a
// client only when its seq names an outstanding echo and it carries that
// echo's id (raw), source and payload: never a reply to someone else's echo.

// egEchoMaxOutstanding caps MaxEchoes below the 16-bit seq space, so that
// a free wire seq always exists.
const egEchoMaxOutstanding = 1 << 14

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
	ech := &e.echoers[0]
	if r.v6 {
		ech = &e.echoers[1]
	}
	if !ech.send(e, r, client) {
		e.releaseEcho(client)
	}
}

// releaseEcho gives back what handleEcho took for one echo.
func (e *Egress) releaseEcho(client netip.Addr) {
	<-e.echoSlots
	e.ledger.release(client, egEcho)
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

// egListenEcho opens an ICMP socket, trying modes in order.
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

// egEchoer forwards the echoes of one address family.
type egEchoer struct {
	mu        sync.Mutex
	sock      *egEchoSock // nil before the first echo
	pending   map[uint16]*egPendingEcho
	nextSeq   uint16
	openFails int // consecutive failures to open a socket: only the first is logged at Info
}

// egEchoSock is one long-lived ICMP socket and what its reader needs.
type egEchoSock struct {
	c   *icmp.PacketConn
	w   egEchoSender
	v6  bool
	raw bool
	id  uint16 // on a raw socket, the id of every echo we send; a ping socket sets its own
}

// egEchoSender puts an ICMP message on the wire to dst (a socket; tests
// replace it).
type egEchoSender interface {
	send(msg []byte, dst netip.Addr) error
}

// egPendingEcho is one outstanding echo.
type egPendingEcho struct {
	r      egEchoRequest // data owned: it aliases the message sent
	client netip.Addr
	sock   *egEchoSock // a reply counts only on the socket the echo left from
	timer  *time.Timer
}

// send puts r on the wire and registers it; false when it was dropped (and
// counted), in which case the caller releases the echo's slot.
func (ech *egEchoer) send(e *Egress, r egEchoRequest, client netip.Addr) bool {
	ech.mu.Lock()
	sock := ech.sock
	if sock == nil {
		var err error
		if sock, err = e.openEchoSock(r.v6); err != nil {
			ech.openFails++
			fails := ech.openFails
			ech.mu.Unlock()
			e.c.echoDropped.Add(1)
			lvl := slog.LevelDebug
			if fails == 1 {
				lvl = slog.LevelInfo
			}
			e.log.Log(e.ctx, lvl, "icmp echo: no ICMP socket (ping_group_range closed and no CAP_NET_RAW?)",
				"proto", "icmp", "v6", r.v6, "error", err)
			return false
		}
		ech.openFails = 0
		ech.sock = sock
	}
	if ech.pending == nil {
		ech.pending = make(map[uint16]*egPendingEcho)
	}
	// A free seq exists: len(pending) < MaxEchoes <= egEchoMaxOutstanding.
	seq := ech.nextSeq
	for {
		seq++
		if _, used := ech.pending[seq]; !used {
			break
		}
	}
	ech.nextSeq = seq

	// One allocation holds the wire message and the echo's own copy of the data.
	msg := make([]byte, 8+len(r.data))
	msg[0] = egICMPv4EchoRequest
	if r.v6 {
		msg[0] = egICMPv6EchoRequest
	}
	binary.BigEndian.PutUint16(msg[4:6], sock.id)
	binary.BigEndian.PutUint16(msg[6:8], seq)
	copy(msg[8:], r.data)
	if !r.v6 {
		// The kernel computes ICMPv6 checksums (and a ping socket the ICMPv4 one).
		binary.BigEndian.PutUint16(msg[2:4], ^packet.Sum(msg, 0))
	}
	r.data = msg[8:]
	p := &egPendingEcho{r: r, client: client, sock: sock}
	ech.pending[seq] = p
	p.timer = time.AfterFunc(e.echoWait, func() { ech.expire(e, seq, p) })
	ech.mu.Unlock()

	// Sent outside the lock: on loopback the reply can arrive before sendto
	// returns. A raw socket reports a pending ICMP error of an earlier echo
	// on its next send too; once reported it is gone, so try once more.
	err := sock.w.send(msg, r.dst)
	if err != nil {
		err = sock.w.send(msg, r.dst)
	}
	if err != nil {
		if ech.forget(seq, p) {
			e.c.echoDropped.Add(1)
			e.log.Debug("icmp echo: send failed", "proto", "icmp", "src", r.src, "dst", r.dst, "error", err)
			return false
		}
		return true // answered or timed out meanwhile, and released there
	}
	e.c.icmpEchoes.Add(1)
	return true
}

// forget removes p if it is still outstanding under seq; true if it was.
func (ech *egEchoer) forget(seq uint16, p *egPendingEcho) bool {
	ech.mu.Lock()
	defer ech.mu.Unlock()
	if ech.pending[seq] != p {
		return false
	}
	delete(ech.pending, seq)
	p.timer.Stop()
	return true
}

// expire counts an echo that got no reply in time.
func (ech *egEchoer) expire(e *Egress, seq uint16, p *egPendingEcho) {
	if !ech.forget(seq, p) {
		return
	}
	e.releaseEcho(p.client) // before the count: whoever sees the timeout sees it released
	e.c.echoTimeouts.Add(1)
	e.log.Debug("icmp echo: timeout", "proto", "icmp", "src", p.r.src, "dst", p.r.dst, "id", p.r.id, "seq", p.r.seq)
}

// openEchoSock opens the family's socket and starts its reader; the caller
// holds the echoer's lock.
func (e *Egress) openEchoSock(v6 bool) (*egEchoSock, error) {
	c, raw, err := egListenEcho(v6, e.echoModes)
	if err != nil {
		return nil, err
	}
	s := &egEchoSock{c: c, v6: v6, raw: raw}
	if raw {
		// Random, so that two agents on one host rarely share an id (a
		// shared one costs only lookups: seq, source and payload must match too).
		s.id = uint16(rand.N(1 << 16))
		// A raw socket gets every ICMP packet of the host; let the
		// kernel keep all but echo replies from waking the reader.
		if v6 {
			var f ipv6.ICMPFilter
			f.SetAll(true)
			f.Accept(ipv6.ICMPTypeEchoReply)
			err = c.IPv6PacketConn().SetICMPFilter(&f)
		} else {
			var f ipv4.ICMPFilter
			f.SetAll(true)
			f.Accept(ipv4.ICMPTypeEchoReply)
			err = c.IPv4PacketConn().SetICMPFilter(&f)
		}
		if err != nil {
			e.log.Debug("icmp echo: no ICMP filter on the raw socket", "v6", v6, "error", err)
		}
	}
	if s.w, err = egNewEchoSender(c, v6, raw); err != nil {
		_ = c.Close()
		return nil, err
	}
	if !e.track() {
		_ = c.Close()
		return nil, errors.New("egress closed")
	}
	if !e.addCloser(c) {
		e.wg.Done()
		return nil, errors.New("egress closed")
	}
	mode := egEchoPing
	if raw {
		mode = egEchoRaw
	}
	e.log.Debug("icmp echo socket open", "v6", v6, "socket", mode)
	go func() {
		defer e.wg.Done()
		e.readEchoes(s)
	}()
	return s, nil
}

// readEchoes matches the replies that arrive on s to outstanding echoes
// until s is closed.
func (e *Egress) readEchoes(s *egEchoSock) {
	ech := &e.echoers[0]
	proto := egProtoICMPv4
	if s.v6 {
		ech = &e.echoers[1]
		proto = egProtoICMPv6
	}
	// Room for the largest echo that fits the tunnel behind the largest IP
	// header, and one byte more so that a longer datagram, cut to fit,
	// still fails the match. Not 64 KiB: on a raw IPv4 socket Go moves the
	// whole buffer down over the IP header on every read
	// (net.stripIPv4Header).
	buf := make([]byte, 60+e.mtu+1)
	for {
		n, peer, err := s.c.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				// An ICMP error about an earlier echo (a host
				// unreachable) is reported once on a raw socket's
				// next read; the socket is fine.
				e.log.Debug("icmp echo socket: read error", "proto", proto, "error", err)
				continue
			}
			ech.mu.Lock()
			if ech.sock == s {
				ech.sock = nil
			}
			ech.mu.Unlock()
			e.removeCloser(s.c)
			return
		}
		from, _ := egPeerAddr(peer)
		p := ech.match(s, buf[:n], from)
		if p == nil {
			continue
		}
		e.deliverEcho(p)
	}
}

// deliverEcho answers the client of p, an echo that match took.
func (e *Egress) deliverEcho(p *egPendingEcho) {
	e.c.echoReplies.Add(1)
	e.log.Debug("icmp echo: reply", "proto", "icmp", "src", p.r.src, "dst", p.r.dst, "id", p.r.id, "seq", p.r.seq)
	e.emit(egBuildEchoReply(p.r, p.r.data))
	e.releaseEcho(p.client)
}

// stopEchoes stops the timers of the echoes still outstanding at Close.
func (e *Egress) stopEchoes() {
	for i := range e.echoers {
		ech := &e.echoers[i]
		ech.mu.Lock()
		for seq, p := range ech.pending {
			p.timer.Stop()
			delete(ech.pending, seq)
		}
		ech.mu.Unlock()
	}
}

// match finds the outstanding echo that m, an ICMP message read on s from
// peer, answers, and removes it; nil if m answers none of ours.
func (ech *egEchoer) match(s *egEchoSock, m []byte, peer netip.Addr) *egPendingEcho {
	replyType := byte(egICMPv4EchoReply)
	if s.v6 {
		replyType = egICMPv6EchoReply
	}
	if len(m) < 8 || m[0] != replyType || m[1] != 0 {
		return nil
	}
	// A ping socket gets only replies to its own id, with the checksum
	// checked; a raw socket gets everything.
	if s.raw && (binary.BigEndian.Uint16(m[4:6]) != s.id || (!s.v6 && packet.Sum(m, 0) != 0xffff)) {
		return nil
	}
	seq := binary.BigEndian.Uint16(m[6:8])
	ech.mu.Lock()
	defer ech.mu.Unlock()
	p := ech.pending[seq]
	if p == nil || p.sock != s || peer.Unmap() != p.r.dst.Unmap() || !bytes.Equal(m[8:], p.r.data) {
		return nil
	}
	delete(ech.pending, seq)
	p.timer.Stop()
	return p
}

func egPeerAddr(peer net.Addr) (netip.Addr, bool) {
	var ip net.IP
	switch a := peer.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	default:
		return netip.Addr{}, false
	}
	return netip.AddrFromSlice(ip)
}
