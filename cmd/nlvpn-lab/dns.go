//go:build linux

package main

import (
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/nlvpn/nlvpn/lab"
	"github.com/nlvpn/nlvpn/lab/labdns"
)

// dnsCmd serves the lab's office.lan zone (labdns.Office: A, SRV, PTR, MX,
// TXT, a CNAME chain, an answer too big for UDP) on UDP and TCP until
// interrupted: the LAN's resolver for trying the agent's DNS forwarder by
// hand (nlvpn agent --dns-server ADDR).
func dnsCmd(args []string) error {
	fs := flag.NewFlagSet("dns", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:5353", "UDP and TCP `ADDR` to answer on")
	host := fs.String("host", "", "IPv4 `ADDR` the zone's names point to (default: the listen address)")
	netns := fs.String("netns", "", "listen inside this existing network namespace (e.g. a lab's PREFIX-lan)")
	fs.Parse(args)
	ap, err := netip.ParseAddrPort(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	h := ap.Addr()
	if *host != "" {
		if h, err = netip.ParseAddr(*host); err != nil {
			return fmt.Errorf("--host: %w", err)
		}
	}
	if !h.Is4() {
		return fmt.Errorf("the zone's address %v is not IPv4", h)
	}
	var pc net.PacketConn
	var ln net.Listener
	if *netns != "" {
		pc, err = lab.ListenPacket(*netns, "udp", ap.String())
		if err == nil {
			ln, err = lab.Listen(*netns, "tcp", ap.String())
		}
	} else {
		pc, err = net.ListenPacket("udp", ap.String())
		if err == nil {
			ln, err = net.Listen("tcp", ap.String())
		}
	}
	if err != nil {
		if pc != nil {
			pc.Close()
		}
		return err
	}
	zone := labdns.Office(h)
	errc := make(chan error, 2)
	go func() { errc <- labdns.ServeUDP(pc, zone.Answer) }()
	go func() { errc <- labdns.ServeTCP(ln, zone.Answer) }()
	fmt.Printf("serving office.lan and %s's PTR on %v (UDP and TCP); try: dig @%s -p %d _ldap._tcp.office.lan SRV\n", h, ap, ap.Addr(), ap.Port())
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM)
	select {
	case <-sigc:
	case err = <-errc:
	}
	pc.Close()
	ln.Close()
	return err
}
