package client

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/nlvpn/nlvpn/identity"
)

func pubKey(t *testing.T) identity.PublicKey {
	t.Helper()
	k, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	return k.Public()
}

func TestKnownAgentPinsOnFirstUse(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "known_agents") // directory made as needed
	k1, k2 := pubKey(t), pubKey(t)

	if err := checkKnownAgent(path, "pinA", "miranda", k1); err != nil {
		t.Fatalf("first use: %v", err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("pinA miranda %s\n", k1); string(b) != want {
		t.Fatalf("file = %q, want %q", b, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if m := fi.Mode().Perm(); m != 0o600 {
		t.Fatalf("known_agents mode %o, want 600", m)
	}

	// Same key again: fine, and nothing appended.
	if err := checkKnownAgent(path, "pinA", "miranda", k1); err != nil {
		t.Fatalf("same key: %v", err)
	}
	if b2, _ := os.ReadFile(path); string(b2) != string(b) {
		t.Fatalf("file changed on a repeat: %q", b2)
	}

	// Other agents and other gateways pin independently.
	if err := checkKnownAgent(path, "pinA", "caliban", k2); err != nil {
		t.Fatalf("another agent: %v", err)
	}
	if err := checkKnownAgent(path, "pinB", "miranda", k2); err != nil {
		t.Fatalf("same agent name on another gateway: %v", err)
	}

	// A changed key is a hard error naming the file and the line.
	err = checkKnownAgent(path, "pinA", "miranda", k2)
	if err == nil {
		t.Fatal("a changed agent key was accepted")
	}
	if msg := err.Error(); !strings.Contains(msg, path+":1") || !strings.Contains(msg, "miranda") || !strings.Contains(msg, k1.String()) {
		t.Fatalf("error %q should name %s:1, the agent and the pinned key", msg, path)
	}
	err = checkKnownAgent(path, "pinB", "miranda", k1)
	if err == nil || !strings.Contains(err.Error(), path+":3") {
		t.Fatalf("changed key on gateway B: err %v, want one naming line 3", err)
	}
	// A refused key is not written down.
	b3, _ := os.ReadFile(path)
	if n := strings.Count(string(b3), "\n"); n != 3 {
		t.Fatalf("%d lines after the refusals, want 3:\n%s", n, b3)
	}
}

func TestKnownAgentIgnoresJunkLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "known_agents")
	k := pubKey(t)
	junk := "# comment\n\npinA miranda\ntoo many fields here ok\n"
	if err := os.WriteFile(path, []byte(junk), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := checkKnownAgent(path, "pinA", "miranda", k); err != nil {
		t.Fatalf("junk lines made it fail: %v", err)
	}
	if err := checkKnownAgent(path, "pinA", "miranda", pubKey(t)); err == nil || !strings.Contains(err.Error(), path+":5") {
		t.Fatalf("changed key: err %v, want one naming line 5", err)
	}
}

func TestKnownAgentDisabled(t *testing.T) {
	if err := checkKnownAgent("", "pin", "miranda", pubKey(t)); err != nil {
		t.Fatal(err)
	}
}

func TestKnownAgentConcurrentFirstUse(t *testing.T) {
	// Two sessions to the same agent at once must not both pin different keys.
	path := filepath.Join(t.TempDir(), "known_agents")
	keys := []identity.PublicKey{pubKey(t), pubKey(t)}
	var wg sync.WaitGroup
	errs := make([]error, len(keys))
	for i, k := range keys {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = checkKnownAgent(path, "pin", "miranda", k) }()
	}
	wg.Wait()
	if (errs[0] == nil) == (errs[1] == nil) {
		t.Fatalf("want exactly one of two different first keys accepted; errors %v", errs)
	}
	b, _ := os.ReadFile(path)
	if strings.Count(string(b), "\n") != 1 {
		t.Fatalf("file has %q, want one line", b)
	}
}
