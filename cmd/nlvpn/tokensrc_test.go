package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestCLITokenSources: every way of giving a token reaches the same check
// (an agent token given to `up` is refused by name, which proves it was
// read), argv works but warns, and bad sources fail with a clear error.
func TestCLITokenSources(t *testing.T) {
	dir, _ := gatewayState(t)
	agentTok := issue(t, dir, "--agent", "miranda", "--gateway", "127.0.0.1:4433")
	files := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(files, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	private := write("private", "\n"+agentTok+"\n", 0o600)
	shared := write("shared", agentTok, 0o644)
	empty := write("empty", "\n \n", 0o600)
	garbage := write("garbage", "nlv1.garbage\n", 0o600)
	huge := write("huge", strings.Repeat("x", maxTokenLen+10), 0o600)
	const read = `token for agent "miranda"` // the token was read and checked
	const argvWarn = "every user of this machine can read it"
	for _, tc := range []struct {
		name   string
		env    []string
		stdin  string
		args   []string
		want   []string
		warn   string // in the log records before the error
		noWarn string
	}{
		{name: "argv works, with a warning", args: []string{"up", "--token", agentTok}, want: []string{read}, warn: argvWarn},
		{name: "token file", args: []string{"up", "--token-file", private}, want: []string{read}, noWarn: argvWarn},
		{name: "token file readable by others", args: []string{"up", "--token-file", shared}, want: []string{read}, warn: "chmod 600 " + shared},
		{name: "stdin", stdin: agentTok + "\n", args: []string{"up", "--token", "-"}, want: []string{read}, noWarn: argvWarn},
		{name: "environment", env: []string{"NLVPN_TOKEN=" + agentTok}, args: []string{"up"}, want: []string{read}, noWarn: argvWarn},
		{name: "both flags", args: []string{"up", "--token", agentTok, "--token-file", private}, want: []string{"not both"}},
		{name: "missing file", args: []string{"up", "--token-file", filepath.Join(files, "nope")}, want: []string{"--token-file", "no such file"}},
		{name: "empty file", args: []string{"up", "--token-file", empty}, want: []string{"--token-file", "empty"}},
		{name: "huge file", args: []string{"up", "--token-file", huge}, want: []string{"not a token"}},
		{name: "garbage in file", args: []string{"up", "--token-file", garbage}, want: []string{"--token-file", "not usable"}},
		{name: "directory", args: []string{"up", "--token-file", files}, want: []string{"--token-file"}},
		{name: "empty stdin", args: []string{"up", "--token", "-"}, want: []string{"standard input", "empty"}},
		{name: "connect keeps stdin for the connection", stdin: agentTok, args: []string{"connect", "--token", "-", "-n", "miranda", "h:22"}, want: []string{"standard input", "--token-file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			args := append([]string{tc.args[0], "--state-dir", state, "--agent", "miranda"}, tc.args[1:]...)
			if tc.args[0] == "connect" {
				args = append([]string{"connect", "--state-dir", state}, tc.args[1:]...)
			}
			r := nlvpnIn(t, tc.env, tc.stdin, args...)
			r.wantFail(t, tc.want...)
			if tc.warn != "" && !strings.Contains(r.stderr, tc.warn) {
				t.Errorf("stderr %q: want a warning with %q", r.stderr, tc.warn)
			}
			if tc.noWarn != "" && strings.Contains(r.stderr, tc.noWarn) {
				t.Errorf("stderr %q: warned %q for a token not on the command line", r.stderr, tc.noWarn)
			}
			if strings.Contains(r.stderr, agentTok) {
				t.Errorf("the token itself appears in the output: %q", r.stderr)
			}
		})
	}
}

// TestCLITokenOut: --out writes the token into a new file only its owner
// can read, and never overwrites one that exists.
func TestCLITokenOut(t *testing.T) {
	dir, _ := gatewayState(t)
	out := filepath.Join(t.TempDir(), "alice.token")
	r := nlvpn(t, nil, "token", "--state-dir", dir, "--client", "alice", "--allow-agent", "miranda", "--gateway", "127.0.0.1:4433", "-o", out)
	if r.code != 0 {
		t.Fatalf("token -o: exit %d: %s", r.code, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("token -o also printed %q", r.stdout)
	}
	st, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("token file mode %#o, want 0600", st.Mode().Perm())
	}
	first, _ := os.ReadFile(out)
	if !strings.HasPrefix(string(first), "nlv2.") {
		t.Fatalf("token file holds %q", first)
	}
	// The file is what --token-file reads: a client token for `agent` is
	// refused by role, which proves it parsed.
	nlvpn(t, nil, "agent", "--state-dir", filepath.Join(t.TempDir(), "s"), "--token-file", out, "--advertise", "10.0.0.0/8").
		wantFail(t, `token for client "alice"`)

	nlvpn(t, nil, "token", "--state-dir", dir, "--client", "bob", "--allow-agent", "miranda", "--gateway", "127.0.0.1:4433", "-o", out).
		wantFail(t, "--out", "exists")
	if again, _ := os.ReadFile(out); string(again) != string(first) {
		t.Fatal("a refused --out changed the existing file")
	}
}
