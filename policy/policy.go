// Package policy is an agent's access policy: which clients (by name, or by
// a group their credential carries) may reach which destinations, ports and
// protocols. A policy is a list of rules; the first rule that matches a new
// flow decides, and a flow no rule matches is denied.
//
// The file has one rule per line; '#' starts a comment:
//
//	allow|deny  WHO  DEST  [PORTS]  [PROTO]
//
//	WHO    *, client:NAME or group:NAME; several joined by commas match any
//	DEST   * (whatever the agent serves), an address, or a CIDR prefix
//	PORTS  * (the default), 22, 8000-8080, or several joined by commas
//	PROTO  * (the default), tcp, udp or icmp (icmp has no ports: PORTS *)
//
// For example:
//
//	allow client:alice   192.168.1.0/24  22,443  tcp
//	allow group:ops      *
//	deny  *              192.168.1.10
//	allow *              192.168.1.0/24  80,443  tcp
package policy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
)

// Limits on a policy file: a policy is read by a running agent on SIGHUP,
// so a wrong path or a runaway generator must fail, not fill memory.
const (
	MaxFileSize = 1 << 20
	MaxRules    = 10000
)

// Subject is who opens a flow: a client's name and its groups.
type Subject struct {
	Name   string
	Groups []string
}

// Rule is one line of a policy.
type Rule struct {
	Line  int // in the file, for messages
	Allow bool
	// Who: any of these; empty means anyone.
	Clients, Groups []string
	Anyone          bool
	// Dest: the prefix, or invalid for *.
	Dest netip.Prefix
	// Ports: any of these ranges; empty means every port.
	Ports []PortRange
	// Proto: "tcp", "udp", "icmp", or "" for any.
	Proto string
}

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi uint16 }

// Policy is a parsed policy.
type Policy struct {
	Rules []Rule
}

// Decide returns whether s may open a flow to dst over proto ("tcp", "udp"
// or "icmp"), and the rule that decided (nil: no rule matched, denied).
func (p *Policy) Decide(s Subject, dst netip.AddrPort, proto string) (bool, *Rule) {
	ip := dst.Addr().Unmap()
	for i := range p.Rules {
		r := &p.Rules[i]
		if r.matches(s, ip, dst.Port(), proto) {
			return r.Allow, r
		}
	}
	return false, nil
}

func (r *Rule) matches(s Subject, ip netip.Addr, port uint16, proto string) bool {
	if r.Proto != "" && r.Proto != proto {
		return false
	}
	if r.Dest.IsValid() && !r.Dest.Contains(ip) {
		return false
	}
	if len(r.Ports) > 0 && proto != "icmp" {
		in := false
		for _, pr := range r.Ports {
			if port >= pr.Lo && port <= pr.Hi {
				in = true
				break
			}
		}
		if !in {
			return false
		}
	}
	if r.Anyone {
		return true
	}
	for _, c := range r.Clients {
		if c == s.Name {
			return true
		}
	}
	for _, g := range r.Groups {
		for _, sg := range s.Groups {
			if g == sg {
				return true
			}
		}
	}
	return false
}

// String is the rule as it would be written, for logs.
func (r *Rule) String() string {
	if r == nil {
		return "no rule matched (default deny)"
	}
	return fmt.Sprintf("line %d", r.Line)
}

// ParseError is a policy file's error, naming the line.
type ParseError struct {
	Line int
	Err  error
}

func (e *ParseError) Error() string { return fmt.Sprintf("policy line %d: %v", e.Line, e.Err) }
func (e *ParseError) Unwrap() error { return e.Err }

// Parse reads a policy. Every malformed line is an error that names it:
// a typo must never silently widen or narrow access.
func Parse(b []byte) (*Policy, error) {
	if len(b) > MaxFileSize {
		return nil, fmt.Errorf("policy is %d bytes, more than %d", len(b), MaxFileSize)
	}
	p := &Policy{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), MaxFileSize)
	n := 0
	for sc.Scan() {
		n++
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(p.Rules) == MaxRules {
			return nil, &ParseError{n, fmt.Errorf("more than %d rules", MaxRules)}
		}
		r, err := parseRule(f)
		if err != nil {
			return nil, &ParseError{n, err}
		}
		r.Line = n
		p.Rules = append(p.Rules, r)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return p, nil
}

func parseRule(f []string) (Rule, error) {
	var r Rule
	if len(f) < 3 || len(f) > 5 {
		return r, errors.New("want: allow|deny WHO DEST [PORTS] [PROTO]")
	}
	switch f[0] {
	case "allow":
		r.Allow = true
	case "deny":
	default:
		return r, fmt.Errorf("%q: want allow or deny", f[0])
	}
	for _, w := range strings.Split(f[1], ",") {
		kind, name, ok := strings.Cut(w, ":")
		switch {
		case w == "*":
			r.Anyone = true
		case ok && kind == "client" && validName(name):
			r.Clients = append(r.Clients, name)
		case ok && kind == "group" && validName(name):
			r.Groups = append(r.Groups, name)
		default:
			return r, fmt.Errorf("who %q: want *, client:NAME or group:NAME", w)
		}
	}
	if f[2] != "*" {
		d, err := parseDest(f[2])
		if err != nil {
			return r, err
		}
		r.Dest = d
	}
	if len(f) > 3 && f[3] != "*" {
		for _, ps := range strings.Split(f[3], ",") {
			pr, err := parsePorts(ps)
			if err != nil {
				return r, err
			}
			r.Ports = append(r.Ports, pr)
		}
	}
	if len(f) > 4 {
		switch f[4] {
		case "*":
		case "tcp", "udp":
			r.Proto = f[4]
		case "icmp":
			if len(r.Ports) > 0 {
				return r, errors.New("icmp has no ports: use * for PORTS")
			}
			r.Proto = f[4]
		default:
			return r, fmt.Errorf("protocol %q: want *, tcp, udp or icmp", f[4])
		}
	}
	return r, nil
}

func parseDest(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, fmt.Errorf("destination %q: %v", s, err)
		}
		if p.Addr().Is4In6() {
			return p, fmt.Errorf("destination %q: write IPv4 as IPv4", s)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("destination %q: want *, an address or a CIDR prefix", s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func parsePorts(s string) (PortRange, error) {
	lo, hi, isRange := strings.Cut(s, "-")
	l, err1 := strconv.ParseUint(lo, 10, 16)
	h := l
	var err2 error
	if isRange {
		h, err2 = strconv.ParseUint(hi, 10, 16)
	}
	if err1 != nil || err2 != nil || l == 0 || h < l {
		return PortRange{}, fmt.Errorf("ports %q: want *, PORT or LOW-HIGH with 1 <= LOW <= HIGH <= 65535", s)
	}
	return PortRange{uint16(l), uint16(h)}, nil
}

// validName is token.ValidName's rule (lower-case letters, digits, '.',
// '_' and '-', at most 63), kept here so a mechanism does not import the
// token package.
func validName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i, c := range []byte(s) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// Load reads and parses the policy file at path.
func Load(path string) (*Policy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, err
	}
	p, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, nil
}

// Current is the policy in force, replaced whole on reload and read
// without a lock by every new flow.
type Current struct{ p atomic.Pointer[Policy] }

// Load returns the policy in force.
func (c *Current) Load() *Policy { return c.p.Load() }

// Store puts p in force.
func (c *Current) Store(p *Policy) { c.p.Store(p) }
