//go:build linux

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// A NAT rebinding under a transfer on the direct path, at either end: the
// tunnel falls back to the relay, the gateway sees the node's new address
// and tells the peer (wire.TypeMoved), the peer probes it, and the direct
// path comes back by itself within seconds; the transfer (one tunneled TCP
// connection) completes intact.
func TestDirectPathSurvivesNATRebinding(t *testing.T) {
	t.Parallel()
	for _, side := range []struct {
		name   string
		rebind func(*lab.Lab, context.Context) error
		peer   string // the log line of the peer that is told
	}{
		{"client", (*lab.Lab).RebindClientNAT, "the client's address changed; probing it there"},
		{"agent", (*lab.Lab).RebindAgentNAT, "the agent's address changed; probing it there"},
	} {
		t.Run(side.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, coneCone, false)
			e.startClientMode(t)
			e.waitPath(t, "direct", 15*time.Second)
			// 64 MiB at 3 MB/s: ~22 s, most of it after the rebinding.
			done := make(chan error, 1)
			go func() { done <- e.download(t, 64<<20, 41, "--limit-rate", "3M") }()
			time.Sleep(2 * time.Second)
			// The node that must find the path again is the peer of the
			// one whose NAT rebinds: its remote address changed. (The
			// rebound node's own remote did not change, and it may never
			// see its path go silent: the peer answers its pings at their
			// new source at once.)
			peerLog := e.agent.Log
			if side.name == "agent" {
				peerLog = e.client.Log
			}
			directs := strings.Count(peerLog(), established)
			if err := side.rebind(e.lab, context.Background()); err != nil {
				t.Fatal(err)
			}
			rebound := time.Now()
			// Direct again after having left it: the peer's log says so
			// (the relay in between may be too short for a status poll to
			// see).
			e.waitFor(t, 15*time.Second, "the direct path to come back after the rebinding", func() error {
				if n := strings.Count(peerLog(), established); n <= directs {
					return fmt.Errorf("not re-established yet")
				}
				if st, err := e.status(t); err != nil || st.Path != "direct" {
					return fmt.Errorf("path %q, %v", st.Path, err)
				}
				return nil
			})
			took := time.Since(rebound)
			t.Logf("%s NAT rebound: direct again after %v (the peer's path changes: %s)", side.name, took.Round(100*time.Millisecond), pathChanges(peerLog(), rebound))
			if !strings.Contains(peerLog(), side.peer) {
				t.Errorf("the peer never logged %q", side.peer)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("transfer across the NAT rebinding: %v", err)
				}
			case <-time.After(120 * time.Second):
				t.Fatal("transfer did not finish")
			}
		})
	}
}

// established is what a node logs when its direct path is confirmed.
const established = "The direct channel has just been established"

// pathChanges lists the client's path changes logged after since: when,
// counted from since, and which.
func pathChanges(log string, since time.Time) string {
	var out []string
	for _, line := range strings.Split(log, "\n") {
		what := ""
		switch {
		case strings.Contains(line, established):
			what = "direct"
		case strings.Contains(line, "falling back to the relay"):
			what = "relay"
		default:
			continue
		}
		i := strings.Index(line, "time=")
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+len("time="):])
		at, err := time.Parse(time.RFC3339Nano, f[0])
		if err != nil || at.Before(since) {
			continue
		}
		if j := strings.Index(line, "remote="); j >= 0 {
			what += " " + strings.Fields(line[j+len("remote="):])[0]
		}
		out = append(out, fmt.Sprintf("%v %s", at.Sub(since).Round(10*time.Millisecond), what))
	}
	return strings.Join(out, "; ")
}
