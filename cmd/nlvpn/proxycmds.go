package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/client"
	"github.com/nlvpn/nlvpn/netstack"
	"github.com/nlvpn/nlvpn/token"
)

func modeFlagList() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "direct", Aliases: []string{"d"}, Usage: "direct (peer-to-peer) path only: never send a byte through the relay; fail if no direct path within --direct-timeout"},
		&cli.BoolFlag{Name: "relay", Aliases: []string{"r"}, Usage: "relay only: never try a direct path (no probes are sent)"},
		&cli.DurationFlag{Name: "direct-timeout", Value: 10 * time.Second, Usage: "with --direct: how long to try before giving up"},
	}
}

func proxyFlagList() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "socks5", Value: "127.0.0.1:1080", Usage: "netstack mode: SOCKS5 proxy `ADDR` (CONNECT, UDP ASSOCIATE, names resolved by the agent); empty to disable"},
		&cli.StringFlag{Name: "http-proxy", Value: "127.0.0.1:8080", Usage: "netstack mode: HTTP proxy `ADDR` (CONNECT and plain http://); empty to disable"},
		&cli.StringFlag{Name: "proxy-user", Usage: "netstack mode: require this user name on the proxies (required when they listen beyond loopback)", EnvVars: []string{"NLVPN_PROXY_USER"}},
		&cli.StringFlag{Name: "proxy-password", Usage: "netstack mode: the proxies' password (prefer NLVPN_PROXY_PASSWORD: flags show in ps)", EnvVars: []string{"NLVPN_PROXY_PASSWORD"}},
	}
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// proxyConfig reads the proxy flags. Listening beyond loopback without
// credentials would open the tunnel to anyone who can reach this machine.
func proxyConfig(c *cli.Context) (*client.NetstackConfig, error) {
	nc := &client.NetstackConfig{SOCKS5: c.String("socks5"), HTTP: c.String("http-proxy")}
	if u, p := c.String("proxy-user"), c.String("proxy-password"); u != "" || p != "" {
		if u == "" || p == "" {
			return nil, errors.New("--proxy-user and --proxy-password go together")
		}
		nc.Auth = &netstack.Credentials{User: u, Password: p}
	}
	for _, addr := range []string{nc.SOCKS5, nc.HTTP} {
		if addr == "" {
			continue
		}
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("proxy address %q: want HOST:PORT", addr)
		}
		ip, err := netip.ParseAddr(host)
		loopback := (err == nil && ip.IsLoopback()) || host == "localhost"
		if !loopback && nc.Auth == nil {
			return nil, fmt.Errorf("proxy address %s is not loopback: set --proxy-user and NLVPN_PROXY_PASSWORD so only you can use it", addr)
		}
	}
	return nc, nil
}

// clientFlags are shared by connect and forward.
func clientFlags() []cli.Flag {
	return append(append(nodeFlags(),
		&cli.StringFlag{Name: "agent", Aliases: []string{"n"}, Usage: "`NAME` of the agent to connect through", Required: true},
		&cli.DurationFlag{Name: "connect-timeout", Value: 20 * time.Second, Usage: "give up if the gateway cannot be reached within this"},
		&cli.DurationFlag{Name: "wait", Aliases: []string{"wait-agent"}, Value: 20 * time.Second, Usage: "wait this long for an agent that is not online yet (0: until stopped; -1s: do not wait)"},
	), modeFlagList()...)
}

// runNetstackClient starts a netstack client without proxies and calls
// use with it once the tunnel is up; the tunnel ends when use returns.
func runNetstackClient(c *cli.Context, use func(ctx context.Context, px *netstack.Proxy) error) error {
	if !token.ValidName(c.String("agent")) {
		return fmt.Errorf("--agent %q is not a valid agent name", c.String("agent"))
	}
	ns, err := setupNode(c, token.RoleClient)
	if err != nil {
		return err
	}
	mode, err := modeFlags(c)
	if err != nil {
		return err
	}
	udpSize, err := udpSizeFlag(c)
	if err != nil {
		return err
	}
	ctx, cancel := signalContext(c)
	defer cancel()
	ready := make(chan *netstack.Proxy, 1)
	done := make(chan error, 1)
	go func() {
		done <- client.Run(ctx, client.Config{
			Netstack: &client.NetstackConfig{Ready: func(px *netstack.Proxy) { ready <- px }},
			Mode:     mode, DirectTimeout: c.Duration("direct-timeout"),
			Gateway: ns.gateway, Gateways: ns.gateways, Pin: ns.claims.Pin, Token: ns.token, Key: ns.key, Agent: c.String("agent"), Over: ns.over, Proxy: ns.proxy,
			KnownAgents:    filepath.Join(ns.stateDir, "known_agents"),
			ConnectTimeout: c.Duration("connect-timeout"),
			WaitAgent:      c.Duration("wait"),
			UDPSize:        udpSize,
			Log:            slog.Default(),
		})
	}()
	select {
	case err := <-done:
		if err == nil {
			err = errors.New("interrupted")
		}
		return err
	case px := <-ready:
		err := use(ctx, px)
		cancel()
		<-done
		return err
	}
}

func connectCmd() *cli.Command {
	return &cli.Command{
		Name:      "connect",
		Usage:     "copy stdin/stdout to HOST:PORT as seen from the agent (for ssh ProxyCommand); no root, no listener",
		UsageText: "nlvpn connect -n NAME [-d|-r] HOST:PORT",
		Description: `For ~/.ssh/config:

   Host miranda
       ProxyCommand nlvpn connect -d -n %n %h:%p
       HostName 127.0.0.1
       Port 22

HOST is resolved by the agent, so names only its LAN knows work; 127.0.0.1 is the
agent's own loopback, reachable only if the agent runs with --allow-loopback.
Logs go to stderr at warn level unless --log-level says otherwise.`,
		Flags: clientFlags(),
		Before: func(c *cli.Context) error {
			if !c.IsSet("log-level") && os.Getenv("NLVPN_LOG_LEVEL") == "" {
				setupLoggingLevel(slog.LevelWarn)
			}
			return nil
		},
		Action: func(c *cli.Context) error {
			limitClientMemory()
			if c.NArg() != 1 {
				return errors.New("usage: nlvpn connect -n NAME HOST:PORT")
			}
			target := c.Args().First()
			if _, _, err := net.SplitHostPort(target); err != nil {
				return fmt.Errorf("target %q: want HOST:PORT", target)
			}
			return runNetstackClient(c, func(ctx context.Context, px *netstack.Proxy) error {
				dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				conn, err := px.DialContext(dctx, "tcp", target)
				cancel()
				if err != nil {
					return dialError(target, err)
				}
				defer conn.Close()
				return splice(ctx, conn, os.Stdin, os.Stdout)
			})
		},
	}
}

// dialError says what ssh users need: refused, unreachable, or unknown name.
func dialError(target string, err error) error {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("connect to %s: connection refused (nothing listens there, or the agent's policy refused it)", target)
	case errors.As(err, &dnsErr):
		return fmt.Errorf("connect to %s: the agent cannot resolve the name: %v", target, err)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return fmt.Errorf("connect to %s: timed out", target)
	}
	return fmt.Errorf("connect to %s: %w", target, err)
}

// splice copies both ways until the remote closes; a local EOF half-closes.
func splice(ctx context.Context, conn net.Conn, in io.Reader, out io.Writer) error {
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(conn, in)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
		if err != nil {
			errc <- err
		}
	}()
	go func() {
		_, err := io.Copy(out, conn)
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return nil
	}
}

// forwardSpec is one -L or -U: [BIND:]PORT:HOST:HOSTPORT.
type forwardSpec struct {
	network string
	listen  string
	target  string
}

func parseForward(network, s string) (forwardSpec, error) {
	parts := strings.Split(s, ":")
	bind := "127.0.0.1"
	switch len(parts) {
	case 3:
	case 4:
		bind, parts = parts[0], parts[1:]
	default:
		return forwardSpec{}, fmt.Errorf("forward %q: want [BIND:]PORT:HOST:HOSTPORT", s)
	}
	for _, p := range []string{parts[0], parts[2]} {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return forwardSpec{}, fmt.Errorf("forward %q: %q is not a port", s, p)
		}
	}
	if parts[1] == "" {
		return forwardSpec{}, fmt.Errorf("forward %q: no host", s)
	}
	return forwardSpec{network: network, listen: net.JoinHostPort(bind, parts[0]), target: net.JoinHostPort(parts[1], parts[2])}, nil
}

func forwardCmd() *cli.Command {
	return &cli.Command{
		Name:      "forward",
		Usage:     "forward local ports to hosts behind the agent, like ssh -L (no root)",
		UsageText: "nlvpn forward -n NAME -L [BIND:]PORT:HOST:HOSTPORT [-L ...] [-U [BIND:]PORT:HOST:HOSTPORT ...]",
		Description: `-L forwards TCP, -U forwards UDP. BIND defaults to 127.0.0.1. HOST is resolved by the agent.
Example: nlvpn forward -n miranda -L 8080:intranet.lan:80`,
		Flags: append(clientFlags(),
			&cli.StringSliceFlag{Name: "L", Usage: "TCP forward `[BIND:]PORT:HOST:HOSTPORT` (repeatable)"},
			&cli.StringSliceFlag{Name: "U", Usage: "UDP forward `[BIND:]PORT:HOST:HOSTPORT` (repeatable)"},
		),
		Action: func(c *cli.Context) error {
			limitClientMemory()
			var specs []forwardSpec
			for _, s := range c.StringSlice("L") {
				f, err := parseForward("tcp", s)
				if err != nil {
					return err
				}
				specs = append(specs, f)
			}
			for _, s := range c.StringSlice("U") {
				f, err := parseForward("udp", s)
				if err != nil {
					return err
				}
				specs = append(specs, f)
			}
			if len(specs) == 0 {
				return errors.New("nothing to forward: give -L or -U")
			}
			// Bind before the tunnel is up so a taken port fails at once.
			var closers []io.Closer
			defer func() {
				for _, cl := range closers {
					cl.Close()
				}
			}()
			type bound struct {
				spec forwardSpec
				ln   net.Listener
				pc   net.PacketConn
			}
			var bs []bound
			for _, f := range specs {
				if f.network == "tcp" {
					ln, err := net.Listen("tcp", f.listen)
					if err != nil {
						return fmt.Errorf("-L %s: %w", f.listen, err)
					}
					closers = append(closers, ln)
					bs = append(bs, bound{spec: f, ln: ln})
				} else {
					pc, err := net.ListenPacket("udp", f.listen)
					if err != nil {
						return fmt.Errorf("-U %s: %w", f.listen, err)
					}
					closers = append(closers, pc)
					bs = append(bs, bound{spec: f, pc: pc})
				}
			}
			return runNetstackClient(c, func(ctx context.Context, px *netstack.Proxy) error {
				for _, b := range bs {
					slog.Info("forwarding", "proto", b.spec.network, "listen", b.spec.listen, "target", b.spec.target)
					if b.ln != nil {
						go forwardTCP(ctx, px, b.ln, b.spec.target)
					} else {
						go forwardUDP(ctx, px, b.pc, b.spec.target)
					}
				}
				<-ctx.Done()
				return nil
			})
		},
	}
}

func forwardTCP(ctx context.Context, px *netstack.Proxy, ln net.Listener, target string) {
	for {
		lc, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer lc.Close()
			dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			rc, err := px.DialContext(dctx, "tcp", target)
			cancel()
			if err != nil {
				slog.Warn("forward", "target", target, "err", dialError(target, err))
				return
			}
			defer rc.Close()
			splice(ctx, rc, lc, lc)
		}()
	}
}

// udpIdle closes a UDP forward flow after this long without traffic.
const udpIdle = 60 * time.Second

// forwardUDP gives each local source address its own flow to target.
func forwardUDP(ctx context.Context, px *netstack.Proxy, pc net.PacketConn, target string) {
	var mu sync.Mutex
	flows := map[string]net.Conn{}
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		mu.Lock()
		rc := flows[from.String()]
		mu.Unlock()
		if rc == nil {
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			rc, err = px.DialContext(dctx, "udp", target)
			cancel()
			if err != nil {
				slog.Warn("forward", "target", target, "err", err)
				continue
			}
			mu.Lock()
			flows[from.String()] = rc
			mu.Unlock()
			go func(from net.Addr, rc net.Conn) {
				defer func() {
					mu.Lock()
					delete(flows, from.String())
					mu.Unlock()
					rc.Close()
				}()
				b := make([]byte, 65535)
				for {
					rc.SetReadDeadline(time.Now().Add(udpIdle))
					n, err := rc.Read(b)
					if err != nil {
						return
					}
					pc.WriteTo(b[:n], from)
				}
			}(from, rc)
		}
		rc.Write(buf[:n])
	}
}
