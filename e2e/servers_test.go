//go:build linux

package e2e

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"

	"github.com/nlvpn/nlvpn/lab"
)

// Ports of the services on the LAN host.
const (
	httpPort    = 80
	udpEchoPort = 7
	tcpEchoPort = 9000
	dnsPort     = 53
)

// dnsName is the name the LAN resolver answers, with the LAN host's address.
const dnsName = "nas.lan."

// stream returns the deterministic pseudo-random byte stream for seed.
func stream(seed uint64) io.Reader {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	copy(key[8:], "nlvpn-e2e-payload-stream")
	return rand.NewChaCha8(key)
}

// streamBytes returns the first n bytes of stream(seed).
func streamBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	io.ReadFull(stream(seed), b)
	return b
}

// streamSHA256 returns the hex sha256 of the first n bytes of stream(seed).
func streamSHA256(seed uint64, n int64) string {
	h := sha256.New()
	io.CopyN(h, stream(seed), n)
	return hex.EncodeToString(h.Sum(nil))
}

// startLANServers starts, inside the LAN host's namespace, from this test
// process: an HTTP server (GET /data?size=N&seed=S, GET /health,
// POST /upload → sha256 of the body), a UDP echo, a TCP echo and a tiny DNS
// resolver. They stop at test cleanup.
func startLANServers(t *testing.T, l *lab.Lab) {
	t.Helper()
	host := l.LANHost.String()

	ln, err := lab.Listen(l.NS.LAN, "tcp4", net.JoinHostPort(host, strconv.Itoa(httpPort)))
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	// whoami: the address the LAN host sees a connection come from.
	mux.HandleFunc("GET /whoami", func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		io.WriteString(w, host+"\n")
	})
	mux.HandleFunc("GET /data", func(w http.ResponseWriter, r *http.Request) {
		size, err1 := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
		seed, err2 := strconv.ParseUint(r.URL.Query().Get("seed"), 10, 64)
		if err1 != nil || err2 != nil || size < 0 || size > 1<<30 {
			http.Error(w, "bad size or seed", http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		io.CopyN(w, stream(seed), size)
	})
	mux.HandleFunc("POST /upload", func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x\n", n, h.Sum(nil))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	if l.LANHost6.IsValid() { // the same on the LAN's IPv6 address
		ln6, err := lab.Listen(l.NS.LAN, "tcp6", net.JoinHostPort(l.LANHost6.String(), strconv.Itoa(httpPort)))
		if err != nil {
			t.Fatal(err)
		}
		go srv.Serve(ln6)
	}

	// UDP echo.
	uc, err := lab.ListenUDP(l.NS.LAN, net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.LANHost, udpEchoPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	go func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			uc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()

	// TCP echo: echoes until EOF, then closes.
	tl, err := lab.Listen(l.NS.LAN, "tcp4", net.JoinHostPort(host, strconv.Itoa(tcpEchoPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Minute))
				io.Copy(c, c)
			}()
		}
	}()

	// DNS: A nas.lan. → LAN host; everything else NXDOMAIN.
	dc, err := lab.ListenUDP(l.NS.LAN, net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.LANHost, dnsPort)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := dc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if resp, err := dnsAnswer(buf[:n], l.LANHost); err == nil {
				dc.WriteToUDPAddrPort(resp, from)
			}
		}
	}()
}

func dnsAnswer(query []byte, addr netip.Addr) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired}
	known := q.Name.String() == dnsName && q.Type == dnsmessage.TypeA
	if !known {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	b.EnableCompression()
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(q); err != nil {
		return nil, err
	}
	if known {
		if err := b.StartAnswers(); err != nil {
			return nil, err
		}
		if err := b.AResource(dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60},
			dnsmessage.AResource{A: addr.As4()}); err != nil {
			return nil, err
		}
	}
	return b.Finish()
}

func dnsQuery(id uint16, name string) ([]byte, error) {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	if err := b.StartQuestions(); err != nil {
		return nil, err
	}
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}); err != nil {
		return nil, err
	}
	return b.Finish()
}

// parseDNSA returns the first A record of a response with the given id.
func parseDNSA(resp []byte, id uint16) (netip.Addr, error) {
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil {
		return netip.Addr{}, err
	}
	if h.ID != id || !h.Response {
		return netip.Addr{}, fmt.Errorf("unexpected header %+v", h)
	}
	if err := p.SkipAllQuestions(); err != nil {
		return netip.Addr{}, err
	}
	for {
		ah, err := p.AnswerHeader()
		if err != nil {
			return netip.Addr{}, fmt.Errorf("no A answer (rcode %v): %w", h.RCode, err)
		}
		if ah.Type != dnsmessage.TypeA {
			p.SkipAnswer()
			continue
		}
		a, err := p.AResource()
		if err != nil {
			return netip.Addr{}, err
		}
		return netip.AddrFrom4(a.A), nil
	}
}
