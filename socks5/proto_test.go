package socks5

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"
)

// FuzzSOCKSNegotiate feeds arbitrary client bytes to the server side of
// the SOCKS5 negotiation, with and without credentials.
func FuzzSOCKSNegotiate(f *testing.F) {
	f.Add([]byte{5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80}, false)
	f.Add([]byte{5, 1, 0, 5, 3, 0, 3, 4, 'h', 'o', 's', 't', 0, 53}, false)
	f.Add([]byte{5, 1, 2, 1, 1, 'a', 1, 'b', 5, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 22}, true)
	f.Add([]byte{5, 0}, false)
	f.Add([]byte{4, 1, 0, 80}, true)
	f.Add([]byte{5, 1, 0, 5, 1, 0, 3, 255}, false)
	f.Fuzz(func(t *testing.T, in []byte, withAuth bool) {
		var auth *Credentials
		if withAuth {
			auth = &Credentials{User: "a", Password: "b"}
		}
		var out bytes.Buffer
		rw := struct {
			io.Reader
			io.Writer
		}{bytes.NewReader(in), &out}
		req, err := socksNegotiate(rw, auth)
		if out.Len() > 16 {
			t.Fatalf("wrote %d bytes", out.Len())
		}
		if err != nil {
			var se *socksError
			if !errors.As(err, &se) {
				t.Fatalf("error of type %T", err)
			}
			return
		}
		if req.cmd != socksCmdConnect && req.cmd != socksCmdAssociate {
			t.Fatalf("accepted command %d", req.cmd)
		}
		if req.dst.name == "" && !req.dst.ip.IsValid() {
			t.Fatal("no destination")
		}
		if len(req.dst.name) > 255 {
			t.Fatal("name too long")
		}
		if withAuth && (len(in) < 3 || in[2] != socksMethodUserPass && !bytes.Contains(in[2:2+int(in[1])], []byte{2})) {
			t.Fatal("authenticated without offering method 2")
		}
	})
}

// FuzzSOCKSUDPHeader checks the datagram address parser.
func FuzzSOCKSUDPHeader(f *testing.F) {
	f.Add([]byte{1, 127, 0, 0, 1, 0, 53, 'x'})
	f.Add([]byte{3, 3, 'a', 'b', 'c', 0, 53})
	f.Add([]byte{4})
	f.Fuzz(func(t *testing.T, b []byte) {
		a, rest, ok := socksParseAddr(b)
		if !ok {
			return
		}
		if len(rest) > len(b) {
			t.Fatal("rest longer than input")
		}
		if a.name == "" && a.ip.IsValid() {
			// Round trip through the encoder.
			enc := socksAppendAddr(nil, netip.AddrPortFrom(a.ip, a.port))
			a2, _, ok := socksParseAddr(enc)
			if !ok || a2 != a {
				t.Fatalf("round trip %v → %x → %v", a, enc, a2)
			}
		}
	})
}
