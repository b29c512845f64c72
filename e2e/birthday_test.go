//go:build linux

package e2e

import (
	"fmt"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

// Cone ↔ symmetric goes direct by the wide round (punch/wide.go): the side
// behind the symmetric NAT opens extra sockets toward the other, the cone
// side sends a burst of pings to random ports of the symmetric side's IP.
// Each orientation is tried 10 times, each trial on a lab of its own (a
// round is allowed once a minute per client name), with --direct so the
// relay cannot carry anything; printed: the success rate and the time from
// starting `up` to the client's "direct channel established". Asserted: at least 9 of 10, and the round's
// probes and sockets within their caps (the wide-round log lines).
// NLVPN_BIRTHDAY_TRIALS=N runs N trials each way instead of 10 (to measure
// the rate better), with the same required share.
func TestConeSymmetricGoesDirect(t *testing.T) {
	t.Parallel()
	for _, o := range []struct {
		name string
		opts lab.Options
	}{
		{"symmetric-client", lab.Options{ClientNAT: lab.Symmetric, AgentNAT: lab.Cone}},
		{"symmetric-agent", lab.Options{ClientNAT: lab.Cone, AgentNAT: lab.Symmetric}},
	} {
		t.Run(o.name, func(t *testing.T) {
			trials := birthdayTrials(t)
			var took []time.Duration
			var fails []string
			maxProbes, maxSockets := 0, 0
			for i := range trials {
				var d time.Duration
				var probes, sockets int
				ran, missed := false, false
				ok := t.Run(fmt.Sprint(i), func(t *testing.T) {
					ran = true
					d, probes, sockets, missed = coneSymmetricTrial(t, o.opts)
				})
				if !ran {
					continue // not selected by -run
				}
				maxProbes, maxSockets = max(maxProbes, probes), max(maxSockets, sockets)
				if ok && !missed {
					took = append(took, d)
				} else {
					fails = append(fails, fmt.Sprint(i))
				}
			}
			sort.Slice(took, func(i, j int) bool { return took[i] < took[j] })
			var ts []string
			for _, d := range took {
				ts = append(ts, d.Round(100*time.Millisecond).String())
			}
			t.Logf("%s: direct in %d of %d trials; time to direct (from up): %s; most burst pings %d, most extra sockets %d; failed: %v",
				o.name, len(took), trials, strings.Join(ts, " "), maxProbes, maxSockets, fails)
			if len(took)+len(fails) == trials && len(took)*10 < 9*trials {
				t.Fatalf("cone ↔ symmetric went direct in %d of %d trials, want at least 9 in 10", len(took), trials)
			}
		})
	}
}

// birthdayTrials is the trials each way: 10, or NLVPN_BIRTHDAY_TRIALS.
func birthdayTrials(t *testing.T) int {
	s := os.Getenv("NLVPN_BIRTHDAY_TRIALS")
	if s == "" {
		return 10
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 1000 {
		t.Fatalf("NLVPN_BIRTHDAY_TRIALS=%q: want a number of trials, 1 to 1000", s)
	}
	return n
}

var punchLines = regexp.MustCompile(`.*(direct channel|wide round|direct path|handshake).*`)

var (
	establishedAt = regexp.MustCompile(`time=(\S+) level=INFO msg="The direct channel has just been established"`)
	burstSent     = regexp.MustCompile(`wide round over.*role=easy probes_sent=(\d+)`)
	socketsOpen   = regexp.MustCompile(`wide round over.*role=hard sockets_opened=(\d+)`)
	crossedHit    = regexp.MustCompile(`found one of our ports.*probe=pong`)
)

// coneSymmetricTrial runs `up --direct` on a fresh lab and returns the time
// to the direct path and the burst's pings and extra sockets the logs
// report. A trial where the client gives up on the direct path, as
// --direct must when it finds none in time, is a miss (missed, logged),
// not a failure of the subtest: the caller counts misses against the
// success rate (a failed subtest would fail the whole test). Anything
// else that goes wrong fails it.
func coneSymmetricTrial(t *testing.T, opts lab.Options) (took time.Duration, probes, sockets int, missed bool) {
	e := newEnv(t, opts, false)
	start := time.Now()
	c := e.start(t, e.lab.NS.Client, "client", append(e.clientArgs(e.clientTok, agentName, tunName, e.clientStateDir()), "--direct")...)
	e.client = c
	e.waitFor(t, readyTimeout, "the tunnel to come up", func() error {
		if !c.Running() {
			// No direct path in time, or (seen once in 20 trials) a
			// direct path whose end-to-end handshake then timed out: both
			// are trials that did not give a working direct tunnel, counted
			// against the rate and logged with the client's reason.
			if strings.Contains(c.Log(), "no direct path") || strings.Contains(c.Log(), "end-to-end handshake with agent") {
				missed = true
				return nil
			}
			return errStop(fmt.Errorf("client exited with code %d", c.ExitCode()))
		}
		return e.httpHealth()
	})
	if missed {
		// Both sides' punching, so that a miss says where it went wrong.
		t.Logf("miss: %s\nagent:\n%s\nclient:\n%s", lastLines(c.Log(), 1),
			strings.Join(punchLines.FindAllString(e.agent.Log(), -1), "\n"), strings.Join(punchLines.FindAllString(c.Log(), -1), "\n"))
		return 0, 0, 0, true
	}
	st := e.waitPath(t, "direct", 15*time.Second)
	// The time to direct is the client's log line's: the tunnel's first
	// health check may wait out a curl timeout of 5 s that started before
	// the tunnel was up.
	m := establishedAt.FindStringSubmatch(e.client.Log())
	if m == nil {
		t.Fatalf("direct, but the client did not log it:\n%s", e.client.Log())
	}
	at, err := time.Parse(time.RFC3339Nano, m[1])
	if err != nil {
		t.Fatal(err)
	}
	took = at.Sub(start)
	if !strings.Contains(e.client.Log(), "wide round") && !strings.Contains(e.agent.Log(), "wide round") {
		t.Fatalf("direct at %s without a wide round", st.Remote)
	}
	if err := e.download(t, 4<<20, 91); err != nil {
		t.Fatal(err)
	}
	if n := e.relayedBytes(t); n != 0 {
		t.Fatalf("--direct: the relay carried %d bytes", n)
	}
	// The rounds end within ~10 s; wait for their summaries.
	e.waitFor(t, 15*time.Second, "the wide rounds' summaries", func() error {
		logs := e.client.Log() + e.agent.Log()
		if !burstSent.MatchString(logs) || !socketsOpen.MatchString(logs) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	logs := e.client.Log() + e.agent.Log()
	for _, m := range burstSent.FindAllStringSubmatch(logs, -1) {
		n, _ := strconv.Atoi(m[1])
		probes = max(probes, n)
	}
	for _, m := range socketsOpen.FindAllStringSubmatch(logs, -1) {
		n, _ := strconv.Atoi(m[1])
		sockets = max(sockets, n)
	}
	if len(burstSent.FindAllString(logs, -1)) != 1 || len(socketsOpen.FindAllString(logs, -1)) != 1 {
		t.Errorf("more than one wide round per side:\n%s", strings.Join(regexp.MustCompile(`.*wide round.*`).FindAllString(logs, -1), "\n"))
	}
	if probes > 1024 || sockets > 256 {
		t.Errorf("wide round over its caps: %d pings (max 1024), %d sockets (max 256)", probes, sockets)
	}
	// A hit whose first ping crossed the burst (the hard side's socket
	// was found by the easy side's pong): the easy side had to confirm it
	// with pings of its own (underlay's pinged).
	crossed := crossedHit.MatchString(logs)
	t.Logf("direct at %s after %v; burst pings %d, extra sockets %d; hit crossed the burst: %v", st.Remote, took.Round(100*time.Millisecond), probes, sockets, crossed)
	return took, probes, sockets, false
}
