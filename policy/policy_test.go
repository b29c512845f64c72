package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

const example = `
# the package doc's example
allow client:alice   192.168.1.0/24  22,443  tcp
allow group:ops      *
deny  *              192.168.1.10
allow *              192.168.1.0/24  80,443  tcp
allow client:bob,group:dns 192.168.1.53 53 udp   # DNS for bob and the dns group
allow *              192.168.1.0/24  *       icmp
allow client:carol   10.0.0.0/8      8000-8080
`

func TestDecide(t *testing.T) {
	p, err := Parse([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	alice := Subject{Name: "alice"}
	bob := Subject{Name: "bob", Groups: []string{"staff"}}
	ops := Subject{Name: "olga", Groups: []string{"staff", "ops"}}
	dns := Subject{Name: "dave", Groups: []string{"dns"}}
	carol := Subject{Name: "carol"}
	for _, tc := range []struct {
		who   Subject
		dst   string
		proto string
		want  bool
		line  int // 0: no rule matched
	}{
		{alice, "192.168.1.5:22", "tcp", true, 3},
		{alice, "192.168.1.5:22", "udp", false, 0},   // no rule for udp/22
		{alice, "192.168.1.10:22", "tcp", true, 3},   // her rule comes before the deny
		{alice, "192.168.1.10:80", "tcp", false, 5},  // the deny
		{alice, "192.168.1.5:80", "tcp", true, 6},    // everyone's web
		{alice, "192.168.1.5:8080", "tcp", false, 0}, // default deny
		{alice, "[::ffff:192.168.1.5]:443", "tcp", true, 3},
		{ops, "10.1.2.3:9999", "udp", true, 4},   // ops: anything
		{ops, "192.168.1.10:80", "tcp", true, 4}, // before the deny
		{bob, "192.168.1.53:53", "udp", true, 7},
		{dns, "192.168.1.53:53", "udp", true, 7},
		{dns, "192.168.1.53:53", "tcp", false, 0},
		{bob, "192.168.1.9:0", "icmp", true, 8},
		{bob, "192.168.1.10:0", "icmp", false, 5}, // the deny covers ping too
		{carol, "10.9.9.9:8000", "tcp", true, 9},
		{carol, "10.9.9.9:8080", "udp", true, 9},
		{carol, "10.9.9.9:8081", "tcp", false, 0},
		{carol, "10.9.9.9:0", "icmp", true, 9},        // ports do not apply to icmp
		{Subject{}, "192.168.1.5:80", "tcp", true, 6}, // a nameless subject still gets "*"
	} {
		got, r := p.Decide(tc.who, netip.MustParseAddrPort(tc.dst), tc.proto)
		line := 0
		if r != nil {
			line = r.Line
		}
		if got != tc.want || line != tc.line {
			t.Errorf("%s %s %s: %v by line %d, want %v by line %d", tc.who.Name, tc.dst, tc.proto, got, line, tc.want, tc.line)
		}
	}
	empty, err := Parse([]byte("# nothing allowed\n"))
	if err != nil {
		t.Fatal(err)
	}
	if ok, _ := empty.Decide(alice, netip.MustParseAddrPort("192.168.1.5:22"), "tcp"); ok {
		t.Error("an empty policy allowed a flow")
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		text, want string
		line       int
	}{
		{"permit * *", "allow or deny", 1},
		{"allow *", "want: allow|deny", 1},
		{"allow * * 22 tcp extra", "want: allow|deny", 1},
		{"\n\nallow user:alice *", "client:NAME", 3},
		{"allow client:Alice *", "client:NAME", 1},
		{"allow client: *", "client:NAME", 1},
		{"allow * 192.168.1.0/33", "destination", 1},
		{"allow * 192.168.1.x", "destination", 1},
		{"allow * ::ffff:10.0.0.0/104", "IPv4", 1},
		{"allow * * 0", "ports", 1},
		{"allow * * 70000", "ports", 1},
		{"allow * * 90-80", "ports", 1},
		{"allow * * 22,", "ports", 1},
		{"allow * * 22 sctp", "protocol", 1},
		{"allow * * 22 icmp", "icmp has no ports", 1},
	} {
		_, err := Parse([]byte(tc.text))
		var pe *ParseError
		if !errors.As(err, &pe) || pe.Line != tc.line || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q) = %v, want an error on line %d about %q", tc.text, err, tc.line, tc.want)
		}
	}
	if _, err := Parse([]byte(strings.Repeat("allow * *\n", MaxRules+1))); err == nil {
		t.Error("more than MaxRules rules parsed")
	}
	if _, err := Parse(make([]byte, MaxFileSize+1)); err == nil {
		t.Error("an oversize policy parsed")
	}
}

// FuzzParse: no input crashes or hangs the parser, and what it accepts
// decides without panicking.
func FuzzParse(f *testing.F) {
	f.Add([]byte(example))
	f.Add([]byte("allow * * * *\n"))
	f.Add([]byte("deny client:a,group:b ::/0 1-65535 udp # c\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Parse(b)
		if err != nil {
			return
		}
		for _, dst := range []string{"192.168.1.5:22", "[2001:db8::1]:443", "10.0.0.1:0"} {
			for _, proto := range []string{"tcp", "udp", "icmp"} {
				p.Decide(Subject{Name: "alice", Groups: []string{"ops"}}, netip.MustParseAddrPort(dst), proto)
			}
		}
	})
}
