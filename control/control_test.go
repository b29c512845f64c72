package control

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"

	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/wire"
)

// The end-to-end behaviour (registration, requests, relay, refusals) is
// tested against a real gateway in package gateway. These are the parts
// that need no gateway.

func newTestClient(t *testing.T, gateway string) *Client {
	t.Helper()
	return newNode(t, Config{Gateway: gateway, Pin: "sha256:00"})
}

// newNode returns a Client configured by cfg, with the test's own key and
// loopback UDP port, a quiet log, and a token if cfg has none.
func newNode(t *testing.T, cfg Config) *Client {
	t.Helper()
	key, err := identity.Generate()
	if err != nil {
		t.Fatal(err)
	}
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tr := &quic.Transport{Conn: uc}
	t.Cleanup(func() { tr.Close(); uc.Close() })
	cfg.Key, cfg.Transport = key, tr
	if cfg.Token == "" {
		cfg.Token = "nlv1.x.y"
	}
	cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	return New(cfg)
}

func TestNotConnected(t *testing.T) {
	c := newTestClient(t, "127.0.0.1:1")
	if _, err := c.Request(context.Background(), &wire.Message{Type: wire.TypeConnect, Connect: &wire.Connect{Agent: "miranda"}}); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("Request before Run = %v, want ErrNotConnected", err)
	}
	if err := c.SendRelayDatagram(1, []byte("x")); !errors.Is(err, ErrNotConnected) {
		t.Fatalf("SendRelayDatagram before Run = %v, want ErrNotConnected", err)
	}
	if a := c.GatewayAddr(); a.IsValid() {
		t.Fatalf("GatewayAddr before Run = %v, want none", a)
	}
	if c.Welcome() != nil {
		t.Fatal("Welcome before registration")
	}
}

func TestBadGatewayAddressIsFatal(t *testing.T) {
	for _, addr := range []string{"no-port", "127.0.0.1", ""} {
		t.Run(addr, func(t *testing.T) {
			c := newTestClient(t, addr)
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			err := c.Run(ctx)
			var fe *FatalError
			if !errors.As(err, &fe) || !strings.Contains(fe.Error(), "gateway address") {
				t.Fatalf("Run = %v (%T), want a FatalError about the gateway address", err, err)
			}
			if _, rerr := c.Ready(context.Background()); rerr != err {
				t.Fatalf("Ready = %v, want Run's error %v", rerr, err)
			}
		})
	}
}

// An unreachable gateway is retried, not fatal, and cancelling stops the
// retries at once.
func TestUnreachableGatewayRetriesUntilCancel(t *testing.T) {
	// A loopback port with nobody behind it.
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	addr := uc.LocalAddr().String()
	uc.Close()

	c := newTestClient(t, addr)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	select {
	case err := <-done:
		t.Fatalf("Run gave up on an unreachable gateway: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if _, err := c.Ready(rctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ready while unreachable = %v, want to keep waiting", err)
	}
	rcancel()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Run after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Run did not stop after cancel while dialing")
	}
}

func TestQUICConfigFitsRelayFrames(t *testing.T) {
	c := QUICConfig()
	if !c.EnableDatagrams {
		t.Fatal("datagrams disabled: the relay cannot work")
	}
	if !c.DisablePathMTUDiscovery || c.InitialPacketSize != wire.GatewayPacketSize {
		t.Fatalf("packet size %d (PMTUD off: %v); the relay budget assumes a fixed %d", c.InitialPacketSize, c.DisablePathMTUDiscovery, wire.GatewayPacketSize)
	}
	// That a full PeerPacketSize packet really fits a relay DATAGRAM is
	// shown end to end in package gateway (testRelay).
}
