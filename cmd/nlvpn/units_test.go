package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// TestUnitsUseRealFlags reads the systemd units in packaging/systemd: the
// command and flags of each ExecStart, and of the flag examples in their
// comments (NLVPN_..._ARGS=...), must be nlvpn's, so a renamed flag cannot
// leave a unit that fails at start. Nodes' tokens come from a credential
// (LoadCredential=, --token-file in $CREDENTIALS_DIRECTORY), never from
// the command line. systemd-analyze checks the rest (make units-check).
func TestUnitsUseRealFlags(t *testing.T) {
	files, err := filepath.Glob("../../packaging/systemd/*.service")
	if err != nil || len(files) < 3 {
		t.Fatalf("want the gateway, agent and client units, found %v (%v)", files, err)
	}
	cmds := map[string]*cli.Command{}
	for _, c := range newApp().Commands {
		cmds[c.Name] = c
	}
	// A drop-in (UNIT.service.d/NAME.conf) is checked as its unit with the
	// drop-in after it, as systemd reads them: its ExecStart= replaces
	// the unit's.
	dropIns, err := filepath.Glob("../../packaging/systemd/*.service.d/*.conf")
	if err != nil {
		t.Fatal(err)
	}
	files = append(files, dropIns...)
	example := regexp.MustCompile(`^#\s+NLVPN_[A-Z]+_ARGS=(.*)$`)
	for _, file := range files {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		name := filepath.Base(file)
		if unit, ok := strings.CutSuffix(filepath.Dir(file), ".d"); ok {
			base, err := os.ReadFile(unit)
			if err != nil {
				t.Fatalf("drop-in %s: no unit %s: %v", file, unit, err)
			}
			b = append(append(base, '\n'), b...)
			name = filepath.Base(unit) + " with " + name
		}
		var exec []string
		var examples [][]string
		var credential bool
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "ExecStart="); ok {
				exec = strings.Fields(v)
			}
			if m := example.FindStringSubmatch(line); m != nil {
				examples = append(examples, strings.Fields(m[1]))
			}
			if strings.HasPrefix(line, "LoadCredential=token:/etc/nlvpn/") {
				credential = true
			}
		}
		if len(exec) < 2 || exec[0] != "/usr/local/bin/nlvpn" {
			t.Errorf("%s: ExecStart %q does not run /usr/local/bin/nlvpn", name, exec)
			continue
		}
		cmd := cmds[exec[1]]
		if cmd == nil {
			t.Errorf("%s: nlvpn has no command %q", name, exec[1])
			continue
		}
		flags := map[string]bool{}
		for _, f := range cmd.Flags {
			for _, s := range flagSpellings(f) {
				flags[s] = true
			}
		}
		for _, words := range append([][]string{exec[2:]}, examples...) {
			for _, w := range words {
				if strings.HasPrefix(w, "-") && !flags[w] {
					t.Errorf("%s: nlvpn %s has no flag %s", name, cmd.Name, w)
				}
			}
		}
		line := strings.Join(exec, " ")
		if strings.Contains(line, "--token ") {
			t.Errorf("%s: a token on the command line: %s", name, line)
		}
		if cmd.Name == "gateway" {
			continue
		}
		if !credential || !strings.Contains(line, "--token-file ${CREDENTIALS_DIRECTORY}/token") {
			t.Errorf("%s: the token should come from LoadCredential=token:/etc/nlvpn/... and --token-file ${CREDENTIALS_DIRECTORY}/token", name)
		}
		if !strings.Contains(line, "--state-dir ${STATE_DIRECTORY}") {
			t.Errorf("%s: the state should be in the unit's StateDirectory (--state-dir ${STATE_DIRECTORY})", name)
		}
	}
}
