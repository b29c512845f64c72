package platform

import (
	"crypto/rand"
	"encoding/hex"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/nlvpn/nlvpn/lab"
)

// TestForwarding, in a namespace of its own with a TUN device: the table
// holds the forward filter, the per-peer bound and the masquerade; a
// peer's route goes into the device and out again; IP forwarding is on
// while it runs; Close leaves the namespace as it found it.
func TestForwarding(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, TUN and nftables")
	}
	r := make([]byte, 3)
	rand.Read(r)
	ns, dev := "nvfw"+hex.EncodeToString(r), "nvfw"+hex.EncodeToString(r)+"t"
	out := func(args ...string) string {
		t.Helper()
		b, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", args, err, b)
		}
		return string(b)
	}
	if b, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, b)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	out("ip", "tuntap", "add", "dev", dev, "mode", "tun")
	if got := strings.TrimSpace(out("cat", "/proc/sys/net/ipv4/ip_forward")); got != "0" {
		t.Fatalf("a new namespace forwards (ip_forward %s)", got)
	}

	peer := netip.MustParseAddr("100.64.7.9")
	err := lab.Do(ns, func() error {
		f, err := NewForwarding(ForwardingConfig{Device: dev, PerPeer: 5, Total: 9})
		if err != nil {
			return err
		}
		defer f.Close()
		if err := f.Route(peer); err != nil {
			return err
		}
		table := out("nft", "list", "table", "inet", forwardTableName(dev))
		for _, want := range []string{
			`oifname "` + dev + `" ct state established,related accept`,
			`oifname "` + dev + `" counter packets 0 bytes 0 drop`,
			`iifname "` + dev + `" ct state invalid,untracked counter packets 0 bytes 0 drop`,
			`iifname "` + dev + `" ct state new add @peers4 { ip saddr ct count over 5 }`,
			`iifname "` + dev + `" ct state new ct count over 9 counter packets 0 bytes 0 drop`,
			`iifname "` + dev + `" oifname != "` + dev + `" masquerade`,
			"hook input", "hook output",
		} {
			if !strings.Contains(table, want) {
				t.Errorf("table lacks %q:\n%s", want, table)
			}
		}
		if got := out("ip", "route", "show", peer.String()); !strings.Contains(got, "dev "+dev) {
			t.Errorf("route of %s: %q, want one into %s", peer, got, dev)
		}
		if got := strings.TrimSpace(out("cat", "/proc/sys/net/ipv4/ip_forward")); got != "1" {
			t.Errorf("ip_forward %s while forwarding, want 1", got)
		}
		if d, err := f.Drops(); err != nil || d != (ForwardingDrops{}) {
			t.Errorf("drops %+v, %v; want zero, nil", d, err)
		}
		// A second hold (a peer's new session before its old one ended):
		// the route stays until both are given up.
		if err := f.Route(peer); err != nil {
			return err
		}
		if err := f.Unroute(peer); err != nil {
			return err
		}
		if got := out("ip", "route", "show", peer.String()); !strings.Contains(got, "dev "+dev) {
			t.Errorf("route of %s gone while a hold remains: %q", peer, got)
		}
		if err := f.Unroute(peer); err != nil {
			return err
		}
		if got := strings.TrimSpace(out("ip", "route", "show", peer.String())); got != "" {
			t.Errorf("route of %s after the last Unroute: %q", peer, got)
		}
		f.Route(peer)
		return f.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", forwardTableName(dev)).CombinedOutput(); err == nil {
		t.Errorf("the table outlived Close:\n%s", b)
	}
	if got := strings.TrimSpace(out("ip", "route", "show", peer.String())); got != "" {
		t.Errorf("route of %s after Close: %q", peer, got)
	}
	if got := strings.TrimSpace(out("cat", "/proc/sys/net/ipv4/ip_forward")); got != "0" {
		t.Errorf("ip_forward %s after Close, want 0 as before", got)
	}
}
