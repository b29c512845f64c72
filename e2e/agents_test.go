//go:build linux

package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// `nlvpn agents` lists the agents the client may use: one online with its
// LAN, one that was connected and left, with the subnet it advertised.
func TestAgentsListsOnlineAndOffline(t *testing.T) {
	e := newEnv(t, coneCone, false)
	away := netip.MustParsePrefix("10.77.0.0/16")
	tok := e.token(t, "--agent", "prospero")
	prospero := e.start(t, e.lab.NS.Agent, "prospero", "agent", "--token-file", e.tokenFile(tok), "--gateway", e.gwAddr(),
		"--advertise", away.String(), "--state-dir", filepath.Join(e.dir, "prospero"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := prospero.WaitLog(ctx, "registered"); err != nil {
		t.Fatalf("second agent: %v", err)
	}
	prospero.Stop()

	bob := e.tokenFile(e.token(t, "--client", "bob", "--allow-agent", agentName, "--allow-agent", "prospero"))
	args := []string{nlvpnBin, "agents", "--token-file", bob, "--gateway", e.gwAddr(), "--state-dir", filepath.Join(e.dir, "bob")}
	stdout, stderr, err := lab.Run(ctx, e.lab.NS.Client, append(args, "--json")...)
	if err != nil {
		t.Fatalf("nlvpn agents --json: %v\n%s", err, stderr)
	}
	var got struct {
		Agents []struct {
			Name      string         `json:"name"`
			Online    bool           `json:"online"`
			Advertise []netip.Prefix `json:"advertise"`
			LastSeen  int64          `json:"last_seen"`
		} `json:"agents"`
	}
	if err := json.Unmarshal(stdout, &got); err != nil {
		t.Fatalf("agents --json printed %q: %v", stdout, err)
	}
	t.Logf("nlvpn agents --json: %s", strings.TrimSpace(string(stdout)))
	if len(got.Agents) != 2 || got.Agents[0].Name != agentName || got.Agents[1].Name != "prospero" {
		t.Fatalf("listed %+v, want %s and prospero", got.Agents, agentName)
	}
	m, p := got.Agents[0], got.Agents[1]
	if !m.Online || len(m.Advertise) != 1 || m.Advertise[0] != e.lab.LANSubnet {
		t.Errorf("%s = %+v, want online with %v", agentName, m, e.lab.LANSubnet)
	}
	if p.Online || len(p.Advertise) != 1 || p.Advertise[0] != away || time.Since(time.Unix(p.LastSeen, 0)) > time.Minute {
		t.Errorf("prospero = %+v, want offline, last seen within a minute, with %v", p, away)
	}

	// The table a person reads says the same.
	stdout, stderr, err = lab.Run(ctx, e.lab.NS.Client, args...)
	if err != nil {
		t.Fatalf("nlvpn agents: %v\n%s", err, stderr)
	}
	out := string(stdout)
	t.Logf("nlvpn agents:\n%s", out)
	for _, want := range []string{agentName, "online", e.lab.LANSubnet.String(), "prospero", "offline, last seen", away.String()} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q", want)
		}
	}
}
