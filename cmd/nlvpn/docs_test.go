package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"
)

// cliCommands walks the app's visible commands (not urfave/cli's help),
// with their paths ("token revoke").
func cliCommands(prefix string, cmds []*cli.Command, visit func(path string, cmd *cli.Command)) {
	for _, cmd := range cmds {
		if cmd.Hidden || cmd.Name == "help" {
			continue
		}
		path := strings.TrimSpace(prefix + " " + cmd.Name)
		visit(path, cmd)
		cliCommands(path, cmd.Subcommands, visit)
	}
}

// flagSpellings are a flag's names as typed: --long or -s.
func flagSpellings(f cli.Flag) []string {
	var out []string
	for _, n := range f.Names() {
		if len(n) == 1 {
			out = append(out, "-"+n)
		} else {
			out = append(out, "--"+n)
		}
	}
	return out
}

func TestManNamesEveryCommandAndFlag(t *testing.T) {
	r := nlvpn(t, nil, "man")
	if r.code != 0 {
		t.Fatalf("nlvpn man: exit %d\n%s", r.code, r.stderr)
	}
	page := r.stdout
	if !strings.HasPrefix(page, ".nh\n.TH nlvpn 1") {
		t.Fatalf("not a roff page for section 1: %.80q", page)
	}
	// Text as a reader sees it: roff writes a minus as \-, fonts as \fB..\fR.
	text := strings.NewReplacer(`\-`, "-", `\fB`, "", `\fR`, "", `\fP`, "", `\fI`, "", "`", "").Replace(page)
	// Each section's text by its heading (.SH for commands, .SS for subcommands).
	sections := map[string]string{}
	head := ""
	for _, l := range strings.Split(text, "\n") {
		if h, ok := strings.CutPrefix(l, ".SH "); ok {
			head = h
		} else if h, ok := strings.CutPrefix(l, ".SS "); ok {
			head = h
		} else {
			sections[head] += l + "\n"
		}
	}
	app := newApp()
	for _, f := range app.Flags {
		for _, s := range flagSpellings(f) {
			if !strings.Contains(sections["GLOBAL OPTIONS"], s) {
				t.Errorf("global flag %s is not in the man page", s)
			}
		}
	}
	n := 0
	cliCommands("", app.Commands, func(path string, cmd *cli.Command) {
		n++
		sec, ok := sections[strings.Join(cmd.Names(), ", ")]
		if !ok {
			t.Errorf("command %q has no section in the man page", path)
			return
		}
		for _, f := range cmd.Flags {
			for _, s := range flagSpellings(f) {
				if !strings.Contains(sec, s) {
					t.Errorf("%s: flag %s is not in its man page section", path, s)
				}
			}
		}
		// The description, where most of the explanation is: its first line.
		first, _, _ := strings.Cut(cmd.Description, "\n")
		if d := strings.Fields(strings.ReplaceAll(first, "`", "")); len(d) > 0 {
			if !strings.Contains(strings.Join(strings.Fields(sec), " "), strings.Join(d[:min(8, len(d))], " ")) {
				t.Errorf("%s: its description is not in the man page", path)
			}
		}
	})
	if n < 10 {
		t.Fatalf("only %d commands found in the app", n)
	}
	if groff, err := exec.LookPath("groff"); err == nil {
		cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-z")
		cmd.Stdin = strings.NewReader(page)
		if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("groff -man -ww: %v\n%s", err, out)
		}
	}
}

// binOnPath is a PATH with the binary under test first, as "nlvpn".
func binOnPath(t *testing.T) string {
	dir := t.TempDir()
	if err := os.Symlink(nlvpnBin, filepath.Join(dir, "nlvpn")); err != nil {
		t.Fatal(err)
	}
	return dir + string(os.PathListSeparator) + os.Getenv("PATH")
}

// runShell runs a shell script with the test binary on PATH, in a temp
// directory (so file-name fallbacks see no files), within 20 s.
func runShell(t *testing.T, shell string, script string) string {
	t.Helper()
	path, err := exec.LookPath(shell)
	if err != nil {
		t.Skipf("%s is not installed", shell)
	}
	home := t.TempDir()
	cmd := exec.Command(path, "-c", script)
	if shell == "zsh" {
		cmd = exec.Command(path, "-f", "-c", script) // no rc files
	}
	cmd.Dir = home
	cmd.Env = []string{"PATH=" + binOnPath(t), "HOME=" + home, "XDG_STATE_HOME=" + filepath.Join(home, "state")}
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(20*time.Second, func() { cmd.Process.Kill() })
	defer timer.Stop()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%s: %v\nstdout:\n%s\nstderr:\n%s", shell, err, so.String(), se.String())
	}
	return so.String()
}

// completions splits the shells' output: one block per case, "@@" between.
func completions(t *testing.T, out string, cases int) [][]string {
	t.Helper()
	blocks := strings.Split(out, "@@\n")
	if len(blocks) != cases+1 {
		t.Fatalf("want %d result blocks, got %d:\n%s", cases, len(blocks)-1, out)
	}
	var res [][]string
	for _, b := range blocks[:cases] {
		res = append(res, strings.Fields(b))
	}
	return res
}

// upFlags are the long flags of `nlvpn up`, as the completion should offer them.
func upFlags(t *testing.T) []string {
	var out []string
	cliCommands("", newApp().Commands, func(path string, cmd *cli.Command) {
		if path == "up" {
			for _, f := range cmd.Flags {
				for _, s := range flagSpellings(f) {
					if strings.HasPrefix(s, "--") {
						out = append(out, s)
					}
				}
			}
		}
	})
	if len(out) < 10 {
		t.Fatalf("up has only %d flags?", len(out))
	}
	return out
}

func topCommands() []string {
	var out []string
	for _, c := range newApp().Commands {
		if !c.Hidden {
			out = append(out, c.Name)
		}
	}
	return out
}

// checkCompletionCases checks what the bash and zsh scripts offered for the
// same command lines (see completionCases).
func checkCompletionCases(t *testing.T, got [][]string) {
	t.Helper()
	for _, c := range topCommands() {
		if !slices.Contains(got[0], c) {
			t.Errorf("'nlvpn <TAB>' does not offer %q: %v", c, got[0])
		}
	}
	if !slices.Equal(got[1], []string{"up"}) {
		t.Errorf("'nlvpn u<TAB>' = %v, want [up]", got[1])
	}
	for _, f := range upFlags(t) {
		if !slices.Contains(got[2], f) {
			t.Errorf("'nlvpn up --<TAB>' does not offer %s: %v", f, got[2])
		}
	}
	for _, f := range got[2] {
		if !strings.HasPrefix(f, "--") {
			t.Errorf("'nlvpn up --<TAB>' offers %q", f)
		}
	}
	if !slices.Equal(got[3], []string{"--agent"}) {
		t.Errorf("'nlvpn up --ag<TAB>' = %v, want [--agent]", got[3])
	}
	if slices.Contains(got[4], "--agent") || !slices.Contains(got[4], "--token-file") {
		t.Errorf("'nlvpn up --agent x --<TAB>' = %v, want the flags but --agent", got[4])
	}
	// After "--", urfave/cli would run the command instead of completing:
	// the scripts must not ask the binary (they fall back to file names).
	if len(got[5]) != 0 {
		t.Errorf("'nlvpn version -- <TAB>' = %v, want nothing from nlvpn", got[5])
	}
}

// The command lines of completionCases: words, the last being the one under
// the cursor.
var completionCases = [][]string{
	{"nlvpn", ""},
	{"nlvpn", "u"},
	{"nlvpn", "up", "--"},
	{"nlvpn", "up", "--ag"},
	{"nlvpn", "up", "--agent", "x", "--"},
	{"nlvpn", "version", "--", ""},
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// TestBashCompletion loads the script the way bash-completion does and
// calls its function with COMP_WORDS and COMP_CWORD set as bash sets them
// on <TAB>.
func TestBashCompletion(t *testing.T) {
	script := "source <(nlvpn completion bash) || exit 1\n" +
		`complete -p nlvpn | grep -q -- '-F _nlvpn_complete' || { echo 'not registered' >&2; exit 1; }` + "\n"
	for _, words := range completionCases {
		var q []string
		for _, w := range words {
			q = append(q, shellQuote(w))
		}
		script += "COMP_WORDS=(" + strings.Join(q, " ") + "); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMPREPLY=(); COMP_LINE=\"${COMP_WORDS[*]}\"\n" +
			"_nlvpn_complete; printf '%s\\n' \"${COMPREPLY[@]}\"; echo @@\n"
	}
	checkCompletionCases(t, completions(t, runShell(t, "bash", script), len(completionCases)))
}

// TestZshCompletion runs the zsh script's function with words, CURRENT and
// PREFIX set as zsh's completion system sets them on <TAB>; _describe and
// _files (which only work inside a completion widget) print what they are
// given.
func TestZshCompletion(t *testing.T) {
	script := `compdef() { [[ $1 == _nlvpn && $2 == nlvpn ]] || { echo "compdef $*" >&2; exit 1; }; registered=1; }
_describe() { local e; for e in "${(@P)2}"; do print -r -- "${e%%:*}"; done; }
_files() { :; }
eval "$(nlvpn completion zsh)" || exit 1
(( registered )) || { echo 'not registered' >&2; exit 1; }
`
	for _, words := range completionCases {
		var q []string
		for _, w := range words {
			q = append(q, shellQuote(w))
		}
		script += "words=(" + strings.Join(q, " ") + "); CURRENT=${#words}; PREFIX=${words[CURRENT]}\n_nlvpn; echo @@\n"
	}
	got := completions(t, runShell(t, "zsh", script), len(completionCases))
	// _describe filters by PREFIX itself; the stub does not.
	for i, words := range completionCases {
		cur := words[len(words)-1]
		got[i] = slices.DeleteFunc(got[i], func(s string) bool { return !strings.HasPrefix(s, cur) })
	}
	checkCompletionCases(t, got)
}

// TestFishCompletion checks that the fish script parses and that fish, asked
// what it would complete (complete -C), offers up's flags.
func TestFishCompletion(t *testing.T) {
	r := nlvpn(t, nil, "completion", "fish")
	if r.code != 0 {
		t.Fatalf("nlvpn completion fish: exit %d\n%s", r.code, r.stderr)
	}
	file := filepath.Join(t.TempDir(), "nlvpn.fish")
	if err := os.WriteFile(file, []byte(r.stdout), 0o644); err != nil {
		t.Fatal(err)
	}
	out := runShell(t, "fish", "fish -n "+shellQuote(file)+" || exit 1; source "+shellQuote(file)+
		"; complete -C 'nlvpn up --ag'; echo @@; complete -C 'nlvpn gat'; echo @@")
	got := strings.Split(out, "@@\n")
	if !strings.HasPrefix(got[0], "--agent\t") {
		t.Errorf("fish: 'nlvpn up --ag<TAB>' = %q, want --agent", got[0])
	}
	if !strings.HasPrefix(got[1], "gateway\t") {
		t.Errorf("fish: 'nlvpn gat<TAB>' = %q, want gateway", got[1])
	}
}

func TestCompletionErrors(t *testing.T) {
	for _, args := range [][]string{{"completion"}, {"completion", "tcsh"}, {"completion", "bash", "zsh"}, {"man", "extra"}} {
		r := nlvpn(t, nil, args...)
		if r.code == 0 || !strings.Contains(r.stderr, "nlvpn: ") {
			t.Errorf("nlvpn %v: exit %d, stderr %q; want an error", args, r.code, r.stderr)
		}
	}
}
