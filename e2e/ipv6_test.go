//go:build linux

package e2e

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/wire"
)

// An agent that advertises an IPv6 subnet next to its IPv4 one: the LAN
// host's IPv6 address answers through a TUN client (which takes its IPv6
// overlay address) and through a netstack client's SOCKS5 proxy; a 20 MB
// download over IPv6 arrives intact. The simulated internet stays IPv4.
func TestIPv6Subnet(t *testing.T) {
	e := newEnv(t, lab.Options{ClientNAT: lab.Cone, AgentNAT: lab.Cone, IPv6: true}, false)
	e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--advertise", e.lab.LANSubnet6.String())
	e.client = e.startClient(t)
	host := fmt.Sprintf("[%s]", e.lab.LANHost6)

	t.Run("TUN", func(t *testing.T) {
		out, err := lab.Output(context.Background(), e.lab.NS.Client, "ip", "-6", "addr", "show", "dev", tunName)
		if err != nil || !strings.Contains(out, wire.OverlayPrefix6.Addr().String()[:len("fd6e:6c76:706e:")]) {
			t.Fatalf("the TUN has no IPv6 overlay address: %v\n%s", err, out)
		}
		routes, _ := lab.Output(context.Background(), e.lab.NS.Client, "ip", "-6", "route", "show", "table", "all")
		if !strings.Contains(routes, e.lab.LANSubnet6.String()) {
			t.Fatalf("no route for %v:\n%s", e.lab.LANSubnet6, routes)
		}
		var out2 string
		e.waitFor(t, 10*time.Second, "the LAN host over IPv6 through the TUN", func() error {
			var err error
			out2, err = e.curl(5*time.Second, "-g", "http://"+host+"/health")
			return err
		})
		if strings.TrimSpace(out2) != "ok" {
			t.Fatalf("/health over IPv6 = %q", out2)
		}
		const size = 20 << 20
		dl := filepath.Join(e.dir, "dl-v6.bin")
		if _, err := e.curl(60*time.Second, "-g", "-o", dl, fmt.Sprintf("http://%s/data?size=%d&seed=61", host, size)); err != nil {
			t.Fatalf("20 MB over IPv6: %v", err)
		}
		if got, want := fileSHA256(t, dl), streamSHA256(61, size); got != want {
			t.Fatalf("20 MB over IPv6: sha256 %s, want %s", got, want)
		}
		if out, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-6", "-c", "2", "-W", "5", e.lab.LANHost6.String()); err != nil {
			t.Fatalf("ping -6 through the tunnel: %v\n%s", err, out)
		}
	})

	t.Run("SOCKS5", func(t *testing.T) {
		const socks = "127.0.0.1:1090"
		ns := e.start(t, e.lab.NS.Client, "netstack-client", "up", "--netstack", "--token-file", e.tokenFile(e.clientTok), "--gateway", e.gwAddr(),
			"--agent", agentName, "--state-dir", filepath.Join(e.dir, "ns-client"), "--socks5", socks, "--http-proxy", "")
		var out string
		e.waitFor(t, readyTimeout, "the LAN host over IPv6 through SOCKS5", func() error {
			if !ns.Running() {
				return errStop(fmt.Errorf("netstack client exited: %v", ns.Err()))
			}
			var err error
			out, err = e.curl(5*time.Second, "-g", "--socks5", socks, "http://"+host+"/health")
			return err
		})
		if strings.TrimSpace(out) != "ok" {
			t.Fatalf("/health over IPv6 via SOCKS5 = %q", out)
		}
	})

	// The same through a routed agent: the kernel forwards IPv6 too (IPv6
	// forwarding on while it runs, as an IPv6 prefix is advertised) and
	// masquerades to the agent's IPv6 LAN address.
	t.Run("Routed", func(t *testing.T) {
		e.client.Stop()
		e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--advertise", e.lab.LANSubnet6.String(), "--routed", "--tun", routedTun)
		e.client = e.startClient(t)
		var who string
		e.waitFor(t, 10*time.Second, "the LAN host over IPv6 through the routed agent", func() error {
			var err error
			who, err = e.curl(5*time.Second, "-g", "http://"+host+"/whoami")
			return err
		})
		if got := strings.TrimSpace(who); got != e.lab.AgentLANAddr6.String() {
			t.Errorf("the LAN host saw the IPv6 connection from %s; want the agent's LAN address %s", got, e.lab.AgentLANAddr6)
		}
		fwd, _ := lab.Output(context.Background(), e.lab.NS.Agent, "cat", "/proc/sys/net/ipv6/conf/all/forwarding")
		if strings.TrimSpace(fwd) != "1" {
			t.Errorf("IPv6 forwarding is %q while the routed agent advertises an IPv6 prefix", fwd)
		}
		if out, err := lab.Output(context.Background(), e.lab.NS.Client, "ping", "-6", "-c", "2", "-W", "5", e.lab.LANHost6.String()); err != nil {
			t.Errorf("ping -6 through the routed agent: %v\n%s", err, out)
		}
		// With IPv6 forwarding on, the agent's host takes its LAN's
		// subnet-router anycast address as its own, and that address is
		// in the advertised prefix and on no interface: the forwarding
		// drops (and counts) what comes from the device for the host
		// itself, so a UDP service of the host never hears the client.
		hostUDP, err := lab.ListenUDP(e.lab.NS.Agent, &net.UDPAddr{IP: net.IPv6unspecified, Port: 5999})
		if err != nil {
			t.Fatal(err)
		}
		defer hostUDP.Close()
		heard := make(chan string, 8)
		go func() {
			b := make([]byte, 64)
			for {
				n, from, err := hostUDP.ReadFrom(b)
				if err != nil {
					return
				}
				heard <- fmt.Sprintf("%q from %v", b[:n], from)
			}
		}()
		anycast := &net.UDPAddr{IP: e.lab.LANSubnet6.Masked().Addr().AsSlice(), Port: 5999}
		cli, err := lab.ListenUDP(e.lab.NS.Client, &net.UDPAddr{})
		if err != nil {
			t.Fatal(err)
		}
		defer cli.Close()
		for i := 0; i < 3; i++ {
			cli.WriteTo([]byte("to the host?"), anycast)
		}
		select {
		case got := <-heard:
			t.Errorf("a UDP service of the agent's host heard the client at the anycast address %v: %s", anycast.IP, got)
		case <-time.After(time.Second):
		}
		if n := e.agentStatus(t).Drops["routed_to_host"]; n == 0 {
			t.Error("the datagrams to the agent host's anycast address were not counted in routed_to_host")
		}
		e.client.Stop()
		e.agent.Stop()
		fwd, _ = lab.Output(context.Background(), e.lab.NS.Agent, "cat", "/proc/sys/net/ipv6/conf/all/forwarding")
		if strings.TrimSpace(fwd) != "0" {
			t.Errorf("IPv6 forwarding is %q after the routed agent stopped; want 0 as before", fwd)
		}
	})
}
