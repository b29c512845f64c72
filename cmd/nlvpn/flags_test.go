package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/client"
	"github.com/nlvpn/nlvpn/cluster"
	"github.com/nlvpn/nlvpn/gateway"
	"github.com/nlvpn/nlvpn/wire"
)

func TestParseForward(t *testing.T) {
	for _, tc := range []struct {
		in      string
		listen  string
		target  string
		wantErr string
	}{
		{in: "8080:intranet.lan:80", listen: "127.0.0.1:8080", target: "intranet.lan:80"},
		{in: "0.0.0.0:8080:10.0.0.5:22", listen: "0.0.0.0:8080", target: "10.0.0.5:22"},
		{in: "127.0.0.1:1:h:65535", listen: "127.0.0.1:1", target: "h:65535"},
		{in: ":8080:h:80", listen: ":8080", target: "h:80"}, // empty BIND: every address, as ssh -L
		{in: "8080:h", wantErr: "[BIND:]PORT:HOST:HOSTPORT"},
		{in: "8080", wantErr: "[BIND:]PORT:HOST:HOSTPORT"},
		{in: "", wantErr: "[BIND:]PORT:HOST:HOSTPORT"},
		{in: "a:b:8080:h:80", wantErr: "[BIND:]PORT:HOST:HOSTPORT"},
		{in: "x:h:80", wantErr: "not a port"},
		{in: "8080:h:y", wantErr: "not a port"},
		{in: "0:h:80", wantErr: "not a port"},
		{in: "8080:h:0", wantErr: "not a port"},
		{in: "65536:h:80", wantErr: "not a port"},
		{in: "8080:h:70000", wantErr: "not a port"},
		{in: "-1:h:80", wantErr: "not a port"},
		{in: "8080::80", wantErr: "no host"},
		{in: "127.0.0.1:8080::80", wantErr: "no host"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			f, err := parseForward("tcp", tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseForward(%q) = %+v, %v; want error with %q", tc.in, f, err, tc.wantErr)
				}
				if !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.in)) {
					t.Fatalf("error %q does not quote the bad spec", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.network != "tcp" || f.listen != tc.listen || f.target != tc.target {
				t.Fatalf("parseForward(%q) = %+v, want listen %s target %s", tc.in, f, tc.listen, tc.target)
			}
		})
	}
	if f, err := parseForward("udp", "53:dns.lan:53"); err != nil || f.network != "udp" {
		t.Fatalf("udp forward: %+v %v", f, err)
	}
}

// runWithFlags runs a one-command cli.App with flags and args and calls
// action with its context.
func runWithFlags(t *testing.T, flags []cli.Flag, args []string, action func(*cli.Context) error) error {
	t.Helper()
	app := &cli.App{
		Name:           "t",
		Flags:          flags,
		Action:         action,
		Writer:         &strings.Builder{},
		ErrWriter:      &strings.Builder{},
		ExitErrHandler: func(*cli.Context, error) {},
	}
	return app.Run(append([]string{"t"}, args...))
}

func TestProxyConfig(t *testing.T) {
	for _, env := range []string{"NLVPN_PROXY_USER", "NLVPN_PROXY_PASSWORD"} {
		t.Setenv(env, "")
	}
	for _, tc := range []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
		check   func(t *testing.T, nc *client.NetstackConfig)
	}{
		{name: "defaults are loopback, no auth", check: func(t *testing.T, nc *client.NetstackConfig) {
			if nc.SOCKS5 != "127.0.0.1:1080" || nc.HTTP != "127.0.0.1:8080" || nc.Auth != nil {
				t.Fatalf("%+v", nc)
			}
		}},
		{name: "v6 loopback and localhost ok", args: []string{"--socks5", "[::1]:1080", "--http-proxy", "localhost:8080"}},
		{name: "disabled proxies", args: []string{"--socks5", "", "--http-proxy", ""}, check: func(t *testing.T, nc *client.NetstackConfig) {
			if nc.SOCKS5 != "" || nc.HTTP != "" {
				t.Fatalf("%+v", nc)
			}
		}},
		{name: "all interfaces without auth", args: []string{"--socks5", "0.0.0.0:1080"}, wantErr: "not loopback"},
		{name: "empty host without auth", args: []string{"--http-proxy", ":8080"}, wantErr: "not loopback"},
		{name: "LAN address without auth", args: []string{"--http-proxy", "192.168.1.5:8080"}, wantErr: "not loopback"},
		{name: "a name that only resolves to loopback is still refused", args: []string{"--socks5", "myhost:1080"}, wantErr: "not loopback"},
		{name: "user without password", args: []string{"--proxy-user", "me"}, wantErr: "go together"},
		{name: "password without user", args: []string{"--proxy-password", "pw"}, wantErr: "go together"},
		{name: "password from env without user", env: map[string]string{"NLVPN_PROXY_PASSWORD": "pw"}, wantErr: "go together"},
		{name: "beyond loopback with auth", args: []string{"--socks5", "0.0.0.0:1080", "--proxy-user", "me"}, env: map[string]string{"NLVPN_PROXY_PASSWORD": "pw"},
			check: func(t *testing.T, nc *client.NetstackConfig) {
				if nc.Auth == nil || nc.Auth.User != "me" || nc.Auth.Password != "pw" {
					t.Fatalf("auth %+v", nc.Auth)
				}
			}},
		{name: "no port", args: []string{"--socks5", "127.0.0.1"}, wantErr: "HOST:PORT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var nc *client.NetstackConfig
			err := runWithFlags(t, proxyFlagList(), tc.args, func(c *cli.Context) error {
				var err error
				nc, err = proxyConfig(c)
				return err
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.check != nil {
				tc.check(t, nc)
			}
		})
	}
}

func TestModeFlags(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    string
		wantErr string
	}{
		{args: nil, want: wire.ModeAuto},
		{args: []string{"--direct"}, want: wire.ModeDirect},
		{args: []string{"-d"}, want: wire.ModeDirect},
		{args: []string{"--relay"}, want: wire.ModeRelay},
		{args: []string{"-r"}, want: wire.ModeRelay},
		{args: []string{"-d", "-r"}, wantErr: "exclude each other"},
		{args: []string{"--direct", "--relay"}, wantErr: "exclude each other"},
		{args: []string{"-d", "--direct-timeout", "0s"}, wantErr: "direct-timeout"},
		{args: []string{"-d", "--direct-timeout", "3s"}, want: wire.ModeDirect},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var mode string
			err := runWithFlags(t, modeFlagList(), tc.args, func(c *cli.Context) error {
				var err error
				mode, err = modeFlags(c)
				return err
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || mode != tc.want {
				t.Fatalf("mode %q err %v, want %q", mode, err, tc.want)
			}
		})
	}
}

func TestOneLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"plain", "plain"},
		{"a\nb", "a; b"},
		{"a\nb\nc", "a; b; c"},
		{"trailing\n", "trailing; "},
	} {
		if got := oneLine(errors.New(tc.in)); got != tc.want {
			t.Errorf("oneLine(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	wrapped := fmt.Errorf("outer: %w", errors.New("inner\ndetail"))
	if got := oneLine(wrapped); strings.Contains(got, "\n") {
		t.Errorf("oneLine left a newline: %q", got)
	}
}

func TestParseDomains(t *testing.T) {
	got, err := parseDomains([]string{"Office.LAN.", "office.lan", " corp.example "})
	if err != nil || strings.Join(got, ",") != "office.lan,corp.example" {
		t.Fatalf("parseDomains = %q, %v", got, err)
	}
	for _, bad := range []string{"", "office lan", "~office.lan", "office.lan;reboot", "-x.lan"} {
		if _, err := parseDomains([]string{bad}); err == nil || !strings.Contains(err.Error(), "--dns-domain") {
			t.Errorf("parseDomains(%q) = %v, want an error naming the flag", bad, err)
		}
	}
	if _, err := parseDomains(make([]string, 17)); err == nil {
		t.Error("17 domains accepted")
	}
}

func TestACMEConfig(t *testing.T) {
	flags := append([]cli.Flag{&cli.StringFlag{Name: "public-addr"}, &cli.StringFlag{Name: "cert"}}, acmeFlags()...)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, []byte("not a certificate"), 0o644)
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr string
	}{
		{name: "off", args: nil},
		{name: "on", args: []string{"--acme-domain", "gw.example.com", "--public-addr", "gw.example.com:4433"}},
		{name: "email without domain", args: []string{"--acme-email", "me@example.com"}, wantErr: "needs --acme-domain"},
		{name: "no public address", args: []string{"--acme-domain", "gw.example.com"}, wantErr: "needs --public-addr"},
		{name: "another host", args: []string{"--acme-domain", "gw.example.com", "--public-addr", "198.18.1.2:4433"}, wantErr: "names another host"},
		{name: "with a certificate file", args: []string{"--acme-domain", "gw.example.com", "--public-addr", "gw.example.com:4433", "--cert", "c.pem"}, wantErr: "exclude each other"},
		{name: "CA file without a certificate", args: []string{"--acme-domain", "gw.example.com", "--public-addr", "gw.example.com:4433", "--acme-ca", ca}, wantErr: "no PEM certificate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfg *gateway.ACMEConfig
			err := runWithFlags(t, flags, tc.args, func(c *cli.Context) error {
				var err error
				cfg, err = acmeConfig(c)
				return err
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (cfg != nil) != (len(tc.args) > 0) || cfg != nil && (cfg.Domain != "gw.example.com" || cfg.HTTPAddr != ":80") {
				t.Fatalf("config %+v", cfg)
			}
		})
	}
}

// --mtu fixes the node's UDP size from the path MTU, refuses what is too
// small for a session, and is absent (0: learn it) by default.
func TestMTUFlag(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		want    int
		wantErr string
	}{
		{nil, 0, ""},
		{[]string{"--mtu", "1500"}, 1452, ""},
		{[]string{"--mtu", "1492"}, 1452, ""},
		{[]string{"--mtu", "1400"}, 1372, ""},
		{[]string{"--mtu", "1280"}, 1252, ""},
		{[]string{"--mtu", "1279"}, 0, "--mtu: path MTU 1279 is too small"},
		{[]string{"--mtu", "0"}, 0, "--mtu: path MTU 0 is too small"},
	} {
		var got int
		err := runWithFlags(t, nodeFlags(), tc.args, func(c *cli.Context) error {
			var err error
			got, err = udpSizeFlag(c)
			return err
		})
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%v: error %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%v: %d, %v; want %d", tc.args, got, err, tc.want)
		}
	}
}

func TestClusterConfig(t *testing.T) {
	flags := append([]cli.Flag{&cli.StringFlag{Name: "public-addr"}}, clusterFlags()...)
	for _, tc := range []struct {
		name     string
		args     []string
		wantURLs []string
		wantErr  string
	}{
		{name: "off", args: nil},
		{name: "two servers", args: []string{"--cluster", "nats://198.18.9.1:4222, nats://198.18.9.2:4222", "--public-addr", "gw1.example.com:4433", "--cluster-creds", "/etc/nlvpn/nats.creds"},
			wantURLs: []string{"nats://198.18.9.1:4222", "nats://198.18.9.2:4222"}},
		{name: "no public address", args: []string{"--cluster", "nats://198.18.9.1:4222"}, wantErr: "needs --public-addr"},
		{name: "creds without cluster", args: []string{"--cluster-creds", "x"}, wantErr: "needs --cluster"},
		{name: "not a URL", args: []string{"--cluster", "198.18.9.1:4222", "--public-addr", "gw:4433"}, wantErr: "not a NATS URL"},
		{name: "password in the URL", args: []string{"--cluster", "nats://gw:secret@198.18.9.1:4222", "--public-addr", "gw:4433"}, wantErr: "--cluster-creds"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfg *cluster.Config
			err := runWithFlags(t, flags, tc.args, func(c *cli.Context) error {
				var err error
				cfg, err = clusterConfig(c)
				return err
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one with %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Fatalf("the error shows the password: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (cfg == nil) != (tc.wantURLs == nil) || (cfg != nil && strings.Join(cfg.URLs, " ") != strings.Join(tc.wantURLs, " ")) {
				t.Fatalf("config %+v, want URLs %v", cfg, tc.wantURLs)
			}
		})
	}
}
