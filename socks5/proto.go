// Package socks5 is the server side of SOCKS5 (RFC 1928, username and
// password authentication RFC 1929) for the client's local proxy: CONNECT
// and UDP ASSOCIATE into a Network (the tunnel); BIND is refused. Domain
// names are resolved by the Network (socks5h semantics). The parser reads
// exactly the bytes the protocol announces, each length field is at most
// 255, and the whole negotiation runs under a deadline, so hostile input
// cannot make it allocate much or hang.
package socks5

// SOCKS5 server (RFC 1928, username/password auth RFC 1929): CONNECT and
// UDP ASSOCIATE; BIND is refused. Domain names are resolved through the
// tunnel (socks5h semantics). The parser reads exactly the bytes the
// protocol announces, each length field is at most 255, and the whole
// negotiation runs under a deadline, so hostile input cannot make it
// allocate much or hang.

import (
	"context"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"
)

const (
	socksVersion     = 5
	socksAuthVersion = 1

	socksMethodNone     = 0x00
	socksMethodUserPass = 0x02
	socksMethodNoAccept = 0xff

	socksCmdConnect   = 1
	socksCmdBind      = 2
	socksCmdAssociate = 3

	socksAtypIPv4   = 1
	socksAtypDomain = 3
	socksAtypIPv6   = 4

	socksRepSuccess          = 0x00
	socksRepGeneralFailure   = 0x01
	socksRepNotAllowed       = 0x02
	socksRepNetUnreachable   = 0x03
	socksRepHostUnreachable  = 0x04
	socksRepConnRefused      = 0x05
	socksRepTTLExpired       = 0x06
	socksRepCmdNotSupported  = 0x07
	socksRepAtypNotSupported = 0x08

	socksUDPIdleCheck = time.Second
)

// socksAddr is a SOCKS5 address: an IP or a domain name, and a port.
type socksAddr struct {
	ip   netip.Addr
	name string
	port uint16
}

func (a socksAddr) String() string {
	if a.name != "" {
		return net.JoinHostPort(a.name, strconv.Itoa(int(a.port)))
	}
	return netip.AddrPortFrom(a.ip, a.port).String()
}

type socksRequest struct {
	cmd byte
	dst socksAddr
}

// socksError is a failed negotiation: what to answer (rep, or none) and
// whether it was an authentication failure rather than a protocol error.
type socksError struct {
	msg  string
	rep  int // reply code to send in a request reply, -1 for none
	auth bool
}

func (e *socksError) Error() string { return "socks5: " + e.msg }

func socksProtoErr(msg string, rep int) error { return &socksError{msg: msg, rep: rep} }

// socksNegotiate runs the server side of the method selection, the optional
// username/password sub-negotiation and reads the request. It writes the
// method selection and auth replies itself; the caller writes the request's
// reply (on error, the reply code in the *socksError, if any). rw is usually
// the client connection under a deadline.
func socksNegotiate(rw io.ReadWriter, auth *Credentials) (socksRequest, error) {
	var req socksRequest
	var hdr [2]byte
	if _, err := io.ReadFull(rw, hdr[:]); err != nil {
		return req, socksProtoErr("reading greeting: "+err.Error(), -1)
	}
	if hdr[0] != socksVersion {
		if hdr[0] == 4 {
			// A SOCKS4 client: tell it "request rejected" in its own terms.
			_, _ = rw.Write([]byte{0, 0x5b, 0, 0, 0, 0, 0, 0})
		}
		return req, socksProtoErr("unsupported version "+strconv.Itoa(int(hdr[0])), -1)
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(rw, methods); err != nil {
		return req, socksProtoErr("reading methods: "+err.Error(), -1)
	}
	want := byte(socksMethodNone)
	if auth != nil {
		want = socksMethodUserPass
	}
	offered := false
	for _, m := range methods {
		if m == want {
			offered = true
			break
		}
	}
	if !offered {
		_, _ = rw.Write([]byte{socksVersion, socksMethodNoAccept})
		return req, &socksError{msg: "no acceptable authentication method offered", rep: -1, auth: auth != nil}
	}
	if _, err := rw.Write([]byte{socksVersion, want}); err != nil {
		return req, socksProtoErr("writing method: "+err.Error(), -1)
	}
	if auth != nil {
		user, pass, err := socksReadUserPass(rw)
		if err != nil {
			_, _ = rw.Write([]byte{socksAuthVersion, 0x01})
			return req, err
		}
		okUser := subtle.ConstantTimeCompare([]byte(user), []byte(auth.User))
		okPass := subtle.ConstantTimeCompare([]byte(pass), []byte(auth.Password))
		if okUser&okPass != 1 {
			_, _ = rw.Write([]byte{socksAuthVersion, 0x01})
			return req, &socksError{msg: "bad username or password", rep: -1, auth: true}
		}
		if _, err := rw.Write([]byte{socksAuthVersion, 0x00}); err != nil {
			return req, socksProtoErr("writing auth reply: "+err.Error(), -1)
		}
	}
	return socksReadRequest(rw)
}

// socksReadUserPass reads an RFC 1929 username/password request.
func socksReadUserPass(r io.Reader) (user, pass string, err error) {
	var b [2]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", "", socksProtoErr("reading auth: "+err.Error(), -1)
	}
	if b[0] != socksAuthVersion {
		return "", "", socksProtoErr("unsupported auth version "+strconv.Itoa(int(b[0])), -1)
	}
	u := make([]byte, b[1])
	if _, err := io.ReadFull(r, u); err != nil {
		return "", "", socksProtoErr("reading username: "+err.Error(), -1)
	}
	if _, err := io.ReadFull(r, b[:1]); err != nil {
		return "", "", socksProtoErr("reading auth: "+err.Error(), -1)
	}
	pw := make([]byte, b[0])
	if _, err := io.ReadFull(r, pw); err != nil {
		return "", "", socksProtoErr("reading password: "+err.Error(), -1)
	}
	return string(u), string(pw), nil
}

// socksReadRequest reads VER CMD RSV ATYP DST.ADDR DST.PORT.
func socksReadRequest(r io.Reader) (socksRequest, error) {
	var req socksRequest
	var h [3]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return req, socksProtoErr("reading request: "+err.Error(), -1)
	}
	if h[0] != socksVersion {
		return req, socksProtoErr("request with version "+strconv.Itoa(int(h[0])), socksRepGeneralFailure)
	}
	dst, err := socksReadAddr(r)
	if err != nil {
		return req, err
	}
	req.cmd, req.dst = h[1], dst
	switch req.cmd {
	case socksCmdConnect, socksCmdAssociate:
	default:
		return req, socksProtoErr("unsupported command "+strconv.Itoa(int(req.cmd)), socksRepCmdNotSupported)
	}
	return req, nil
}

// socksReadAddr reads ATYP DST.ADDR DST.PORT.
func socksReadAddr(r io.Reader) (socksAddr, error) {
	var a socksAddr
	var b [1 + 255 + 2]byte
	if _, err := io.ReadFull(r, b[:1]); err != nil {
		return a, socksProtoErr("reading address type: "+err.Error(), -1)
	}
	var n int
	switch b[0] {
	case socksAtypIPv4:
		n = 4
	case socksAtypIPv6:
		n = 16
	case socksAtypDomain:
		if _, err := io.ReadFull(r, b[:1]); err != nil {
			return a, socksProtoErr("reading name length: "+err.Error(), -1)
		}
		n = int(b[0])
		if n == 0 {
			return a, socksProtoErr("empty domain name", socksRepHostUnreachable)
		}
	default:
		return a, socksProtoErr("unsupported address type "+strconv.Itoa(int(b[0])), socksRepAtypNotSupported)
	}
	atyp := b[0]
	if _, err := io.ReadFull(r, b[:n+2]); err != nil {
		return a, socksProtoErr("reading address: "+err.Error(), -1)
	}
	a.port = binary.BigEndian.Uint16(b[n : n+2])
	switch atyp {
	case socksAtypIPv4:
		a.ip = netip.AddrFrom4([4]byte(b[:4]))
	case socksAtypIPv6:
		a.ip = netip.AddrFrom16([16]byte(b[:16])).Unmap()
	default:
		name := string(b[:n])
		if ip, err := netip.ParseAddr(name); err == nil {
			a.ip = ip.WithZone("").Unmap() // some clients send literals as names
		} else {
			a.name = name
		}
	}
	return a, nil
}

// socksParseAddr parses ATYP DST.ADDR DST.PORT at the start of b and returns
// the rest; used for UDP datagram headers.
func socksParseAddr(b []byte) (socksAddr, []byte, bool) {
	br := &sliceReader{b: b}
	a, err := socksReadAddr(br)
	if err != nil {
		return a, nil, false
	}
	return a, br.b, true
}

type sliceReader struct{ b []byte }

func (s *sliceReader) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.b)
	s.b = s.b[n:]
	return n, nil
}

// socksAppendAddr appends ATYP ADDR PORT for ap.
func socksAppendAddr(b []byte, ap netip.AddrPort) []byte {
	a := ap.Addr().Unmap()
	if a.Is4() {
		v := a.As4()
		b = append(b, socksAtypIPv4)
		b = append(b, v[:]...)
	} else if a.Is6() {
		v := a.As16()
		b = append(b, socksAtypIPv6)
		b = append(b, v[:]...)
	} else {
		b = append(b, socksAtypIPv4, 0, 0, 0, 0)
	}
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func socksReply(w io.Writer, rep byte, bnd netip.AddrPort) error {
	_, err := w.Write(socksAppendAddr([]byte{socksVersion, rep, 0}, bnd))
	return err
}

// socksReplyCode maps a dial error to a SOCKS5 reply code.
func socksReplyCode(err error) byte {
	var de *net.DNSError
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		// The agent answers a refused (or policy-denied) target with a RST.
		return socksRepConnRefused
	case errors.Is(err, syscall.ENETUNREACH):
		return socksRepNetUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.As(err, &de):
		return socksRepHostUnreachable
	case errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, context.DeadlineExceeded),
		errors.As(err, &ne) && ne.Timeout():
		return socksRepTTLExpired
	}
	return socksRepGeneralFailure
}

// Credentials are the username and password a Server requires (method
// 0x02). A nil *Credentials means no authentication.
type Credentials struct{ User, Password string }

// RepConnRefused is the reply to a CONNECT whose target refused it.
const RepConnRefused = socksRepConnRefused

// ReplyCode is the reply a Server sends for a dial that failed with err.
func ReplyCode(err error) byte { return socksReplyCode(err) }

// AppendAddr appends ap as SOCKS5 encodes an address (ATYP ADDR PORT), as
// in a UDP datagram's header.
func AppendAddr(b []byte, ap netip.AddrPort) []byte { return socksAppendAddr(b, ap) }
