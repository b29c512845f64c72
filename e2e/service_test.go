//go:build linux

package e2e

// The systemd units (packaging/systemd) run the agent as a user of its own
// with no capabilities and the TUN client as a user of its own with only
// CAP_NET_ADMIN, both with no_new_privs, the token in a credential file
// (0400, the service's user) and the state in a 0700 StateDirectory. No
// systemd runs here, so this runs the binary under the same identity and
// capability sets with setpriv(1), and checks that both work and that
// `nlvpn status` (as root, as an admin would) finds them through the state
// directory. The units' other sandboxing (seccomp, mount namespaces) is
// only checked by systemd-analyze (make units-check).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nlvpn/nlvpn/lab"
)

// asServiceUser wraps a command line as the units run it: uid and gid
// nobody, no supplementary groups, no_new_privs, and caps (e.g.
// "net_admin"; empty for none) as the only capability, ambient, inheritable
// and bounding, as AmbientCapabilities= and CapabilityBoundingSet= set it.
func asServiceUser(caps string, args ...string) []string {
	set := "-all"
	if caps != "" {
		set += ",+" + caps
	}
	return append([]string{"setpriv", fmt.Sprintf("--reuid=%d", nobodyUID), fmt.Sprintf("--regid=%d", nobodyGID),
		"--clear-groups", "--no-new-privs", "--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set,
		"--pdeathsig", "keep"}, args...)
}

// credentialFile writes tok the way systemd's LoadCredential= hands it over:
// a 0400 file owned by the service's user in a directory of its own.
func (n *nsEnv) credentialFile(t *testing.T, name, tok string) string {
	t.Helper()
	dir := n.nobodyDir(t, name, 0o500)
	path := filepath.Join(dir, "token")
	if err := os.WriteFile(path, []byte(tok+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(path, nobodyUID, nobodyGID); err != nil {
		t.Fatal(err)
	}
	return path
}

// withHostTunMode wraps a command line so that it sees /dev/net/tun with
// the mode it has on a systemd host (0666, from udev's default rules:
// opening it is allowed to everyone, creating a device needs CAP_NET_ADMIN). A container may have
// made it 0600, which no unit setting can change for a DynamicUser; then a
// 0666 node is bind-mounted over it in a mount namespace of the command's
// own (the machine's /dev/net/tun stays as it is).
func withHostTunMode(t *testing.T, argv []string) []string {
	t.Helper()
	fi, err := os.Stat("/dev/net/tun")
	if err != nil {
		t.Fatalf("no /dev/net/tun: %v", err)
	}
	if fi.Mode().Perm() == 0o666 {
		return argv
	}
	node := filepath.Join(t.TempDir(), "tun")
	if err := syscall.Mknod(node, syscall.S_IFCHR|0o666, int(unix.Mkdev(10, 200))); err != nil {
		t.Skipf("cannot make a 0666 TUN node to stand for the host's (%v)", err)
	}
	if err := os.Chmod(node, 0o666); err != nil { // past the umask
		t.Fatal(err)
	}
	t.Logf("/dev/net/tun is %v here; the client sees a 0666 one, as on a host", fi.Mode().Perm())
	return append([]string{"unshare", "--mount", "--propagation", "private",
		"sh", "-c", `mount --bind "$1" /dev/net/tun && shift && exec "$@"`, "sh", node}, argv...)
}

func (n *nsEnv) startService(t *testing.T, ns, name, caps string, args ...string) *lab.Process {
	t.Helper()
	argv := asServiceUser(caps, append([]string{n.bin}, args...)...)
	if caps == "net_admin" {
		argv = withHostTunMode(t, argv)
	}
	n.mu.Lock()
	n.seq++
	logPath := filepath.Join(n.dir, fmt.Sprintf("%02d-%s.log", n.seq, name))
	n.mu.Unlock()
	p, err := n.lab.Start(ns, lab.ProcConfig{Name: name, Args: argv,
		Env: n.nobodyEnv(), LogPath: logPath})
	if err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	n.procs = append(n.procs, p)
	n.mu.Unlock()
	return p
}

// checkServiceUser checks the process's uid and effective capabilities.
func checkServiceUser(t *testing.T, name string, pid int, wantCapEff uint64) {
	t.Helper()
	uid, capEff, err := procStatus(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: Uid %s, CapEff %s", name, uid, capEff)
	if f := strings.Fields(uid); len(f) < 2 || f[0] != strconv.Itoa(nobodyUID) || f[1] != strconv.Itoa(nobodyUID) {
		t.Errorf("%s runs with Uid %q, want %d", name, uid, nobodyUID)
	}
	if c, err := strconv.ParseUint(capEff, 16, 64); err != nil || c != wantCapEff {
		t.Errorf("%s: CapEff %s, want %#x", name, capEff, wantCapEff)
	}
}

// statusJSON runs `nlvpn status --json --state-dir dir` as root in ns.
func (n *nsEnv) statusJSON(t *testing.T, ns, dir string) map[string]any {
	t.Helper()
	r := runIn(ns, 10*time.Second, nil, nil, nlvpnBin, "status", "--json", "--state-dir", dir)
	if r.code != 0 {
		t.Fatalf("nlvpn status --state-dir %s: exit %d: %s", dir, r.code, r.stderr)
	}
	var st map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("nlvpn status --json: %v: %q", err, r.stdout)
	}
	return st
}

// serviceAgentState copies the agent's state (and so its key, which its
// one-machine token is bound to) to a directory of the service user's, as
// systemd does when DynamicUser= is turned on, and returns that directory.
func (n *nsEnv) serviceAgentState(t *testing.T) string {
	t.Helper()
	agentDir := n.nobodyDir(t, "agent-state", 0o700)
	entries, err := os.ReadDir(n.agentDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue // the status socket
		}
		b, err := os.ReadFile(filepath.Join(n.agentDir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(agentDir, e.Name())
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dst, nobodyUID, nobodyGID); err != nil {
			t.Fatal(err)
		}
	}
	return agentDir
}

// waitRegistered waits until the agent service has registered with the
// gateway.
func (n *nsEnv) waitRegistered(t *testing.T, agent *lab.Process) {
	t.Helper()
	n.waitFor(t, 20*time.Second, "the agent service registered", func() error {
		if !agent.Running() {
			return errStop(fmt.Errorf("agent exited: %s\n%s", agent.ExitStatus(), agent.Log()))
		}
		if !strings.Contains(agent.Log(), "registered") {
			return fmt.Errorf("not registered yet")
		}
		return nil
	})
}

func TestServiceUsersAndCapabilities(t *testing.T) {
	t.Parallel()
	n := newNetstackEnv(t)

	// The agent as nlvpn-agent.service runs it.
	n.agent.Stop()
	agentDir := n.serviceAgentState(t)
	agent := n.startService(t, n.lab.NS.Agent, "agent-service", "",
		"agent", "--token-file", n.credentialFile(t, "agent-cred", n.agentTok), "--gateway", n.gwAddr(),
		"--advertise", n.lab.LANSubnet.String(), "--state-dir", agentDir)
	n.waitRegistered(t, agent)
	checkServiceUser(t, "agent", agent.PID(), 0)

	// The client as nlvpn-client@.service runs it: CAP_NET_ADMIN only.
	clientDir := n.nobodyDir(t, "client-state", 0o700)
	client := n.startService(t, n.lab.NS.Client, "client-service", "net_admin",
		"up", "--agent", agentName, "--token-file", n.credentialFile(t, "client-cred", n.clientTok), "--gateway", n.gwAddr(),
		"--state-dir", clientDir, "--tun", tunName, "--relay")
	n.waitFor(t, readyTimeout, "the LAN host through the service client's TUN device", func() error {
		if !client.Running() {
			return errStop(fmt.Errorf("client exited: %s\n%s", client.ExitStatus(), client.Log()))
		}
		return n.httpHealth() // curl as root: every program on the machine
	})
	checkServiceUser(t, "client", client.PID(), 1<<12) // CAP_NET_ADMIN
	if !strings.Contains(client.Log(), "nlvpn: TUN mode (device "+tunName+")") {
		t.Errorf("the client with CAP_NET_ADMIN did not choose the TUN mode; log:\n%s", client.Log())
	}
	if strings.Contains(client.Log(), "level=WARN") {
		t.Errorf("the client warned (a credential file 0400 is what the units give it); log:\n%s", client.Log())
	}

	// An admin's `sudo nlvpn status --state-dir /var/lib/...` finds both.
	st := n.statusJSON(t, n.lab.NS.Client, clientDir)
	if st["agent"] != agentName || st["path"] != "relay" {
		t.Errorf("client status: agent %v, path %v; want %s, relay", st["agent"], st["path"], agentName)
	}
	ast := n.statusJSON(t, n.lab.NS.Agent, agentDir)
	if sessions, _ := ast["sessions"].([]any); ast["role"] != "agent" || len(sessions) != 1 {
		t.Errorf("agent status: role %v, %d sessions; want agent, 1", ast["role"], len(sessions))
	}

	// systemctl stop sends SIGTERM: the device and its routes go.
	if code := client.Stop(); code != 0 {
		t.Errorf("client exit code %d after SIGTERM", code)
	}
	if out, err := lab.Output(t.Context(), n.lab.NS.Client, "ip", "-o", "link", "show"); err != nil || strings.Contains(out, tunName) {
		t.Errorf("after SIGTERM the TUN device is still there (%v):\n%s", err, out)
	}
	if out, err := lab.Output(t.Context(), n.lab.NS.Client, "ip", "route", "show", n.lab.LANSubnet.String()); err != nil || strings.TrimSpace(out) != "" {
		t.Errorf("after SIGTERM the route to %s is still there (%v): %q", n.lab.LANSubnet, err, out)
	}
	if code := agent.Stop(); code != 0 {
		t.Errorf("agent exit code %d after SIGTERM", code)
	}
}

// The agent as nlvpn-agent.service runs it with the routed drop-in
// (packaging/systemd/nlvpn-agent.service.d/routed.conf): a user of its own
// with CAP_NET_ADMIN only is enough for the TUN device, the routes, the
// nftables table and the forwarding sysctl, and it puts the host back at
// SIGTERM.
func TestServiceRoutedAgent(t *testing.T) {
	t.Parallel()
	n := newNetstackEnv(t)
	before := ipForward(t, n.lab.NS.Agent)

	n.agent.Stop()
	agentDir := n.serviceAgentState(t)
	agent := n.startService(t, n.lab.NS.Agent, "agent-routed-service", "net_admin",
		"agent", "--routed", "--tun", routedTun, "--token-file", n.credentialFile(t, "agent-cred", n.agentTok), "--gateway", n.gwAddr(),
		"--advertise", n.lab.LANSubnet.String(), "--state-dir", agentDir)
	n.waitRegistered(t, agent)
	checkServiceUser(t, "agent", agent.PID(), 1<<12) // CAP_NET_ADMIN

	clientDir := n.nobodyDir(t, "client-state", 0o700)
	client := n.startService(t, n.lab.NS.Client, "client-service", "net_admin",
		"up", "--agent", agentName, "--token-file", n.credentialFile(t, "client-cred", n.clientTok), "--gateway", n.gwAddr(),
		"--state-dir", clientDir, "--tun", tunName)
	n.waitFor(t, readyTimeout, "the LAN host through the routed agent service", func() error {
		if !client.Running() {
			return errStop(fmt.Errorf("client exited: %s\n%s", client.ExitStatus(), client.Log()))
		}
		if !agent.Running() {
			return errStop(fmt.Errorf("agent exited: %s\n%s", agent.ExitStatus(), agent.Log()))
		}
		return n.httpHealth()
	})
	ast := n.statusJSON(t, n.lab.NS.Agent, agentDir)
	if ast["egress"] != "routed via "+routedTun {
		t.Errorf("agent status: egress %v, want routed via %s", ast["egress"], routedTun)
	}
	if got := ipForward(t, n.lab.NS.Agent); got != "1" {
		t.Errorf("ip_forward is %s while the routed agent service runs; want 1", got)
	}
	if strings.Contains(agent.Log(), "level=WARN") || strings.Contains(agent.Log(), "level=ERROR") {
		t.Errorf("the routed agent service warned; log:\n%s", agent.Log())
	}

	if code := client.Stop(); code != 0 {
		t.Errorf("client exit code %d after SIGTERM", code)
	}
	if code := agent.Stop(); code != 0 {
		t.Errorf("agent exit code %d after SIGTERM; log:\n%s", code, agent.Log())
	}
	if got := ipForward(t, n.lab.NS.Agent); got != before {
		t.Errorf("ip_forward is %s after the agent service stopped; it was %s", got, before)
	}
	if out, err := lab.Output(t.Context(), n.lab.NS.Agent, "ip", "-o", "link", "show"); err != nil || strings.Contains(out, routedTun) {
		t.Errorf("after SIGTERM the agent's TUN device is still there (%v):\n%s", err, out)
	}
	if out, err := lab.Output(t.Context(), n.lab.NS.Agent, "nft", "list", "tables"); err != nil || strings.Contains(out, "nlvpn-forward-") {
		t.Errorf("after SIGTERM the agent's nftables table is still there (%v):\n%s", err, out)
	}
}
