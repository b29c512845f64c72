//go:build linux

package e2e

import (
	"context"
	"github.com/nlvpn/nlvpn/lab"
	"strings"
	"testing"
	"time"
)

// TestRoutesNeverCaptureTheTunnel has the agent advertise a subnet that
// contains the gateway (all of the simulated internet) and one that
// contains the client's own LAN, and the user accepts both
// (--accept-routes). The client routes them into its TUN; its own UDP
// socket is marked past those routes, so the tunnel keeps working instead
// of routing itself into itself.
func TestRoutesNeverCaptureTheTunnel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--advertise", "198.18.0.0/15", "--advertise", "10.0.0.0/8")
	e.startClientMode(t, "--accept-routes", "198.18.0.0/15", "--accept-routes", "10.0.0.0/8")
	out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "route", "show", "table", "all", "198.18.0.0/15")
	if err != nil || !strings.Contains(out, tunName) {
		t.Fatalf("198.18.0.0/15 is not routed into the TUN: %q %v", out, err)
	}
	// The client's own LAN (10.0.1.0/24) lies inside the advertised
	// 10.0.0.0/8: it must stay the machine's (a throw route), so the NAT
	// router next door still answers directly.
	out, err = lab.Output(context.Background(), e.lab.NS.Client, "ip", "route", "show", "table", "5228")
	if err != nil || !strings.Contains(out, "throw 10.0.1.0/24") {
		t.Fatalf("no throw route for the client's own LAN in table 5228: %q %v", out, err)
	}
	if _, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "1", "-W", "2", "10.0.1.1"); err != nil {
		t.Fatalf("the client lost its own LAN: %v", err)
	}
	// Keepalives and traffic must keep flowing to the gateway, which now
	// sits inside a routed subnet.
	time.Sleep(6 * time.Second)
	if err := e.download(t, 4<<20, 21); err != nil {
		t.Fatalf("tunnel broke once the gateway's subnet was routed into it: %v", err)
	}
	if !e.client.Running() {
		t.Fatal("client exited")
	}
}

// TestClientRefusesRoutes: an agent announces a default route, a subnet
// with the gateway in it and one over the client's own LAN. Without
// --exit-node or --accept-routes the client routes none of them (and says
// what to type to accept each), keeps its default route and its LAN, and
// still reaches the ordinary advertised subnet.
func TestClientRefusesRoutes(t *testing.T) {
	t.Parallel()
	e := newEnv(t, coneCone, false)
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--advertise", "0.0.0.0/0", "--exit-node",
		"--advertise", "198.18.0.0/15", "--advertise", "10.0.0.0/8")
	c := e.startClientMode(t)
	out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "route", "show", "table", "5228")
	if err != nil {
		t.Fatal(err)
	}
	for _, refused := range []string{"default", "198.18.0.0/15", "10.0.0.0/8"} {
		if strings.Contains(out, refused+" dev") {
			t.Errorf("the client routed %s from the agent into the TUN without being asked:\n%s", refused, out)
		}
	}
	if !strings.Contains(out, e.lab.LANSubnet.String()) {
		t.Errorf("the advertised LAN %s is not routed:\n%s", e.lab.LANSubnet, out)
	}
	for _, hint := range []string{"to_accept=--exit-node", "to_accept=\"--accept-routes 198.18.0.0/15\"", "to_accept=\"--accept-routes 10.0.0.0/8\""} {
		if !strings.Contains(c.Log(), hint) {
			t.Errorf("the client's log does not tell the user %s", hint)
		}
	}
	// The machine's own default route and LAN are untouched.
	if out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "route", "get", "198.18.1.2"); err != nil || strings.Contains(out, tunName) {
		t.Errorf("the gateway is routed into the TUN: %q %v", out, err)
	}
	if _, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-c", "1", "-W", "2", "10.0.1.1"); err != nil {
		t.Fatalf("the client lost its own LAN: %v", err)
	}
	if err := e.download(t, 1<<20, 22); err != nil {
		t.Fatalf("the advertised LAN is not reachable: %v", err)
	}
}
