package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/client"
	"github.com/nlvpn/nlvpn/gateway"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
)

// nlvpnBin is the binary under test, built once by TestMain.
var nlvpnBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nlvpn-cli-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	nlvpnBin = filepath.Join(dir, "nlvpn")
	out, err := exec.Command("go", "build", "-o", nlvpnBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building nlvpn: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

// nlvpn runs the binary with a clean environment (no NLVPN_* from the
// caller, HOME and XDG_STATE_HOME in a temp dir), nothing on standard input
// and a 10 s limit.
func nlvpn(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return nlvpnIn(t, env, "", args...)
}

// nlvpnIn is nlvpn with stdin on standard input.
func nlvpnIn(t *testing.T, env []string, stdin string, args ...string) result {
	t.Helper()
	home := t.TempDir()
	cmd := exec.Command(nlvpnBin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + home, "XDG_STATE_HOME=" + filepath.Join(home, "state")}
	cmd.Env = append(cmd.Env, env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.Stdin = strings.NewReader(stdin)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("nlvpn %v did not exit within 10 s; stderr:\n%s", args, se.String())
	}
	return result{so.String(), se.String(), cmd.ProcessState.ExitCode()}
}

// wantFail asserts a failed run whose error is one line starting "nlvpn: "
// and containing substrs. Log records before it (warnings) are not part of
// the error.
func (r result) wantFail(t *testing.T, substrs ...string) {
	t.Helper()
	if r.code == 0 {
		t.Fatalf("exit 0, want failure; stdout %q stderr %q", r.stdout, r.stderr)
	}
	var errLines []string
	for _, l := range strings.Split(strings.TrimRight(r.stderr, "\n"), "\n") {
		if !strings.HasPrefix(l, "time=") {
			errLines = append(errLines, l)
		}
	}
	msg := strings.Join(errLines, "\n")
	if !strings.HasPrefix(msg, "nlvpn: ") {
		t.Errorf("stderr %q: want one line starting \"nlvpn: \"", r.stderr)
	}
	if len(errLines) != 1 {
		t.Errorf("error is %d lines, want one: %q", len(errLines), r.stderr)
	}
	for _, s := range substrs {
		if !strings.Contains(msg, s) {
			t.Errorf("error %q lacks %q", msg, s)
		}
	}
}

// gatewayState makes a gateway state directory, as `nlvpn gateway` would.
func gatewayState(t *testing.T) (dir, pin string) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "gw")
	st, err := gateway.OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.ReadInfo()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := gateway.LoadAuthority(dir); err != nil {
		t.Fatal(err)
	}
	return dir, info.Pin
}

// TestCLIOfflineAuthority: the authority kept on an admin machine issues
// tokens that carry its key and the gateway's pin given by hand; the
// gateway's own state is not needed for it.
func TestCLIOfflineAuthority(t *testing.T) {
	admin := filepath.Join(t.TempDir(), "admin")
	r := nlvpn(t, nil, "authority", "--state-dir", admin)
	if r.code != 0 {
		t.Fatalf("nlvpn authority: exit %d: %s", r.code, r.stderr)
	}
	pub, err := identity.ParsePublicKey(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatalf("nlvpn authority printed %q: %v", r.stdout, err)
	}
	if fi, err := os.Stat(filepath.Join(admin, gateway.AuthorityFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("authority key file: %v, %v; want mode 0600", fi, err)
	}
	// Again: the same key, not a new one.
	if r2 := nlvpn(t, nil, "authority", "--state-dir", admin); r2.stdout != r.stdout {
		t.Fatalf("a second `nlvpn authority` printed %q, then %q", r.stdout, r2.stdout)
	}
	nlvpn(t, nil, "token", "--state-dir", admin, "--client", "alice", "--allow-agent", "miranda", "--gateway", "198.18.0.1:4433").wantFail(t, "--pin")
	cl, err := token.Parse(issue(t, admin, "--client", "alice", "--allow-agent", "miranda", "--gateway", "198.18.0.1:4433", "--pin", "sha256:abcd"))
	if err != nil {
		t.Fatal(err)
	}
	if !cl.Authority.Equal(pub) || cl.Pin != "sha256:abcd" || cl.Gateway != "198.18.0.1:4433" {
		t.Fatalf("claims %+v; want authority %s, the pin and gateway given", cl, pub)
	}
	if _, err := os.Stat(filepath.Join(admin, "gateway.key")); err == nil {
		t.Fatal("issuing on the admin machine made a gateway key there")
	}
	nlvpn(t, nil, "gateway", "--authority", "ed25519:nonsense").wantFail(t, "--authority")
}

func issue(t *testing.T, dir string, args ...string) string {
	t.Helper()
	r := nlvpn(t, nil, append([]string{"token", "--state-dir", dir}, args...)...)
	if r.code != 0 {
		t.Fatalf("nlvpn token %v: exit %d: %s", args, r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n")
	if len(lines) != 1 || !strings.HasSuffix(r.stdout, "\n") {
		t.Fatalf("token output %q: want exactly one line", r.stdout)
	}
	return lines[0]
}

func TestCLITokenIssues(t *testing.T) {
	dir, pin := gatewayState(t)
	for _, tc := range []struct {
		args   []string
		role   string
		name   string
		agents []string
		gw     string
		groups []string
	}{
		{[]string{"--client", "alice", "--allow-agent", "*", "--gateway", "127.0.0.1:4433"}, token.RoleClient, "alice", []string{"*"}, "127.0.0.1:4433", nil},
		{[]string{"--agent", "miranda", "--gateway", "[::1]:4433"}, token.RoleAgent, "miranda", nil, "[::1]:4433", nil},
		{[]string{"--client", "bob", "--gateway", "127.0.0.1:1", "--allow-agent", "miranda", "--allow-agent", "caliban"}, token.RoleClient, "bob", []string{"miranda", "caliban"}, "127.0.0.1:1", nil},
		{[]string{"--client", "olga", "--allow-agent", "*", "--gateway", "127.0.0.1:1", "--group", "ops", "--group", "dev"}, token.RoleClient, "olga", []string{"*"}, "127.0.0.1:1", []string{"ops", "dev"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := time.Now()
			tok := issue(t, dir, tc.args...)
			cl, err := token.Parse(tok)
			if err != nil {
				t.Fatalf("token.Parse: %v (%q)", err, tok)
			}
			if cl.Role != tc.role || cl.Name != tc.name || cl.Pin != pin || cl.Gateway != tc.gw {
				t.Fatalf("claims %+v; want role %s name %s pin %s gateway %s", cl, tc.role, tc.name, pin, tc.gw)
			}
			if strings.Join(cl.Agents, ",") != strings.Join(tc.agents, ",") {
				t.Fatalf("agents %v, want %v", cl.Agents, tc.agents)
			}
			if strings.Join(cl.Groups, ",") != strings.Join(tc.groups, ",") {
				t.Fatalf("groups %v, want %v", cl.Groups, tc.groups)
			}
			exp := time.Unix(cl.Expires, 0)
			if d := exp.Sub(before); d < 719*time.Hour || d > 721*time.Hour {
				t.Fatalf("default expiry in %v, want 30 days", d)
			}
		})
	}
}

func TestCLITokenTTLAndPublicAddr(t *testing.T) {
	dir, pin := gatewayState(t)
	st, err := gateway.OpenState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WriteInfo(gateway.Info{Pin: pin, PublicAddr: "127.0.0.1:7000"}); err != nil {
		t.Fatal(err)
	}
	cl, err := token.Parse(issue(t, dir, "--client", "alice", "--allow-agent", "miranda", "--ttl", "1h"))
	if err != nil {
		t.Fatal(err)
	}
	if cl.Gateway != "127.0.0.1:7000" {
		t.Fatalf("gateway %q: want the gateway's --public-addr", cl.Gateway)
	}
	if d := time.Until(time.Unix(cl.Expires, 0)); d > time.Hour || d < 58*time.Minute {
		t.Fatalf("--ttl 1h gave expiry in %v", d)
	}
}

func TestCLITokenErrors(t *testing.T) {
	dir, _ := gatewayState(t)
	empty := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"no authority key", []string{"token", "--state-dir", empty, "--client", "alice", "--gateway", "127.0.0.1:4433"}, []string{"no authority key in " + empty, "nlvpn gateway", "nlvpn authority"}},
		{"both roles", []string{"token", "--state-dir", dir, "--client", "alice", "--agent", "miranda", "--gateway", "127.0.0.1:4433"}, []string{"exactly one of --agent"}},
		{"no role", []string{"token", "--state-dir", dir, "--gateway", "127.0.0.1:4433"}, []string{"exactly one of --agent"}},
		{"no gateway address", []string{"token", "--state-dir", dir, "--client", "alice"}, []string{"--gateway"}},
		{"bad gateway address", []string{"token", "--state-dir", dir, "--client", "alice", "--gateway", "127.0.0.1"}, []string{"HOST:PORT"}},
		{"bad name", []string{"token", "--state-dir", dir, "--client", "Alice Smith", "--gateway", "127.0.0.1:4433"}, []string{"Alice Smith"}},
		{"allow-agent on agent token", []string{"token", "--state-dir", dir, "--agent", "miranda", "--allow-agent", "x", "--gateway", "127.0.0.1:4433"}, []string{"--allow-agent"}},
		{"zero uses", []string{"token", "--state-dir", dir, "--client", "alice", "--uses", "0", "--gateway", "127.0.0.1:4433"}, []string{"--uses"}},
		{"too many uses", []string{"token", "--state-dir", dir, "--client", "alice", "--uses", "5000", "--gateway", "127.0.0.1:4433"}, []string{"--uses", "1000"}},
		{"group on agent token", []string{"token", "--state-dir", dir, "--agent", "miranda", "--group", "ops", "--gateway", "127.0.0.1:4433"}, []string{"--group is for client tokens"}},
		{"bad group", []string{"token", "--state-dir", dir, "--client", "alice", "--group", "Ops Team", "--gateway", "127.0.0.1:4433"}, []string{"--group", "Ops Team"}},
		{"no allowed agent", []string{"token", "--state-dir", dir, "--client", "alice", "--gateway", "127.0.0.1:4433"}, []string{"--allow-agent NAME", "'*'"}},
		{"non-positive ttl", []string{"token", "--state-dir", dir, "--client", "alice", "--ttl", "0s", "--gateway", "127.0.0.1:4433"}, []string{"--ttl"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := nlvpn(t, nil, tc.args...)
			r.wantFail(t, tc.want...)
			if r.stdout != "" {
				t.Fatalf("a failed token command printed %q on stdout", r.stdout)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(empty, "gateway.key")); err == nil {
		t.Fatal("`nlvpn token` made a gateway key in a directory that had none")
	}
}

func TestCLINodeErrors(t *testing.T) {
	dir, _ := gatewayState(t)
	badPolicy := filepath.Join(t.TempDir(), "policy")
	if err := os.WriteFile(badPolicy, []byte("allow * *\npermit * *\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	clientTok := issue(t, dir, "--client", "alice", "--gateway", "127.0.0.1:4433", "--allow-agent", "miranda")
	agentTok := issue(t, dir, "--agent", "miranda", "--gateway", "127.0.0.1:4433")
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want []string
	}{
		{"up without token", nil, []string{"up", "--agent", "x"}, []string{"no token", "--token-file", "NLVPN_TOKEN"}},
		{"agent without token", nil, []string{"agent", "--advertise", "10.0.0.0/8"}, []string{"no token"}},
		{"agent with a client token", nil, []string{"agent", "--token", clientTok, "--advertise", "10.0.0.0/8"}, []string{`token for client "alice"`, "`nlvpn agent`", "agent token"}},
		{"up with an agent token", nil, []string{"up", "--token", agentTok, "--agent", "miranda"}, []string{`token for agent "miranda"`, "`nlvpn up`", "client token"}},
		{"agent token from env for up", []string{"NLVPN_TOKEN=" + agentTok}, []string{"up", "--agent", "miranda"}, []string{`token for agent "miranda"`}},
		{"garbage token", nil, []string{"up", "--token", "nlv1.garbage", "--agent", "miranda"}, []string{"not usable"}},
		{"agent not allowed", nil, []string{"up", "--token", clientTok, "--agent", "caliban"}, []string{`does not allow agent "caliban"`, "miranda"}},
		{"invalid agent name", nil, []string{"up", "--token", clientTok, "--agent", "Not Valid"}, []string{"not a valid agent name"}},
		{"up needs --agent", nil, []string{"up", "--token", clientTok}, []string{"agent"}},
		{"direct and relay", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "-d", "-r"}, []string{"exclude each other"}},
		{"open proxy refused", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "--netstack", "--socks5", "0.0.0.0:1080"}, []string{"not loopback"}},
		{"agent without advertise", nil, []string{"agent", "--token", agentTok}, []string{"--advertise"}},
		{"agent bad advertise", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/33"}, []string{"--advertise"}},
		// Set but empty (as a unit file or a wrapper may leave it): the
		// token's gateway, not an empty one.
		{"empty NLVPN_GATEWAY", []string{"NLVPN_GATEWAY="}, []string{"up", "--token", clientTok, "--agent", "miranda", "--transport", "carrier-pigeon"}, []string{"--transport", "carrier-pigeon"}},
		{"agent advertises a default route", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/8,0.0.0.0/0"}, []string{"0.0.0.0/0", "--exit-node"}},
		{"agent advertises ::/0", nil, []string{"agent", "--token", agentTok, "--advertise", "::/0"}, []string{"::/0", "--exit-node"}},
		{"bad accept-routes", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "--accept-routes", "10.0.0.0/8,10.0.0.0/33"}, []string{"--accept-routes", "10.0.0.0/33"}},
		{"agent policy missing", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/8", "--policy", "/nonexistent/policy"}, []string{"--policy", "no such file"}},
		{"agent policy malformed", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/8", "--policy", badPolicy}, []string{"--policy", "line 2", "allow or deny"}},
		{"agent advertises loopback", nil, []string{"agent", "--token", agentTok, "--advertise", "127.0.0.0/8"}, []string{"loopback", "--allow-loopback"}},
		{"bad gateway override", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "--gateway", "nohostport"}, []string{"HOST:PORT"}},
		{"bad transport", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "--transport", "quic"}, []string{"--transport", `"quic"`, "auto, udp or tcp"}},
		{"bad proxy", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/8", "--proxy", "socks5://10.0.0.1:1080"}, []string{"--proxy", "only http://"}},
		{"bad HTTPS_PROXY", []string{"HTTPS_PROXY=ftp://10.0.0.1:21"}, []string{"up", "--token", clientTok, "--agent", "miranda", "--gateway", "198.18.0.1:4433"}, []string{"HTTPS_PROXY", "only http://"}},
		{"proxy with udp only", nil, []string{"connect", "--token", clientTok, "-n", "miranda", "--transport", "udp", "--proxy", "http://10.0.0.1:3128", "h:22"}, []string{"--proxy", "--transport auto or tcp"}},
		{"forward nothing", nil, []string{"forward", "--token", clientTok, "-n", "miranda"}, []string{"nothing to forward"}},
		{"forward bad spec", nil, []string{"forward", "--token", clientTok, "-n", "miranda", "-L", "8080:h"}, []string{"[BIND:]PORT:HOST:HOSTPORT"}},
		{"connect without target", nil, []string{"connect", "--token", clientTok, "-n", "miranda"}, []string{"usage"}},
		{"connect bad target", nil, []string{"connect", "--token", clientTok, "-n", "miranda", "nohostport"}, []string{"HOST:PORT"}},
		{"bad log level", nil, []string{"--log-level", "loud", "status"}, []string{"--log-level"}},
		{"agent metrics on every interface", nil, []string{"agent", "--token", agentTok, "--advertise", "10.0.0.0/8", "--metrics", "0.0.0.0:9"}, []string{"--metrics", "0.0.0.0:9", "not a loopback address", "--metrics-allow-remote"}},
		{"up metrics on a public address", nil, []string{"up", "--token", clientTok, "--agent", "miranda", "--metrics", "198.18.0.1:9"}, []string{"--metrics", "198.18.0.1:9", "not a loopback address", "--metrics-allow-remote"}},
		{"gateway metrics without a port", nil, []string{"gateway", "--metrics", "127.0.0.1"}, []string{"--metrics", "HOST:PORT"}},
		{"gateway metrics on every interface", nil, []string{"gateway", "--metrics", ":9"}, []string{"--metrics", "not a loopback address", "--metrics-allow-remote"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			args := append([]string{tc.args[0], "--state-dir", state}, tc.args[1:]...)
			if tc.args[0] == "--log-level" {
				args = append(tc.args, "--state-dir", state)
			}
			nlvpn(t, tc.env, args...).wantFail(t, tc.want...)
			// A refused token is never saved for the next run.
			if _, err := os.Stat(filepath.Join(state, "config")); err == nil {
				t.Fatal("a failed run wrote the config file")
			}
		})
	}
}

func TestCLIHelpListsCommands(t *testing.T) {
	r := nlvpn(t, nil, "--help")
	if r.code != 0 {
		t.Fatalf("--help exit %d: %s", r.code, r.stderr)
	}
	for _, c := range []string{"gateway", "token", "agent", "up", "connect", "forward", "status", "version"} {
		found := false
		for _, line := range strings.Split(r.stdout, "\n") {
			if f := strings.Fields(line); len(f) > 0 && strings.TrimSuffix(f[0], ",") == c {
				found = true
			}
		}
		if !found {
			t.Errorf("--help does not list the %q command:\n%s", c, r.stdout)
		}
	}
	// Each command's own help works and exits 0.
	for _, c := range []string{"gateway", "token", "agent", "up", "connect", "forward", "status"} {
		if r := nlvpn(t, nil, c, "--help"); r.code != 0 || !strings.Contains(r.stdout, c) {
			t.Errorf("nlvpn %s --help: exit %d, stdout %q", c, r.code, r.stdout)
		}
	}
}

func TestCLIStatusNoTunnel(t *testing.T) {
	state := t.TempDir()
	nlvpn(t, nil, "status", "--state-dir", state).wantFail(t, "no running nlvpn", filepath.Join(state, "status.sock"))
	nlvpn(t, nil, "status", "--json", "--state-dir", state).wantFail(t, "no running nlvpn")
}

// TestCLIStatusReadsSocket serves a status on STATE-DIR/status.sock, as a
// running `nlvpn up` does, and reads it with `nlvpn status`.
func TestCLIStatusReadsSocket(t *testing.T) {
	state, err := os.MkdirTemp("", "nlst")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(state)
	ln, err := net.Listen("unix", filepath.Join(state, "status.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	want := client.Status{Agent: "miranda", Path: "direct", Remote: "127.0.0.1:40000", RTTMillis: 1.25, TxBytes: 1000, RxBytes: 2000, SinceSwitchS: 65,
		Transport: "tcp via proxy 10.0.1.1:3128"}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			json.NewEncoder(c).Encode(want)
			c.Close()
		}
	}()

	r := nlvpn(t, nil, "status", "--json", "--state-dir", state)
	if r.code != 0 {
		t.Fatalf("status --json: exit %d: %s", r.code, r.stderr)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("status --json printed %q: %v", r.stdout, err)
	}
	for k, v := range map[string]any{"path": "direct", "remote": "127.0.0.1:40000", "rtt_ms": 1.25, "tx_bytes": 1000.0, "rx_bytes": 2000.0, "since_switch_s": 65.0,
		"transport": "tcp via proxy 10.0.1.1:3128"} {
		if m[k] != v {
			t.Errorf("status --json %q = %v, want %v", k, m[k], v)
		}
	}

	r = nlvpn(t, nil, "status", "--state-dir", state)
	if r.code != 0 {
		t.Fatalf("status: exit %d: %s", r.code, r.stderr)
	}
	for _, s := range []string{"miranda", "direct", "127.0.0.1:40000", "1.25 ms", "1000 bytes", "2000 bytes", "1m5s ago", "over tcp via proxy 10.0.1.1:3128"} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("status output lacks %q:\n%s", s, r.stdout)
		}
	}
}

// nlvpn version names the release (set at build time, or the module's
// version) and the Go version, for bug reports; --version says the same.
func TestCLIVersion(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "nlvpn")
	if out, err := exec.Command("go", "build", "-buildvcs=false", "-ldflags=-X main.version=v9.8.7", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := exec.Command(bin, args...).Output()
		if err != nil || !strings.Contains(string(out), "v9.8.7") || !strings.Contains(string(out), runtime.Version()) {
			t.Errorf("nlvpn %s: %q, %v; want the release v9.8.7 and %s", args[0], out, err, runtime.Version())
		}
	}
	if r := nlvpn(t, nil, "version"); r.code != 0 || !strings.HasPrefix(r.stdout, "nlvpn ") {
		t.Errorf("nlvpn version: exit %d, %q", r.code, r.stdout)
	}
}
