package dnsfwd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// resolvConfCheck is how often, at most, the resolv.conf is looked at again
// for a change (a laptop agent moving networks, resolvconf rewriting it).
const resolvConfCheck = 30 * time.Second

// upstreams are the resolvers: the configured ones, or those of a
// resolv.conf, re-read when its modification time changes.
type upstreams struct {
	path string // "" when configured

	mu      sync.Mutex
	servers []netip.AddrPort
	mtime   time.Time
	checked time.Time
}

func newUpstreams(servers []netip.AddrPort, resolvConf string, log *slog.Logger) *upstreams {
	if len(servers) > 0 {
		return &upstreams{servers: append([]netip.AddrPort(nil), servers...)}
	}
	u := &upstreams{path: resolvConf, checked: time.Now()}
	if fi, err := os.Stat(resolvConf); err == nil {
		u.mtime = fi.ModTime()
	}
	s, err := readResolvConf(resolvConf)
	if err != nil || len(s) == 0 {
		// What glibc and Go do: a resolver on this host, if any.
		s = fallbackServers
		why := "it names no nameserver"
		if err != nil {
			why = err.Error()
		}
		log.Warn("no DNS servers given and none found: clients' DNS queries go to this host's own port 53 (name the LAN's resolvers with --dns-server)",
			"resolv_conf", resolvConf, "reason", why)
	}
	u.servers = s
	return u
}

var fallbackServers = []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53"), netip.MustParseAddrPort("[::1]:53")}

func (u *upstreams) source() string {
	if u.path == "" {
		return "configuration"
	}
	return u.path
}

// list returns the resolvers to ask, in order. A resolv.conf that changed
// (or vanished, or names none) keeps the last good list.
func (u *upstreams) list() []netip.AddrPort {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.path != "" && time.Since(u.checked) >= resolvConfCheck {
		u.checked = time.Now()
		if fi, err := os.Stat(u.path); err == nil && !fi.ModTime().Equal(u.mtime) {
			if s, err := readResolvConf(u.path); err == nil && len(s) > 0 {
				u.servers, u.mtime = s, fi.ModTime()
			}
		}
	}
	return u.servers
}

// readResolvConf returns the nameservers of a resolv.conf, port 53. Loopback
// ones (systemd-resolved's 127.0.0.53, a local dnsmasq) are kept: this
// forwarder sends from the host's own stack, where they answer. IPv6
// link-local ones with a zone keep it.
func readResolvConf(path string) ([]netip.AddrPort, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseResolvConf(b), nil
}

// parseResolvConf parses the nameserver lines of a resolv.conf: at most 8
// (glibc uses 3), unparsable ones skipped.
func parseResolvConf(b []byte) []netip.AddrPort {
	var out []netip.AddrPort
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() && len(out) < 8 {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "nameserver" {
			continue
		}
		a, err := netip.ParseAddr(f[1])
		if err != nil {
			continue
		}
		out = append(out, netip.AddrPortFrom(a, 53))
	}
	return out
}

// ParseServer parses a --dns-server value: an IP address, with a port or
// not ("192.168.1.1", "192.168.1.1:5353", "[fd00::1]:53", "fd00::1").
func ParseServer(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 {
			return netip.AddrPort{}, fmt.Errorf("DNS server %q: port 0", s)
		}
		return ap, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("DNS server %q: not an IP address, or IP:port", s)
	}
	return netip.AddrPortFrom(a, 53), nil
}

func newID() uint16 {
	var b [2]byte
	_, _ = rand.Read(b[:])
	return binary.BigEndian.Uint16(b[:])
}

// exchangeWith asks server once, over UDP (a new socket, so a new random
// source port) or TCP, and waits for the matching reply until ctx ends.
// UDP replies that do not match are dropped and counted; reading goes on.
func (f *Forwarder) exchangeWith(ctx context.Context, server netip.AddrPort, query *query, tcp bool) (*dnsmessage.Message, error) {
	m, err := f.exchangeOnce(ctx, server, query, tcp, false)
	if err == nil && m.Header.RCode == dnsmessage.RCodeFormatError {
		// RFC 6891 §7: a resolver that predates EDNS may refuse the OPT
		// record; ask it again without.
		return f.exchangeOnce(ctx, server, query, tcp, true)
	}
	return m, err
}

func (f *Forwarder) exchangeOnce(ctx context.Context, server netip.AddrPort, query *query, tcp, noEDNS bool) (*dnsmessage.Message, error) {
	id := newID()
	msg, err := upstreamQuery(query, id, noEDNS)
	if err != nil {
		return nil, err
	}
	network := "udp"
	if tcp {
		network = "tcp"
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, server.String())
	if err != nil {
		if ctx.Err() != nil {
			return nil, errTimeout
		}
		return nil, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	timeout := func(err error) error {
		var ne net.Error
		if ctx.Err() != nil || (errors.As(err, &ne) && ne.Timeout()) {
			return errTimeout
		}
		return err
	}

	if tcp {
		framed := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(msg)), uint16(len(msg)))
		if _, err := conn.Write(append(framed, msg...)); err != nil {
			return nil, timeout(err)
		}
		b, err := readFramed(conn, 65535)
		if err != nil {
			return nil, timeout(err)
		}
		m, ok := parseReply(b, id, query.question())
		if !ok {
			f.mismatched.Add(1)
			return nil, errors.New("the reply does not match the query")
		}
		return m, nil
	}

	if _, err := conn.Write(msg); err != nil {
		return nil, timeout(err)
	}
	// We offer 1232 bytes; a resolver that sends more than this gets its
	// reply cut, which then does not parse and counts as a mismatch.
	buf := make([]byte, 4096)
	// Bounded by the deadline; and a flood of wrong replies ends the
	// attempt rather than spinning in it.
	for range 64 {
		n, err := conn.Read(buf)
		if err != nil {
			return nil, timeout(err)
		}
		if m, ok := parseReply(buf[:n], id, query.question()); ok {
			return m, nil
		}
		f.mismatched.Add(1)
	}
	return nil, errors.New("too many replies that do not match the query")
}

var errBadLength = errors.New("a DNS message shorter than its header or too long")

// readFramed reads one TCP DNS message (RFC 1035 4.2.2: a 2-byte length
// first) of at most max bytes: a longer one is refused before it is read.
func readFramed(r io.Reader, max int) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	n := int(binary.BigEndian.Uint16(l[:]))
	if n < 12 || n > max {
		return nil, errBadLength
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}
