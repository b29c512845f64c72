//go:build linux

package e2e

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/wire"
)

// relayStats is the part of the gateway's /relay counters the tests read.
type relayStats struct {
	Frames          uint64 `json:"frames"`
	UDPFrames       uint64 `json:"udp_frames"`
	DropUnknown     uint64 `json:"drop_unknown_session"`
	DropNotEndpoint uint64 `json:"drop_not_endpoint"`
	ChecksRefused   uint64 `json:"checks_refused"`
}

func (e *env) relayStats(t *testing.T) relayStats {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, _, err := lab.Run(ctx, e.lab.NS.GW, "curl", "-sS", "--noproxy", "*", "--max-time", "5", "http://"+metricsAddr+"/relay")
	if err != nil {
		t.Fatalf("gateway metrics: %v", err)
	}
	var rs relayStats
	if err := json.Unmarshal(out, &rs); err != nil {
		t.Fatalf("gateway /relay printed %q: %v", out, err)
	}
	return rs
}

// waitRelayUDP waits until the client's relay frames go as UDP datagrams
// to the gateway's port (not inside its gateway connection).
func (e *env) waitRelayUDP(t *testing.T) {
	t.Helper()
	e.waitFor(t, 10*time.Second, "relay frames as UDP", func() error {
		if !e.relayUDP(t) {
			return fmt.Errorf("relay frames still ride the gateway connection")
		}
		return nil
	})
}

// relayUDP reports whether the client says its relay frames go as UDP
// datagrams to the gateway's port (not in its gateway connection).
func (e *env) relayUDP(t *testing.T) bool {
	t.Helper()
	st, err := e.status(t)
	if err != nil {
		t.Fatal(err)
	}
	return st.RelayUDP
}

// A transfer survives relay → direct → relay switches, and the relay
// parts go as UDP frames through the gateway's port (not wrapped in the
// gateway connection).
func TestTransferSurvivesPathSwitches(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	// Start with the direct path blocked: the tunnel comes up on the relay.
	if err := e.lab.BlockDirect(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.startClientMode(t)
	e.waitPath(t, "relay", 5*time.Second)
	e.waitRelayUDP(t)
	before := e.relayStats(t)
	done := make(chan error, 1)
	go func() { done <- e.download(t, 48<<20, 21, "--limit-rate", "3M") }()
	time.Sleep(2 * time.Second)
	onRelay := e.relayStats(t)
	if onRelay.UDPFrames-before.UDPFrames < 1000 {
		t.Fatalf("the relay forwarded %d UDP frames in 2 s of a 3 MB/s transfer", onRelay.UDPFrames-before.UDPFrames)
	}
	// Let the direct path through: punching retries find it.
	if err := e.lab.UnblockDirect(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.waitPath(t, "direct", 20*time.Second)
	time.Sleep(2 * time.Second)
	// And take it away again: back to the relay.
	if err := e.lab.BlockDirect(context.Background()); err != nil {
		t.Fatal(err)
	}
	mid := e.relayStats(t)
	e.waitPath(t, "relay", 15*time.Second)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("transfer across relay → direct → relay: %v", err)
		}
	case <-time.After(150 * time.Second):
		t.Fatal("transfer did not finish")
	}
	if after := e.relayStats(t); after.UDPFrames-mid.UDPFrames < 1000 {
		t.Fatalf("after falling back, the relay forwarded only %d UDP frames", after.UDPFrames-mid.UDPFrames)
	}
}

// Relay frames that do not come from an end of their route are dropped
// and counted by the gateway, and nothing answers a stranger: a frame for
// the live session from another address, one from the client's own public
// IP but another port, a frame for a session that does not exist, and a
// relay check from an address that is no node's. The tunnel carries on.
func TestRelayDropsSpoofedFrames(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, true, relayOnly...)
	e.waitRelayUDP(t)
	st, err := e.status(t)
	if err != nil {
		t.Fatal(err)
	}
	idb, err := hex.DecodeString(st.Session)
	if err != nil || len(idb) != 8 {
		t.Fatalf("session %q in status", st.Session)
	}
	id := binary.BigEndian.Uint64(idb)
	gw := &net.UDPAddr{IP: e.lab.Gateway.AsSlice(), Port: gwPort}
	frame := func(kind byte, id uint64, payload string) []byte {
		h := wire.FrameHeader(kind, id)
		return append(h[:], payload...)
	}
	before := e.relayStats(t)

	// A stranger on the internet, and the client's own NAT router from a
	// port that is not the client's mapping.
	for _, ns := range []string{e.lab.NS.Inet, e.lab.NS.ClientNAT} {
		uc, err := lab.ListenUDP(ns, &net.UDPAddr{})
		if err != nil {
			t.Fatal(err)
		}
		defer uc.Close()
		for i := 0; i < 5; i++ {
			uc.WriteToUDP(frame(wire.FrameRelay, id, "spoofed ciphertext"), gw)
			uc.WriteToUDP(frame(wire.FrameRelay, id^0x5a5a, "no such session"), gw)
			uc.WriteToUDP(frame(wire.FrameRelayCheck, 0x77, "a token it does not have"[:16]), gw)
		}
		uc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, from, err := uc.ReadFromUDP(make([]byte, 2048)); err == nil {
			t.Fatalf("the gateway answered a spoofer in %s with %d bytes from %v", ns, n, from)
		}
	}
	e.waitFor(t, 5*time.Second, "the drops counted", func() error {
		rs := e.relayStats(t)
		if d := rs.DropNotEndpoint - before.DropNotEndpoint; d < 10 {
			return fmt.Errorf("drop_not_endpoint +%d, want +10", d)
		}
		if d := rs.DropUnknown - before.DropUnknown; d < 10 {
			return fmt.Errorf("drop_unknown_session +%d, want +10", d)
		}
		if d := rs.ChecksRefused - before.ChecksRefused; d < 10 {
			return fmt.Errorf("checks_refused +%d, want +10", d)
		}
		return nil
	})
	if err := e.download(t, 8<<20, 23); err != nil {
		t.Fatalf("the tunnel after the spoofed frames: %v", err)
	}
}

// The client's NAT rebinds (new public port for every flow) during a
// relayed transfer: the gateway follows the client's new address (QUIC
// migrates its connection; the relay moves the node with it), relay frames
// flow again from and to the new address, and the transfer completes.
func TestRelaySurvivesNATRebinding(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, true, relayOnly...)
	e.waitRelayUDP(t)
	// 48 MiB at 3 MB/s: ~16 s, time enough for the gateway to follow
	// (on its next sight of the client's QUIC connection) and for UDP
	// frames to flow again (the client's next relay check, within 5 s),
	// even on a loaded machine.
	done := make(chan error, 1)
	go func() { done <- e.download(t, 48<<20, 31, "--limit-rate", "3M") }()
	time.Sleep(2 * time.Second)
	if err := e.lab.RebindClientNAT(context.Background()); err != nil {
		t.Fatal(err)
	}
	rebound := time.Now()
	e.waitFor(t, 10*time.Second, "the gateway to follow the client's new address", func() error {
		if !strings.Contains(e.gateway.Log(), "node's address changed") {
			return fmt.Errorf("no address change logged yet")
		}
		return nil
	})
	t.Logf("gateway followed the client's new address %v after the rebinding", time.Since(rebound).Round(100*time.Millisecond))
	before := e.relayStats(t)
	e.waitFor(t, 12*time.Second, "UDP relay frames to flow again after the rebinding", func() error {
		if n := e.relayStats(t).UDPFrames - before.UDPFrames; n < 1000 {
			return fmt.Errorf("only %d UDP frames since", n)
		}
		return nil
	})
	t.Logf("UDP relay frames flowing again %v after the rebinding", time.Since(rebound).Round(100*time.Millisecond))
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("transfer across the NAT rebinding: %v", err)
		}
	case <-time.After(120 * time.Second):
		t.Fatal("transfer did not finish")
	}
}
