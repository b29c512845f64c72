//go:build linux

package main

import (
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

func (r *runner) demo() error {
	l := r.lab
	say("Building a small simulated internet out of Linux network namespaces (prefix %s).", l.Prefix)
	if err := r.build(); err != nil {
		return err
	}
	fmt.Printf(`    %-14s the "internet": a router joining every public address (198.18.0.0/15)
    %-14s the public gateway host, %s
    %-14s the client's home router (%v NAT), public address %s
    %-14s the client machine, %s, behind that router
    %-14s the agent's office router (%v NAT), public address %s
    %-14s the agent machine, %s, with a second leg %s on the office LAN
    %-14s a machine on the office LAN, %s: no default route, reachable only via the agent
`,
		l.NS.Inet, l.NS.GW, l.Gateway, l.NS.ClientNAT, l.Opts.ClientNAT, l.ClientPublic, l.NS.Client, l.ClientAddr,
		l.NS.AgentNAT, l.Opts.AgentNAT, l.AgentPublic, l.NS.Agent, l.AgentAddr, l.AgentLANAddr, l.NS.LAN, l.LANHost)

	say("Starting a small web server on the LAN host %s, port 80.", l.LANHost)
	ln, err := lab.Listen(l.NS.LAN, "tcp4", net.JoinHostPort(l.LANHost.String(), "80"))
	if err != nil {
		return err
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		host, _, _ := net.SplitHostPort(req.RemoteAddr)
		fmt.Fprintf(w, "Hello from %s, a machine on the office LAN behind agent %q.\n", l.LANHost, agentName)
		fmt.Fprintf(w, "Your request reached me through the nlvpn tunnel; it arrived from %s (the agent re-sends your traffic from its own LAN address).\n", host)
	})}
	go srv.Serve(ln)
	defer srv.Close()

	url := fmt.Sprintf("http://%s/", l.LANHost)
	curl := func(maxTime int) (string, error) {
		stdout, _, err := lab.Run(r.ctx, l.NS.Client, "curl", "-sS", "--noproxy", "*", "--max-time", fmt.Sprint(maxTime), url)
		return string(stdout), err
	}
	say("First, without the VPN: the client tries `curl %s` and cannot get there (no route).", url)
	if _, err := curl(3); err != nil {
		fmt.Printf("    curl failed, as expected: %s\n", firstLine(err.Error()))
	} else {
		return fmt.Errorf("the LAN host is reachable without the VPN: the lab is broken")
	}

	check := func() error {
		out, err := lab.Output(r.ctx, l.NS.Client, "ip", "route", "show", "table", "all", l.LANSubnet.String())
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("no route to %s yet", l.LANSubnet)
		}
		_, err = curl(3)
		return err
	}
	if err := r.startStack(true, check); err != nil {
		return err
	}
	out, _ := lab.Output(r.ctx, l.NS.Client, "ip", "-br", "addr", "show", tunName)
	routes, _ := lab.Output(r.ctx, l.NS.Client, "ip", "route", "show", "table", "5228")
	rules, _ := lab.Output(r.ctx, l.NS.Client, "ip", "rule", "show")
	fmt.Printf("    the tunnel is up. In the client namespace, the TUN device, the tunnel's routing table 5228,\n"+
		"    and the rules that send the node's own (marked) UDP packets past it:\n%s\n%s\n%s\n", indent(out), indent(routes), indent(rules))

	say("Now the same `curl %s`, run in the client namespace, through the tunnel:", url)
	body, err := curl(10)
	if err != nil {
		return fmt.Errorf("curl through the tunnel: %w", err)
	}
	fmt.Println(indent(body))
	say("It works. Which way did the packets go? `nlvpn status` asks the running client:")
	status, err := lab.Output(r.ctx, l.NS.Client, r.nlvpn, "status", "--state-dir", filepath.Join(r.dir, "client"))
	if err != nil {
		return fmt.Errorf("nlvpn status: %w", err)
	}
	fmt.Println(indent(status))
	if strings.Contains(status, "direct") {
		say("The tunnel came up on the gateway's relay at once, and both sides punched through their NATs in parallel:\n" +
			"    now the packets go client -> client NAT -> agent NAT -> agent -> LAN host directly, end-to-end encrypted;\n" +
			"    the gateway only introduced them (it relays, as ciphertext, only when no direct path can be made).")
	} else {
		say("The packets go client -> client NAT -> gateway (relay, ciphertext only) -> agent NAT -> agent -> LAN host;\n" +
			"    a direct path could not be made (yet) through these NATs.")
	}
	r.stopClient()
	return nil
}

// stopClient sends SIGTERM to the client and reports whether it cleaned up.
func (r *runner) stopClient() {
	if r.client == nil {
		return
	}
	say("Stopping the client with SIGTERM (like Ctrl-C); it removes its TUN device and routes.")
	code := r.client.Stop()
	_, err := lab.Output(r.ctx, r.lab.NS.Client, "ip", "link", "show", tunName)
	left := "gone"
	if err == nil {
		left = "STILL PRESENT"
	}
	fmt.Printf("    client exited with code %d; %s is %s\n", code, tunName, left)
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}
