//go:build linux

// Command nlvpn-lab is a developer tool (not shipped to users): it builds
// the namespace topology of package lab and runs nlvpn on it.
//
//	nlvpn-lab demo  --nlvpn bin/nlvpn   # show curl reaching a LAN host through the tunnel
//	nlvpn-lab bench --nlvpn bin/nlvpn   # iperf3 and ping: nlvpn vs wireguard-go vs the raw path
//	nlvpn-lab dns --listen 127.0.0.1:5353  # an office.lan DNS server for the agent's --dns-server
//
// Everything it builds is torn down on exit, also on Ctrl-C.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

func usage() {
	fmt.Fprintf(os.Stderr, `nlvpn-lab: run nlvpn on a simulated internet made of network namespaces.

Usage:
  nlvpn-lab demo  [--nlvpn PATH] [--client-nat cone|symmetric|none] [--agent-nat ...]
  nlvpn-lab bench [--nlvpn PATH] [--wireguard-go PATH] [--time SECONDS] [--trials N]
                  [--paths raw,wg,relay,direct,tcp,socks] [--rows WORD,...] [--tcp-cc NAME]
                  [--repeat N] [--profile DIR]
  nlvpn-lab dns   [--listen ADDR] [--host IPv4] [--netns NS]  # serve the office.lan test zone

Needs root (or CAP_NET_ADMIN+CAP_SYS_ADMIN), iproute2 and nftables; bench
also needs iperf3, ping, curl and, for its wireguard-go baseline, wg
(wireguard-tools) and a wireguard-go binary (make bench builds one);
demo needs curl.
`)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	bin := fs.String("nlvpn", "bin/nlvpn", "path to the nlvpn binary")
	cnat := fs.String("client-nat", "cone", "NAT in front of the client: cone, symmetric or none")
	anat := fs.String("agent-nat", "cone", "NAT in front of the agent: cone, symmetric or none")
	secs := fs.Int("time", 5, "bench: seconds per iperf3 run")
	repeat := fs.Int("repeat", 1, "bench: measure each row of the main table this many times on each path and show the median (every value is printed too); each CPU figure is the median too; drop counters are from the last time, a loss row's TCP counters add up all of them")
	trials := fs.Int("trials", 10, "bench: startup trials (time to first packet and to the direct path); 0 skips them")
	verbose := fs.Bool("v", false, "print every command that builds the lab")
	profile := fs.String("profile", "", "bench: write CPU profiles (NAME.pprof) of client, agent and gateway, taken during one run (--profile-run), the allocations over the same seconds (NAME.allocs.pprof), and from its middle the live heap (NAME.heap.pprof) and a one-second execution trace (NAME.trace, go tool trace), into this directory (created if missing)")
	profileRun := fs.String("profile-run", "direct-up", "bench: the run --profile watches: PATH-up or PATH-down, PATH direct, routed or relay; add -4 for the four-stream row (direct-down-4) or -loss for the 2% loss row (direct-down-loss)")
	only := fs.String("paths", "", "bench: comma-separated paths to measure: raw (always), wg, relay, direct, routed (direct, the agent with --routed), tcp (the TCP fallback, UDP dropped at the client NAT), socks (default: all)")
	rows := fs.String("rows", "", "bench: comma-separated words; measure only the rows whose name contains one (e.g. loss, ping, streams); default: all")
	tcpCC := fs.String("tcp-cc", "", "bench: set the kernel TCP congestion control (e.g. cubic, bbr, reno) in the namespaces before measuring; default: the host's, which new namespaces inherit")
	wgGo := fs.String("wireguard-go", "bin/wireguard-go", "bench: the wireguard-go binary for the baseline column (build: go build -o bin/wireguard-go golang.zx2c4.com/wireguard)")
	switch cmd {
	case "demo", "bench":
	case "dns":
		if err := dnsCmd(args); err != nil {
			fatal(err)
		}
		return
	case "-h", "--help", "help":
		usage()
		return
	default:
		fmt.Fprintf(os.Stderr, "nlvpn-lab: unknown command %q\n", cmd)
		usage()
		os.Exit(2)
	}
	fs.Parse(args)

	cn, err := lab.ParseNAT(*cnat)
	if err != nil {
		fatal(err)
	}
	an, err := lab.ParseNAT(*anat)
	if err != nil {
		fatal(err)
	}
	if err := preflight(cmd); err != nil {
		fmt.Fprintf(os.Stderr, "nlvpn-lab %s: cannot run here: %v. It needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 and nftables.\n", cmd, err)
		os.Exit(1)
	}
	nlvpn, err := filepath.Abs(*bin)
	if err == nil {
		_, err = os.Stat(nlvpn)
	}
	if err != nil {
		fatal(fmt.Errorf("nlvpn binary: %v (build it with `make build`)", err))
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigc := make(chan os.Signal, 2)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM)
	opts := lab.Options{ClientNAT: cn, AgentNAT: an}
	if *verbose {
		opts.Logf = func(f string, a ...any) { fmt.Printf("    $ "+f+"\n", a...) }
	}
	l := lab.Prepare(opts)
	dir, err := os.MkdirTemp("", "nlvpn-lab-")
	if err != nil {
		fatal(err)
	}
	teardown := func() {
		if err := l.Close(); err != nil {
			fmt.Fprintf(os.Stderr, "teardown: %v\n", err)
		}
		os.RemoveAll(dir)
	}
	// A signal cancels the run, which then unwinds and tears down. If that
	// takes more than 15 s, or a second signal comes, tear down from here.
	go func() {
		<-sigc
		fmt.Fprintln(os.Stderr, "\nnlvpn-lab: interrupted; stopping and tearing down (Ctrl-C again to hurry)")
		cancel()
		select {
		case <-sigc:
		case <-time.After(15 * time.Second):
		}
		teardown()
		os.Exit(130)
	}()

	wgPath, err := filepath.Abs(*wgGo)
	if err != nil {
		fatal(err)
	}
	pRun, pLoss := strings.CutSuffix(*profileRun, "-loss")
	pRun, p4 := strings.CutSuffix(pRun, "-4")
	pPath, pDir, ok := strings.Cut(pRun, "-")
	if !ok || (pPath != "direct" && pPath != "relay" && pPath != "routed") || (pDir != "up" && pDir != "down") || (p4 && pLoss) {
		fatal(fmt.Errorf("--profile-run %q: want direct-up, direct-down, relay-up or relay-down, each optionally with -4 or -loss", *profileRun))
	}
	pStreams := 1
	if p4 {
		pStreams = 4
	}
	if *repeat < 1 || *repeat > 20 {
		fatal(fmt.Errorf("--repeat %d: want 1 to 20", *repeat))
	}
	if *profile != "" {
		if err := os.MkdirAll(*profile, 0o755); err != nil {
			fatal(fmt.Errorf("--profile: %w", err))
		}
	}
	r := &runner{ctx: ctx, lab: l, nlvpn: nlvpn, dir: dir, profileDir: *profile, profilePath: pPath, profileDown: pDir == "down", profileLoss: pLoss, profileStreams: pStreams, wgGo: wgPath}
	if *only != "" {
		r.only = strings.Split(*only, ",")
	}
	r.tcpCC = *tcpCC
	if *rows != "" {
		r.rows = strings.Split(*rows, ",")
	}
	switch cmd {
	case "demo":
		err = r.demo()
	case "bench":
		err = r.bench(*secs, *trials, *repeat)
	}
	interrupted := ctx.Err() != nil
	if err != nil {
		if interrupted {
			fmt.Fprintln(os.Stderr, "\nnlvpn-lab: interrupted")
		} else {
			fmt.Fprintf(os.Stderr, "\nnlvpn-lab %s FAILED: %v\n", cmd, err)
			r.dumpLogs()
		}
	}
	fmt.Printf("\nTearing down: stopping every process we started and deleting the namespaces %s-*.\n", l.Prefix)
	teardown()
	if left, _ := lab.ListNamespaces(l.Prefix); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "warning: namespaces left: %v\n", left)
	} else {
		fmt.Println("Done; nothing is left behind.")
	}
	if err != nil {
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "nlvpn-lab: %v\n", err)
	os.Exit(1)
}

func preflight(cmd string) error {
	if os.Geteuid() != 0 {
		return errors.New("not running as root")
	}
	if err := lab.Check(); err != nil {
		return err
	}
	tools := []string{"curl"}
	if cmd == "bench" {
		tools = []string{"iperf3", "ping", "curl"}
	}
	for _, t := range tools {
		if _, err := execLookPath(t); err != nil {
			return fmt.Errorf("%s not found in PATH", t)
		}
	}
	return nil
}

// say prints one step for a human.
func say(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ")
}
