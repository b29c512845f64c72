package dnsfwd

import (
	"errors"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// query is a client's query, checked.
type query struct {
	msg dnsmessage.Message
	// edns: the client sent an OPT record; udpSize is the UDP answer size
	// it takes (512 without EDNS, never above udpPayload); dnssecOK its DO
	// bit.
	edns     bool
	udpSize  int
	dnssecOK bool
}

func (q *query) question() dnsmessage.Question { return q.msg.Questions[0] }

var errMalformed = errors.New("malformed query")

// parseQuery checks that b is a query this forwarder answers: a whole
// message, not a response, exactly one question, at most one OPT record.
func parseQuery(b []byte) (*query, error) {
	if len(b) > maxQuery {
		return nil, errMalformed
	}
	q := &query{udpSize: 512}
	if err := q.msg.Unpack(b); err != nil {
		return nil, errMalformed
	}
	if q.msg.Header.Response || len(q.msg.Questions) != 1 || len(q.msg.Answers) != 0 {
		return nil, errMalformed
	}
	for _, r := range q.msg.Additionals {
		if r.Header.Type != dnsmessage.TypeOPT {
			continue
		}
		if q.edns {
			return nil, errMalformed // RFC 6891: more than one OPT is FORMERR
		}
		q.edns = true
		q.dnssecOK = r.Header.DNSSECAllowed()
		q.udpSize = min(max(int(r.Header.Class), 512), udpPayload)
	}
	return q, nil
}

// optRecord is the OPT pseudo-record this forwarder sends: its UDP size,
// the DO bit, no options (a client's cookies and the like are between it
// and its server; this forwarder is the server).
func optRecord(size int, dnssecOK bool) dnsmessage.Resource {
	var h dnsmessage.ResourceHeader
	_ = h.SetEDNS0(size, dnsmessage.RCodeSuccess, dnssecOK)
	return dnsmessage.Resource{Header: h, Body: &dnsmessage.OPTResource{}}
}

// withoutOPT returns rs without OPT records (a new slice when it has one).
func withoutOPT(rs []dnsmessage.Resource) []dnsmessage.Resource {
	for i, r := range rs {
		if r.Header.Type == dnsmessage.TypeOPT {
			out := append([]dnsmessage.Resource(nil), rs[:i]...)
			for _, r := range rs[i+1:] {
				if r.Header.Type != dnsmessage.TypeOPT {
					out = append(out, r)
				}
			}
			return out
		}
	}
	return rs
}

// upstreamQuery is the message sent to a resolver for query: a new ID, the
// client's question and flags, this forwarder's OPT record (unless noEDNS:
// for an old resolver that refused it with FORMERR).
func upstreamQuery(query *query, id uint16, noEDNS bool) ([]byte, error) {
	h := query.msg.Header
	m := dnsmessage.Message{
		Header: dnsmessage.Header{ID: id, RecursionDesired: h.RecursionDesired,
			AuthenticData: h.AuthenticData, CheckingDisabled: h.CheckingDisabled},
		Questions: query.msg.Questions,
	}
	if !noEDNS {
		m.Additionals = []dnsmessage.Resource{optRecord(udpPayload, query.dnssecOK)}
	}
	return m.Pack()
}

// parseReply parses a resolver's reply and checks that it answers the
// query sent with id: a response, that ID, the same one question (names
// compared without case). ok false: not the answer (dropped, counted).
func parseReply(b []byte, id uint16, q dnsmessage.Question) (*dnsmessage.Message, bool) {
	var m dnsmessage.Message
	if err := m.Unpack(b); err != nil {
		return nil, false
	}
	if !m.Header.Response || m.Header.ID != id || len(m.Questions) != 1 {
		return nil, false
	}
	got := m.Questions[0]
	if got.Type != q.Type || got.Class != q.Class || !strings.EqualFold(got.Name.String(), q.Name.String()) {
		return nil, false
	}
	m.Additionals = withoutOPT(m.Additionals)
	return &m, true
}
