//go:build linux

package main

// The bench's baseline: wireguard-go (userspace, the interface is its own
// TUN) as a subnet router on the same namespaces nlvpn uses. The client
// routes the LAN into its wireguard-go interface; the agent forwards and
// masquerades toward the LAN, as a WireGuard subnet router would. Both
// ends are behind the lab's cone NATs, so the path is made the way a
// hole-punched one is: each side listens on a fixed port, sends to the
// other's public NAT address, and the first packets out open each NAT for
// the other side's packets in (cone NAT keeps the port).

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

const (
	wgClientPort = 51820
	wgAgentPort  = 51821
	// wgSock is where wireguard-go puts its control socket (for `wg`);
	// the filesystem is shared between namespaces, hence per-run names.
	wgSockDir = "/var/run/wireguard"
)

// Overlay addresses of the two wireguard-go ends (inside 100.64.0.0/10).
var (
	wgClientIP = netip.MustParseAddr("100.127.77.1")
	wgAgentIP  = netip.MustParseAddr("100.127.77.2")
)

// wgRouter is one running wireguard-go subnet router; close undoes it.
type wgRouter struct {
	r              *runner
	cliIf, agtIf   string
	client, agent  *lab.Process
	nft, forwarded bool // the agent's masquerade table and ip_forward are set
}

// startWG builds the wireguard-go subnet router and checks that the LAN
// host answers through it. On error, what was built is undone.
func (r *runner) startWG() (w *wgRouter, err error) {
	l := r.lab
	if _, err := os.Stat(r.wgGo); err != nil {
		return nil, fmt.Errorf("wireguard-go binary: %v (make bench builds it into bin/)", err)
	}
	if _, err := execLookPath("wg"); err != nil {
		return nil, errors.New("wg not found in PATH (install wireguard-tools: make deps)")
	}
	w = &wgRouter{r: r, cliIf: l.Prefix + "-wgc", agtIf: l.Prefix + "-wga"}
	defer func() {
		if err != nil {
			w.close()
			w = nil
		}
	}()

	dir := filepath.Join(r.dir, "wg")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return w, err
	}
	cliPub, err := wgKey(r.ctx, filepath.Join(dir, "client.key"))
	if err != nil {
		return w, err
	}
	agtPub, err := wgKey(r.ctx, filepath.Join(dir, "agent.key"))
	if err != nil {
		return w, err
	}

	start := func(ns, ifname string) (*lab.Process, error) {
		p, err := r.lab.Start(ns, lab.ProcConfig{
			Name: "wireguard-go-" + ifname,
			Args: []string{r.wgGo, "-f", ifname},
			// Foreground also silences its "use the kernel module" banner.
			Env:     []string{"WG_PROCESS_FOREGROUND=1", "LOG_LEVEL=error"},
			LogPath: filepath.Join(r.dir, "wireguard-go-"+ifname+".log"),
		})
		if err != nil {
			return nil, err
		}
		r.procs = append(r.procs, p)
		sock := filepath.Join(wgSockDir, ifname+".sock")
		err = r.poll(10*time.Second, p, func() error { _, err := os.Stat(sock); return err })
		return p, err
	}
	if w.agent, err = start(l.NS.Agent, w.agtIf); err != nil {
		return w, fmt.Errorf("wireguard-go in %s: %w", l.NS.Agent, err)
	}
	if w.client, err = start(l.NS.Client, w.cliIf); err != nil {
		return w, fmt.Errorf("wireguard-go in %s: %w", l.NS.Client, err)
	}

	run := func(ns string, args ...string) error {
		_, _, err := lab.Run(r.ctx, ns, args...)
		return err
	}
	// The agent first: its first packet toward the client's public address
	// is dropped by the client's NAT but opens the agent's NAT for the
	// client's reply; the client's first packet then passes (the order
	// only saves a handshake retry; keepalives would get there anyway).
	steps := []struct {
		ns   string
		args []string
	}{
		{l.NS.Agent, []string{"wg", "set", w.agtIf, "listen-port", strconv.Itoa(wgAgentPort), "private-key", filepath.Join(dir, "agent.key"),
			"peer", cliPub, "endpoint", netip.AddrPortFrom(l.ClientPublic, wgClientPort).String(),
			"allowed-ips", wgClientIP.String() + "/32", "persistent-keepalive", "5"}},
		{l.NS.Agent, []string{"ip", "addr", "add", wgAgentIP.String() + "/24", "dev", w.agtIf}},
		{l.NS.Agent, []string{"ip", "link", "set", w.agtIf, "up"}},
		{l.NS.Client, []string{"wg", "set", w.cliIf, "listen-port", strconv.Itoa(wgClientPort), "private-key", filepath.Join(dir, "client.key"),
			"peer", agtPub, "endpoint", netip.AddrPortFrom(l.AgentPublic, wgAgentPort).String(),
			"allowed-ips", wgAgentIP.String() + "/32," + l.LANSubnet.String(), "persistent-keepalive", "5"}},
		{l.NS.Client, []string{"ip", "addr", "add", wgClientIP.String() + "/24", "dev", w.cliIf}},
		{l.NS.Client, []string{"ip", "link", "set", w.cliIf, "up"}},
		{l.NS.Client, []string{"ip", "route", "add", l.LANSubnet.String(), "dev", w.cliIf}},
	}
	for _, s := range steps {
		if err := run(s.ns, s.args...); err != nil {
			return w, err
		}
	}
	// Subnet routing at the agent: forward, and masquerade toward the LAN
	// so that the LAN host (no route to the overlay) can answer.
	w.forwarded = true
	if err := setSysctl(l.NS.Agent, "net/ipv4/ip_forward", "1"); err != nil {
		return w, err
	}
	w.nft = true
	if err := nftLoad(r.ctx, l.NS.Agent, fmt.Sprintf(`table ip nvwg {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "lan0" ip saddr %s masquerade
	}
}
`, netip.PrefixFrom(wgClientIP, 24).Masked())); err != nil {
		return w, err
	}
	return w, w.verify()
}

// verify checks that the LAN is reached through wireguard-go and nothing
// else: the client routes the LAN into the wireguard-go interface, which is
// a TUN (userspace, not the kernel module); the LAN host has no default
// route; a ping gets answered, and the interface's counters and the peer
// endpoints show the encrypted traffic went straight between the public
// NAT addresses.
func (w *wgRouter) verify() error {
	r, l := w.r, w.r.lab
	out, err := lab.Output(r.ctx, l.NS.Client, "ip", "route", "get", l.LANHost.String())
	if err != nil {
		return err
	}
	if !strings.Contains(out, "dev "+w.cliIf) {
		return fmt.Errorf("client routes %s elsewhere: %s", l.LANHost, strings.TrimSpace(out))
	}
	for _, s := range []struct{ ns, ifname string }{{l.NS.Client, w.cliIf}, {l.NS.Agent, w.agtIf}} {
		out, err := lab.Output(r.ctx, s.ns, "ip", "-d", "link", "show", s.ifname)
		if err != nil {
			return err
		}
		if !strings.Contains(out, " tun ") || strings.Contains(out, "wireguard") {
			return fmt.Errorf("%s is not a wireguard-go TUN: %s", s.ifname, strings.TrimSpace(out))
		}
	}
	if out, err := lab.Output(r.ctx, l.NS.LAN, "ip", "route", "show", "default"); err != nil || strings.TrimSpace(out) != "" {
		return fmt.Errorf("the LAN host has a default route (%q, %v): the baseline would not prove the tunnel", out, err)
	}
	// The handshake may need a retry (5 s) if a NAT dropped the first one.
	if err := r.poll(20*time.Second, w.client, func() error {
		_, err := lab.Output(r.ctx, l.NS.Client, "ping", "-c", "1", "-W", "1", "-I", w.cliIf, l.LANHost.String())
		return err
	}); err != nil {
		return fmt.Errorf("ping %s through %s: %w", l.LANHost, w.cliIf, err)
	}
	for _, s := range []struct {
		ns, ifname string
		peer       netip.AddrPort
	}{
		{l.NS.Client, w.cliIf, netip.AddrPortFrom(l.AgentPublic, wgAgentPort)},
		{l.NS.Agent, w.agtIf, netip.AddrPortFrom(l.ClientPublic, wgClientPort)},
	} {
		out, err := lab.Output(r.ctx, s.ns, "wg", "show", s.ifname, "endpoints")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "\t"+s.peer.String()) {
			return fmt.Errorf("%s: peer endpoint is not %s: %q", s.ifname, s.peer, out)
		}
		out, err = lab.Output(r.ctx, s.ns, "wg", "show", s.ifname, "transfer")
		if err != nil {
			return err
		}
		f := strings.Fields(out)
		if len(f) != 3 || f[1] == "0" || f[2] == "0" {
			return fmt.Errorf("%s: no traffic counted both ways: %q", s.ifname, out)
		}
	}
	return nil
}

// close stops both wireguard-go processes (by PID; each removes its
// interface and control socket on exit) and undoes the agent's routing.
func (w *wgRouter) close() error {
	if w == nil {
		return nil
	}
	l := w.r.lab
	var errs []error
	for _, p := range []*lab.Process{w.client, w.agent} {
		if p != nil {
			p.Stop()
		}
	}
	// A wireguard-go killed before its cleanup leaves the socket behind.
	for _, ifname := range []string{w.cliIf, w.agtIf} {
		if err := os.Remove(filepath.Join(wgSockDir, ifname+".sock")); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if w.nft {
		if err := nftLoad(ctx, l.NS.Agent, "delete table ip nvwg\n"); err != nil {
			errs = append(errs, err)
		}
		w.nft = false
	}
	if w.forwarded {
		// Back to the lab's rule: the agent is not a router.
		if err := setSysctl(l.NS.Agent, "net/ipv4/ip_forward", "0"); err != nil {
			errs = append(errs, err)
		}
		w.forwarded = false
	}
	return errors.Join(errs...)
}

// wgKey writes a new private key to file (0600) and returns its public key.
func wgKey(ctx context.Context, file string) (string, error) {
	priv, err := exec.CommandContext(ctx, "wg", "genkey").Output()
	if err != nil {
		return "", fmt.Errorf("wg genkey: %w", err)
	}
	if err := os.WriteFile(file, priv, 0o600); err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "wg", "pubkey")
	cmd.Stdin = strings.NewReader(string(priv))
	pub, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("wg pubkey: %w", err)
	}
	return strings.TrimSpace(string(pub)), nil
}

// nftLoad loads rules (nft -f -) inside ns.
func nftLoad(ctx context.Context, ns, rules string) error {
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in %s: %v: %s", ns, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// setSysctl writes /proc/sys/<key> (slashes, e.g. "net/ipv4/ip_forward")
// inside ns.
func setSysctl(ns, key, val string) error {
	return lab.Do(ns, func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(val), 0o644)
	})
}

// wgVersion names the wireguard-go binary by its version line, e.g.
// "wireguard-go v0.0.20250522".
func wgVersion(bin string) string {
	out, err := exec.Command(bin, "--version").Output()
	if line, _, _ := strings.Cut(string(out), "\n"); err == nil && strings.HasPrefix(line, "wireguard-go ") {
		return line
	}
	return "wireguard-go"
}
