package platform

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeResolvectl puts a resolvectl in dir that records each call's
// arguments in dir/calls and fails the verb named in dir/fail.
func fakeResolvectl(t *testing.T) (dir string) {
	t.Helper()
	dir = t.TempDir()
	script := "#!/bin/sh\necho \"$*\" >> " + filepath.Join(dir, "calls") + "\n" +
		"[ -f " + filepath.Join(dir, "fail") + " ] && [ \"$1\" = \"$(cat " + filepath.Join(dir, "fail") + ")\" ] && { echo 'Failed to set DNS configuration' >&2; exit 1; }\nexit 0\n"
	if err := os.WriteFile(filepath.Join(dir, "resolvectl"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	old := [3]string{resolvectl, resolvedRunDir, initNetNS}
	resolvectl, resolvedRunDir, initNetNS = filepath.Join(dir, "resolvectl"), dir, "/proc/self/ns/net"
	t.Cleanup(func() { resolvectl, resolvedRunDir, initNetNS = old[0], old[1], old[2] })
	return dir
}

func calls(t *testing.T, dir string) []string {
	b, _ := os.ReadFile(filepath.Join(dir, "calls"))
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func TestConfigureDNS(t *testing.T) {
	dir := fakeResolvectl(t)
	cfg := SplitDNS{Interface: "nlvpn0", Server: netip.MustParseAddr("100.64.0.2"), Domains: []string{"office.lan", "corp.example"}}
	undo, err := ConfigureDNS(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"revert nlvpn0", "dns nlvpn0 100.64.0.2", "domain nlvpn0 ~office.lan ~corp.example", "default-route nlvpn0 false"}
	if got := calls(t, dir); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("resolvectl calls %q, want %q", got, want)
	}
	if err := undo(); err != nil {
		t.Fatal(err)
	}
	if got := calls(t, dir); got[len(got)-1] != "revert nlvpn0" {
		t.Fatalf("undo ran %q, want a revert of the link", got[len(got)-1])
	}
}

// A step that fails leaves the link as it was and says what failed.
func TestConfigureDNSFailureReverts(t *testing.T) {
	dir := fakeResolvectl(t)
	os.WriteFile(filepath.Join(dir, "fail"), []byte("domain"), 0o644)
	_, err := ConfigureDNS(SplitDNS{Interface: "nlvpn0", Server: netip.MustParseAddr("100.64.0.2"), Domains: []string{"office.lan"}})
	if err == nil || !strings.Contains(err.Error(), "resolvectl domain nlvpn0") || !strings.Contains(err.Error(), "Failed to set DNS configuration") {
		t.Fatalf("err = %v, want resolvectl's complaint about the domain step", err)
	}
	if got := calls(t, dir); got[len(got)-1] != "revert nlvpn0" {
		t.Fatalf("after the failure ran %q, want a revert", got)
	}
}

// Without resolved, nothing is run and the error says why.
func TestConfigureDNSWithoutResolved(t *testing.T) {
	dir := fakeResolvectl(t)
	resolvedRunDir = filepath.Join(dir, "absent")
	_, err := ConfigureDNS(SplitDNS{Interface: "nlvpn0", Server: netip.MustParseAddr("100.64.0.2"), Domains: []string{"office.lan"}})
	if !errors.Is(err, ErrNoSplitDNS) || !strings.Contains(err.Error(), "systemd-resolved is not running") {
		t.Fatalf("err = %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "calls")); err == nil {
		t.Fatalf("resolvectl ran without resolved: %q", calls(t, dir))
	}
	// No domains: nothing to do, no error.
	if _, err := ConfigureDNS(SplitDNS{Interface: "nlvpn0"}); err != nil {
		t.Fatal(err)
	}
}
