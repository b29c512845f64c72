//go:build nlvpn_misbehave

package agent

import (
	"encoding/binary"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/nlvpn/nlvpn/packet"
	"github.com/nlvpn/nlvpn/session"
)

// A compromised agent, for the e2e tests only (never in a release build):
// NLVPN_MISBEHAVE says what it does with a client's session.
//
//   - agent-connect-client: tries to open TCP connections into the client
//     machine. Every misbehaveEvery, for at most misbehaveFor and
//     misbehaveMax packets, it sends a SYN to the client's overlay address
//     and port NLVPN_MISBEHAVE_PORT into the session, the way the egress
//     sends its replies; the source alternates between the agent's own
//     overlay address and an address in its first advertised IPv4 subnet
//     (the client takes packets from both). A client in TUN mode must
//     drop them unless it runs with --accept-inbound.
const (
	misbehaveEvery = 200 * time.Millisecond
	misbehaveFor   = 20 * time.Second
	misbehaveMax   = 100
)

func init() {
	mode := os.Getenv("NLVPN_MISBEHAVE")
	if mode != "agent-connect-client" {
		return
	}
	port, err := strconv.ParseUint(os.Getenv("NLVPN_MISBEHAVE_PORT"), 10, 16)
	if err != nil || port == 0 {
		panic("NLVPN_MISBEHAVE=agent-connect-client needs NLVPN_MISBEHAVE_PORT (1-65535)")
	}
	misbehave = func(a *Agent, s *session.Session, client netip.Addr, log *slog.Logger) {
		srcs := []netip.Addr{a.overlay()}
		for _, p := range a.cfg.Advertise {
			if p.Addr().Is4() && p.Bits() < 32 {
				srcs = append(srcs, p.Masked().Addr().Next())
				break
			}
		}
		if !client.Is4() || !srcs[0].Is4() {
			log.Warn("misbehaving (test build): IPv4 overlay addresses only", "mode", mode, "client_overlay", client, "agent_overlay", srcs[0])
			return
		}
		log.Warn("misbehaving (test build): sending SYNs into the client", "mode", mode, "dst", netip.AddrPortFrom(client, uint16(port)), "srcs", srcs)
		t := time.NewTicker(misbehaveEvery)
		defer t.Stop()
		end := time.After(misbehaveFor)
		sent := 0
		defer func() { log.Warn("misbehaving (test build): done", "mode", mode, "syns_sent", sent) }()
		for sent < misbehaveMax {
			select {
			case <-s.Conn.Context().Done():
				return
			case <-end:
				return
			case <-t.C:
			}
			src := srcs[sent%len(srcs)]
			sport := uint16(40000 + sent)
			s.SendWait(tcpSYN4(src, client, sport, uint16(port), rand.Uint32()))
			sent++
		}
	}
}

// tcpSYN4 builds an IPv4 TCP SYN (with an MSS option) from src:sport to
// dst:dport, with valid IP and TCP checksums.
func tcpSYN4(src, dst netip.Addr, sport, dport uint16, seq uint32) []byte {
	const ipLen, tcpLen = 20, 24
	pkt := make([]byte, ipLen+tcpLen)
	ip := pkt[:ipLen]
	ip[0] = 0x45 // version 4, 5 words
	binary.BigEndian.PutUint16(ip[2:], ipLen+tcpLen)
	binary.BigEndian.PutUint16(ip[4:], uint16(rand.Uint32()))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8] = 64                                 // TTL
	ip[9] = 6                                  // TCP
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:16], s4[:])
	copy(ip[16:20], d4[:])
	binary.BigEndian.PutUint16(ip[10:], ^packet.Sum(ip, 0))

	tcp := pkt[ipLen:]
	binary.BigEndian.PutUint16(tcp[0:], sport)
	binary.BigEndian.PutUint16(tcp[2:], dport)
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12] = (tcpLen / 4) << 4
	tcp[13] = 0x02 // SYN
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	tcp[20], tcp[21] = 2, 4 // MSS
	binary.BigEndian.PutUint16(tcp[22:], 1200)
	// Pseudo-header: source, destination, protocol, TCP length.
	pseudo := uint32(binary.BigEndian.Uint16(s4[0:])) + uint32(binary.BigEndian.Uint16(s4[2:])) +
		uint32(binary.BigEndian.Uint16(d4[0:])) + uint32(binary.BigEndian.Uint16(d4[2:])) + 6 + tcpLen
	binary.BigEndian.PutUint16(tcp[16:], ^packet.Sum(tcp, pseudo))
	return pkt
}
