// Package labdns is a small authoritative DNS server for test zones: the
// LAN's resolver in the namespace lab (e2e tests, nlvpn-lab dns) and the
// resolver behind the agent's forwarder in its unit tests. It answers from
// a fixed set of records, follows CNAME chains inside its zones, gives
// NXDOMAIN and NODATA with the zone's SOA, and truncates (TC) what does not
// fit a UDP answer. Not for production: no zone files, no transfers, no
// DNSSEC.
package labdns

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Zone is a set of records under one or more origins. Build it with
// NewZone and Add, or take Office.
type Zone struct {
	origins []string // lower case, with the root dot
	soa     map[string]dnsmessage.Resource
	records map[string][]dnsmessage.Resource // by lower-case owner name
}

// TTL of the records Office makes.
const TTL = 60

// NewZone returns an empty zone for origins (e.g. "office.lan."), each with
// a SOA whose MINIMUM (the negative-caching TTL) is negTTL seconds.
func NewZone(negTTL uint32, origins ...string) *Zone {
	z := &Zone{soa: make(map[string]dnsmessage.Resource), records: make(map[string][]dnsmessage.Resource)}
	for _, o := range origins {
		o = strings.ToLower(o)
		z.origins = append(z.origins, o)
		z.soa[o] = dnsmessage.Resource{
			Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(o), Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET, TTL: 300},
			Body: &dnsmessage.SOAResource{NS: dnsmessage.MustNewName("ns." + o), MBox: dnsmessage.MustNewName("hostmaster." + o),
				Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, MinTTL: negTTL},
		}
	}
	return z
}

// Add adds a record owned by name (absolute, with the root dot).
func (z *Zone) Add(name string, ttl uint32, body dnsmessage.ResourceBody) {
	n := dnsmessage.MustNewName(name)
	key := strings.ToLower(name)
	z.records[key] = append(z.records[key], dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: n, Type: typeOf(body), Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   body,
	})
}

// typeOf is the record type of body.
func typeOf(body dnsmessage.ResourceBody) dnsmessage.Type {
	switch body.(type) {
	case *dnsmessage.AResource:
		return dnsmessage.TypeA
	case *dnsmessage.AAAAResource:
		return dnsmessage.TypeAAAA
	case *dnsmessage.CNAMEResource:
		return dnsmessage.TypeCNAME
	case *dnsmessage.MXResource:
		return dnsmessage.TypeMX
	case *dnsmessage.NSResource:
		return dnsmessage.TypeNS
	case *dnsmessage.PTRResource:
		return dnsmessage.TypePTR
	case *dnsmessage.SRVResource:
		return dnsmessage.TypeSRV
	case *dnsmessage.TXTResource:
		return dnsmessage.TypeTXT
	case *dnsmessage.UnknownResource:
		return body.(*dnsmessage.UnknownResource).Type
	}
	panic(fmt.Sprintf("labdns: no type for %T", body))
}

// Office is the lab's office.lan zone with host as the address of its
// machines, and the reverse zone of host's /24 (IPv4):
//
//	nas, mail, dc1, ns.office.lan   A host
//	office.lan                      MX 10 mail.office.lan.; TXT "v=spf1 mx -all"
//	_ldap._tcp.office.lan           SRV 0 100 389 dc1.office.lan.
//	_kerberos._udp.office.lan       SRV 0 100 88 dc1.office.lan.
//	www.office.lan                  CNAME web.office.lan. (CNAME nas.office.lan.)
//	big.office.lan                  TXT, 40 strings: too big for a UDP answer
//	host's PTR                      nas.office.lan.
//
// Negative answers carry a SOA with MINIMUM 30.
func Office(host netip.Addr) *Zone {
	h4 := host.As4()
	rev := fmt.Sprintf("%d.%d.%d.in-addr.arpa.", h4[2], h4[1], h4[0])
	z := NewZone(30, "office.lan.", rev)
	a := &dnsmessage.AResource{A: h4}
	for _, n := range []string{"nas", "mail", "dc1", "ns"} {
		z.Add(n+".office.lan.", TTL, a)
	}
	z.Add("office.lan.", TTL, &dnsmessage.MXResource{Pref: 10, MX: dnsmessage.MustNewName("mail.office.lan.")})
	z.Add("office.lan.", TTL, &dnsmessage.TXTResource{TXT: []string{"v=spf1 mx -all"}})
	z.Add("office.lan.", TTL, &dnsmessage.NSResource{NS: dnsmessage.MustNewName("ns.office.lan.")})
	z.Add("_ldap._tcp.office.lan.", TTL, &dnsmessage.SRVResource{Priority: 0, Weight: 100, Port: 389, Target: dnsmessage.MustNewName("dc1.office.lan.")})
	z.Add("_kerberos._udp.office.lan.", TTL, &dnsmessage.SRVResource{Priority: 0, Weight: 100, Port: 88, Target: dnsmessage.MustNewName("dc1.office.lan.")})
	z.Add("www.office.lan.", TTL, &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName("web.office.lan.")})
	z.Add("web.office.lan.", TTL, &dnsmessage.CNAMEResource{CNAME: dnsmessage.MustNewName("nas.office.lan.")})
	big := make([]string, 40)
	for i := range big {
		big[i] = fmt.Sprintf("%02d-%s", i, strings.Repeat("x", 57))
	}
	z.Add("big.office.lan.", TTL, &dnsmessage.TXTResource{TXT: big})
	z.Add(fmt.Sprintf("%d.%s", h4[3], rev), TTL, &dnsmessage.PTRResource{PTR: dnsmessage.MustNewName("nas.office.lan.")})
	return z
}

// origin returns the zone origin name falls under, or "".
func (z *Zone) origin(name string) string {
	for _, o := range z.origins {
		if name == o || strings.HasSuffix(name, "."+o) {
			return o
		}
	}
	return ""
}

// maxChain bounds the CNAMEs followed for one answer.
const maxChain = 8

// Answer returns the response to one query, received over UDP (tcp false)
// or TCP, or nil for a datagram that is not a query.
func (z *Zone) Answer(q []byte, tcp bool) []byte {
	var in dnsmessage.Message
	if err := in.Unpack(q); err != nil || in.Header.Response || len(in.Questions) != 1 {
		return nil
	}
	question := in.Questions[0]
	udpSize := 512
	var opt *dnsmessage.Resource
	for _, r := range in.Additionals {
		if r.Header.Type == dnsmessage.TypeOPT {
			udpSize = max(udpSize, int(r.Header.Class))
			var h dnsmessage.ResourceHeader
			_ = h.SetEDNS0(1232, dnsmessage.RCodeSuccess, false)
			opt = &dnsmessage.Resource{Header: h, Body: &dnsmessage.OPTResource{}}
		}
	}
	out := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: in.Header.ID, Response: true, Authoritative: true, RecursionDesired: in.Header.RecursionDesired},
		Questions: in.Questions,
	}
	name := strings.ToLower(question.Name.String())
	origin := z.origin(name)
	switch {
	case in.Header.OpCode != 0:
		out.Header.RCode = dnsmessage.RCodeNotImplemented
		out.Header.Authoritative = false
	case origin == "" || question.Class != dnsmessage.ClassINET:
		out.Header.RCode = dnsmessage.RCodeRefused
		out.Header.Authoritative = false
	default:
		exists := false
		for range maxChain {
			rrs, ok := z.records[name]
			exists = ok
			var cname *dnsmessage.CNAMEResource
			for _, r := range rrs {
				if r.Header.Type == question.Type || question.Type == dnsmessage.TypeALL {
					out.Answers = append(out.Answers, r)
				} else if c, ok := r.Body.(*dnsmessage.CNAMEResource); ok {
					cname = c
					out.Answers = append(out.Answers, r)
				}
			}
			if cname == nil || question.Type == dnsmessage.TypeCNAME {
				break
			}
			name = strings.ToLower(cname.CNAME.String())
			if origin = z.origin(name); origin == "" {
				exists = true // out of the zone: the client's resolver goes on
				break
			}
		}
		if soa, ok := z.soa[name]; ok && question.Type == dnsmessage.TypeSOA {
			out.Answers = append(out.Answers, soa)
			exists = true
		} else if !exists {
			exists = z.hasBelow(name)
		}
		if !exists {
			out.Header.RCode = dnsmessage.RCodeNameError
		}
		if len(out.Answers) == 0 || !exists {
			if origin != "" {
				out.Authorities = append(out.Authorities, z.soa[origin])
			}
		}
	}
	if opt != nil {
		out.Additionals = []dnsmessage.Resource{*opt}
	}
	b, err := out.Pack()
	if err != nil {
		return nil
	}
	if !tcp && len(b) > udpSize {
		out.Header.Truncated = true
		out.Answers, out.Authorities = nil, nil
		if b, err = out.Pack(); err != nil {
			return nil
		}
	}
	return b
}

// hasBelow reports whether name is an empty non-terminal (a name with
// records below it, like _tcp.office.lan.) or an origin: those exist
// (NODATA, not NXDOMAIN).
func (z *Zone) hasBelow(name string) bool {
	if _, ok := z.soa[name]; ok {
		return true
	}
	for n := range z.records {
		if strings.HasSuffix(n, "."+name) {
			return true
		}
	}
	return false
}

// Handler answers one query; Zone.Answer is one.
type Handler func(q []byte, tcp bool) []byte

// ServeUDP answers the datagrams pc receives with h until pc is closed
// (then it returns nil).
func ServeUDP(pc net.PacketConn, h Handler) error {
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		if resp := h(buf[:n], false); resp != nil {
			_, _ = pc.WriteTo(resp, from)
		}
	}
}

// ServeTCP answers DNS over TCP on ln's connections with h until ln is
// closed (then it returns nil, once every connection has ended).
func ServeTCP(ln net.Listener, h Handler) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			for range 1024 {
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				var l [2]byte
				if _, err := io.ReadFull(c, l[:]); err != nil {
					return
				}
				q := make([]byte, binary.BigEndian.Uint16(l[:]))
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				resp := h(q, true)
				if resp == nil {
					return
				}
				if _, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(resp))), resp...)); err != nil {
					return
				}
			}
		}()
	}
}
