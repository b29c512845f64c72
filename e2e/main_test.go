//go:build linux

// Package e2e runs the nlvpn binary on a simulated internet built from
// network namespaces (package lab). It needs root; without it the whole
// package is skipped with a message.
//
// Run: go test -count=1 -timeout 15m -v ./e2e/
// Set NLVPN_BIN=/path/to/nlvpn to test a prebuilt binary instead of
// building ./cmd/nlvpn.
package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nlvpn/nlvpn/lab"
)

// nlvpnBin is the binary under test.
var nlvpnBin string

// relayOnly holds the flag that keeps `nlvpn up` on the gateway relay, when
// the binary has one (the direct path came later). The relayed-tunnel tests
// use it so that they keep testing the relay once punching exists.
var relayOnly []string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: SKIP: needs root (network namespaces, TUN, nftables); run as root, e.g. `sudo make test` or in CI")
		return 0
	}
	if err := lab.Check(); err != nil {
		fmt.Printf("e2e: SKIP: cannot build the namespace lab here: %v\n", err)
		return 0
	}
	for _, tool := range []string{"curl", "ping", "tcpdump", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Printf("e2e: FAIL: %s not found in PATH (apt-get install curl iputils-ping tcpdump iproute2)\n", tool)
			return 1
		}
	}
	if b := os.Getenv("NLVPN_BIN"); b != "" {
		abs, err := filepath.Abs(b)
		if err != nil {
			fmt.Println("e2e:", err)
			return 1
		}
		nlvpnBin = abs
	} else {
		dir, err := os.MkdirTemp("", "nlvpn-e2e-bin")
		if err != nil {
			fmt.Println("e2e:", err)
			return 1
		}
		defer os.RemoveAll(dir)
		nlvpnBin = filepath.Join(dir, "nlvpn")
		cmd := exec.Command("go", "build", "-o", nlvpnBin, "github.com/nlvpn/nlvpn/cmd/nlvpn")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Printf("e2e: FAIL: go build ./cmd/nlvpn: %v\n%s", err, out)
			return 1
		}
	}
	if out, _ := exec.Command(nlvpnBin, "up", "--help").CombinedOutput(); strings.Contains(string(out), "--relay") {
		relayOnly = []string{"--relay"}
	}
	return m.Run()
}
