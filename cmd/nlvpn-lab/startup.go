//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/lab"
)

const probePort = 7070

// startupTrials restarts the client (default mode) n times and measures,
// from the moment `nlvpn up` is started: the first TCP handshake through
// the tunnel to the LAN host, and the client reporting path "direct" in
// `nlvpn status --json`. It needs a running stack (gateway, agent).
func (r *runner) startupTrials(n int) (*startupResult, error) {
	l := r.lab
	ln, err := lab.Listen(l.NS.LAN, "tcp4", fmt.Sprintf("%s:%d", l.LANHost, probePort))
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	target := fmt.Sprintf("%s:%d", l.LANHost, probePort)
	say("Startup: %d trials of `nlvpn up` (default mode), timing the first TCP handshake to %s and the switch to the direct path.", n, target)
	res := &startupResult{n: n}
	hard := l.Opts.ClientNAT == lab.Symmetric || l.Opts.AgentNAT == lab.Symmetric
	for i := 1; i <= n; i++ {
		if err := r.ctx.Err(); err != nil {
			return nil, err
		}
		if r.client != nil {
			r.client.Stop()
		}
		if hard && i > 1 {
			// A symmetric NAT on one side: the direct path needs a wide
			// round, which an agent grants a client name once a minute.
			// A fresh agent times what a first connect gets.
			if err := r.startAgent(); err != nil {
				return nil, err
			}
		}
		r.clientN++
		start := time.Now()
		r.client, err = r.start(l.NS.Client, fmt.Sprintf("client-%d", r.clientN), append(append([]string{"up"}, r.clientTokArgs...), "--gateway", r.gwAddr(),
			"--agent", agentName, "--state-dir", filepath.Join(r.dir, "client"), "--tun", tunName)...)
		if err != nil {
			return nil, err
		}
		// Two pollers, so the slower status call does not blur the first-packet time.
		deadline := start.Add(30 * time.Second)
		alive := func() bool { return time.Now().Before(deadline) && r.client.Running() && r.ctx.Err() == nil }
		var tFirst, tDirect time.Duration
		done := make(chan struct{})
		go func() {
			defer close(done)
			for alive() && r.clientPath() != "direct" {
				time.Sleep(20 * time.Millisecond)
			}
			if alive() {
				tDirect = time.Since(start)
			}
		}()
		// A new handshake attempt every 10 ms, each allowed 1 s, so a SYN
		// lost while the tunnel comes up does not cost a retransmit timeout.
		won := make(chan time.Duration, 1)
		var wg sync.WaitGroup
	attempts:
		for alive() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(r.ctx, time.Second)
				defer cancel()
				if c, err := lab.DialContext(ctx, l.NS.Client, "tcp4", target); err == nil {
					c.Close()
					select {
					case won <- time.Since(start):
					default:
					}
				}
			}()
			select {
			case tFirst = <-won:
				break attempts
			case <-time.After(10 * time.Millisecond):
			}
		}
		wg.Wait()
		if tFirst == 0 {
			select {
			case tFirst = <-won:
			default:
			}
		}
		<-done
		fmt.Printf("    trial %2d: first packet %s, direct %s\n", i, fmtDur(tFirst), fmtDur(tDirect))
		if tFirst > 0 {
			res.first = append(res.first, tFirst)
		}
		if tDirect > 0 {
			res.direct = append(res.direct, tDirect)
		}
	}
	if len(res.first) < n {
		return res, fmt.Errorf("%d of %d trials never passed traffic", n-len(res.first), n)
	}
	return res, nil
}

// clientPath returns the running client's "path" from `nlvpn status --json`.
func (r *runner) clientPath() string {
	ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
	defer cancel()
	out, _, err := lab.Run(ctx, r.lab.NS.Client, r.nlvpn, "status", "--json", "--state-dir", filepath.Join(r.dir, "client"))
	if err != nil {
		return ""
	}
	var st struct {
		Path string `json:"path"`
	}
	if json.Unmarshal(out, &st) != nil {
		return ""
	}
	return st.Path
}

// median is the middle value of d (the mean of the two middle ones for an
// even count), 0 for none.
func median[T ~int64 | ~float64](d []T) T {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func maxDur(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return slices.Max(d)
}

func fmtDur(d time.Duration) string {
	if d == 0 {
		return "never"
	}
	return d.Round(time.Millisecond).String()
}

// clientTransport checks that the client reaches the gateway over want
// (nlvpn status: udp, tcp, ...).
func (r *runner) clientTransport(want string) error {
	ctx, cancel := context.WithTimeout(r.ctx, 10*time.Second)
	defer cancel()
	out, _, err := lab.Run(ctx, r.lab.NS.Client, r.nlvpn, "status", "--json", "--state-dir", filepath.Join(r.dir, "client"))
	if err != nil {
		return err
	}
	var st struct {
		Transport string `json:"transport"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return err
	}
	if st.Transport != want {
		return fmt.Errorf("the client reaches the gateway over %q, not %s", st.Transport, want)
	}
	return nil
}
