// Command nlvpn is the one binary for every role: gateway, agent and client.
// It only wires: flags, config and environment in; the roles do the work.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/agent"
	"github.com/nlvpn/nlvpn/client"
	"github.com/nlvpn/nlvpn/config"
	"github.com/nlvpn/nlvpn/connectproxy"
	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/gateway"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/metrics"
	"github.com/nlvpn/nlvpn/netstack"
	"github.com/nlvpn/nlvpn/platform"
	"github.com/nlvpn/nlvpn/policy"
	"github.com/nlvpn/nlvpn/status"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// version is the release's name when the build sets it
// (-ldflags "-X main.version=v1.2.3"); buildVersion prefers the module's.
var version = "dev"

func main() {
	// The peer sessions run over a virtual packet conn that has no socket
	// buffers to tune; quic-go would warn about that once per process.
	os.Setenv("QUIC_GO_DISABLE_RECEIVE_BUFFER_WARNING", "true")
	app := newApp()
	stopProfile := startProfile()
	err := app.Run(os.Args)
	stopProfile()
	if err != nil {
		fmt.Fprintf(os.Stderr, "nlvpn: %s\n", oneLine(err))
		os.Exit(1)
	}
}

// newApp is the CLI: every command and flag, as --help, the completion
// scripts and the man page show them.
func newApp() *cli.App {
	app := &cli.App{
		Name:    "nlvpn",
		Usage:   "reach the whole subnet behind a headless agent, from anywhere, with no port opened",
		Version: buildVersion(),
		Description: `nlvpn has three roles in one binary:

   gateway  the public rendezvous and relay (UDP/QUIC); it never sees your traffic in clear
   agent    runs inside the remote network and gives clients access to its subnets
   up       (the client) routes the agent's subnets on this machine through a TUN device,
            or without root serves local SOCKS5/HTTP proxies into them (also: connect, forward)

A first setup on three machines:

   gateway$ nlvpn gateway --listen :4433 --public-addr gw.example.com:4433 --state-dir /var/lib/nlvpn-gw
   gateway$ nlvpn token --state-dir /var/lib/nlvpn-gw --agent miranda -o miranda.token
   gateway$ nlvpn token --state-dir /var/lib/nlvpn-gw --client alice --allow-agent miranda -o alice.token
   (copy each file to its machine, e.g. with scp; it is a secret)
   office $ nlvpn agent --token-file miranda.token --advertise 192.168.1.0/24
   laptop $ sudo nlvpn up --token-file alice.token --agent miranda`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error", EnvVars: []string{"NLVPN_LOG_LEVEL"}},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json"},
		},
		Before: setupLogging,
		Commands: []*cli.Command{
			gatewayCmd(), authorityCmd(), tokenCmd(), agentCmd(), upCmd(), connectCmd(), forwardCmd(), statusCmd(), agentsCmd(), versionCmd(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints the error once
	}
	addDocCommands(app)
	return app
}

func oneLine(err error) string {
	return strings.ReplaceAll(err.Error(), "\n", "; ")
}

// logLevel is the level every handler checks, so a command can change it.
var logLevel slog.LevelVar

func setupLoggingLevel(l slog.Level) { logLevel.Set(l) }

func setupLogging(c *cli.Context) error {
	var lvl slog.Level
	if c.String("log-level") == "" {
		lvl = slog.LevelInfo // an empty NLVPN_LOG_LEVEL means unset
	} else if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	logLevel.Set(lvl)
	opts := &slog.HandlerOptions{Level: &logLevel}
	var h slog.Handler
	switch c.String("log-format") {
	case "text":
		h = slog.NewTextHandler(os.Stderr, opts)
	case "json":
		h = slog.NewJSONHandler(os.Stderr, opts)
	default:
		return fmt.Errorf("--log-format must be text or json, not %q", c.String("log-format"))
	}
	slog.SetDefault(slog.New(h))
	return nil
}

// signalContext ends on Ctrl-C, SIGTERM or SIGHUP (ssh sends it to a
// ProxyCommand when the session ends), so every role cleans up.
func signalContext(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
}

// signalContextKeepHUP is signalContext for a process that reloads its
// configuration on SIGHUP instead of ending.
func signalContextKeepHUP(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

func defaultStateDir(name string) string {
	if os.Geteuid() == 0 {
		return "/var/lib/" + name
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, name)
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", name)
	}
	return name
}

func stateDirFlag(name string) *cli.StringFlag {
	return &cli.StringFlag{Name: "state-dir", Value: defaultStateDir(name), Usage: "directory for keys and state (created 0700)", EnvVars: []string{"NLVPN_STATE_DIR"}}
}

func gatewayCmd() *cli.Command {
	return &cli.Command{
		Name:  "gateway",
		Usage: "run the public gateway: authentication, agent directory, rendezvous and relay",
		Description: `Serves QUIC on a UDP port. On first start it creates its key in --state-dir; its
self-signed certificate is made from that key at every start (so the fingerprint never
changes) and the fingerprint is printed; tokens carry it, so nodes need nothing else to
trust the gateway. --cert/--key use a real
certificate instead, and --acme-domain gets one from Let's Encrypt (or another ACME CA)
and renews it: its tokens carry no pin, nodes check the certificate's chain and name.
The gateway relays only end-to-end encrypted packets.`,
		Flags: append([]cli.Flag{
			&cli.StringFlag{Name: "listen", Value: ":4433", Usage: "UDP address to listen on; a wildcard host (:4433, [::]:4433, 0.0.0.0:4433) takes IPv4 and IPv6 alike"},
			&cli.StringFlag{Name: "listen-tcp", Usage: "TCP `ADDR` where nodes whose UDP is blocked reach the gateway (QUIC inside TLS); default: --listen's host and port number; off: none"},
			stateDirFlag("nlvpn-gw"),
			&cli.StringFlag{Name: "public-addr", Usage: "HOST:PORT nodes use to reach this gateway; put into tokens"},
			&cli.StringFlag{Name: "cert", Usage: "TLS certificate file (PEM) instead of the self-signed one"},
			&cli.StringFlag{Name: "key", Usage: "private key file (PEM) for --cert"},
			&cli.IntFlag{Name: "max-unauth-per-source", Value: gateway.DefaultMaxUnauthPerSource, Usage: "connections not yet registered from one address (IPv6: one /64); more are refused"},
			&cli.IntFlag{Name: "max-unauth", Value: gateway.DefaultMaxUnauth, Usage: "connections not yet registered, in total; above --retry-above of them new ones must prove their address first (QUIC Retry)"},
			&cli.IntFlag{Name: "retry-above", Value: gateway.DefaultRetryAbove, Usage: "demand a QUIC Retry once this many connections are not yet registered (-1: always)"},
			&cli.StringFlag{Name: "authority", Usage: "admit nodes whose credentials the authority with public key `KEY` signed (from `nlvpn authority` on an admin machine); without it the gateway keeps an authority key in its state directory", EnvVars: []string{"NLVPN_AUTHORITY"}},
		}, append(append(acmeFlags(), clusterFlags()...), metricsFlags(", /healthz (200 while the gateway's QUIC listener accepts connections, 503 otherwise) and /relay (JSON: relayed bytes per session)")...)...),
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return fmt.Errorf("unexpected argument %q", c.Args().First())
			}
			if (c.String("cert") == "") != (c.String("key") == "") {
				return errors.New("--cert and --key go together")
			}
			if err := checkMetrics(c); err != nil {
				return err
			}
			if pa := c.String("public-addr"); pa != "" {
				if _, _, err := net.SplitHostPort(pa); err != nil {
					return fmt.Errorf("--public-addr %q: want HOST:PORT", pa)
				}
			}
			st, err := gateway.OpenState(c.String("state-dir"))
			if err != nil {
				return err
			}
			tuneGatewayGC()
			cfg := gateway.Config{State: st, Listen: c.String("listen"), ListenTCP: c.String("listen-tcp"), PublicAddr: c.String("public-addr"), Log: slog.Default(),
				MaxUnauthPerSource: c.Int("max-unauth-per-source"), MaxUnauth: c.Int("max-unauth"), RetryAbove: c.Int("retry-above")}
			if a := c.String("authority"); a != "" {
				if cfg.Authority, err = identity.ParsePublicKey(a); err != nil {
					return fmt.Errorf("--authority: %w", err)
				}
				if _, err := os.Stat(filepath.Join(st.Dir, gateway.AuthorityFile)); err == nil {
					slog.Warn("an authority key lies in the gateway's state directory but --authority names the one to trust; delete the file if the authority is kept elsewhere", "file", filepath.Join(st.Dir, gateway.AuthorityFile))
				}
			} else {
				// Quick start: the authority beside the gateway.
				ak, err := gateway.LoadAuthority(st.Dir)
				if err != nil {
					return err
				}
				cfg.Authority = ak.Public()
			}
			if c.String("cert") != "" {
				cert, err := loadCert(c.String("cert"), c.String("key"))
				if err != nil {
					return err
				}
				cfg.Cert = &cert
			}
			if cfg.ACME, err = acmeConfig(c); err != nil {
				return err
			}
			if cfg.Cluster, err = clusterConfig(c); err != nil {
				return err
			}
			g, err := gateway.New(cfg)
			if err != nil {
				return err
			}
			info := gateway.Info{Pin: g.Pin(), PublicAddr: cfg.PublicAddr}
			if cfg.ACME != nil {
				info.ACMEDomain = cfg.ACME.Domain
			}
			if err := st.WriteInfo(info); err != nil {
				return err
			}
			if cfg.ACME != nil {
				fmt.Fprintf(os.Stderr, "gateway certificate: from the ACME CA for %s (tokens carry no pin)\nauthority: %s\n", cfg.ACME.Domain, cfg.Authority)
			} else {
				fmt.Fprintf(os.Stderr, "gateway certificate fingerprint: %s\nauthority: %s\n", g.Pin(), cfg.Authority)
			}
			ctx, cancel := signalContext(c)
			defer cancel()
			reg, stopMetrics, err := startMetrics(c, metrics.Options{Health: g.Healthy, Handlers: map[string]http.Handler{"/relay": g.RelayHandler()}})
			if err != nil {
				return err
			}
			defer stopMetrics()
			if reg != nil {
				reg.MustRegister(g)
			}
			return g.Run(ctx)
		},
	}
}

func authorityCmd() *cli.Command {
	return &cli.Command{
		Name:      "authority",
		Usage:     "make (or show) an authority key, to keep credentials apart from the gateway",
		UsageText: "nlvpn authority --state-dir DIR",
		Description: `Creates the authority key in DIR (0600) if there is none and prints its public key.
Run it on an admin machine, start the gateway with --authority KEY, and issue tokens
there with "nlvpn token --state-dir DIR --gateway HOST:PORT --pin PIN". The gateway
then holds only the public key: broken into, it cannot admit anyone to an agent or
pass itself off as one. Without this, "nlvpn gateway" keeps an authority key in its
own state directory (the quick start).`,
		Flags: []cli.Flag{stateDirFlag("nlvpn-authority")},
		Action: func(c *cli.Context) error {
			if c.Args().Present() {
				return fmt.Errorf("unexpected argument %q", c.Args().First())
			}
			k, err := gateway.LoadAuthority(c.String("state-dir"))
			if err != nil {
				return err
			}
			fmt.Println(k.Public())
			return nil
		},
	}
}

func tokenCmd() *cli.Command {
	return &cli.Command{
		Subcommands: []*cli.Command{revokeCmd()},
		Name:        "token",
		Usage:       "issue a token for an agent or a client (into a 0600 file with --out, else alone on stdout)",
		UsageText:   "nlvpn token --state-dir DIR (--agent NAME | --client NAME --allow-agent AGENT ...) [--out FILE] [--gateway HOST:PORT] [--pin PIN] [--ttl 720h] [--allow-agent NAME ...]",
		Description: `Signs a token with the authority key in --state-dir: the gateway's state directory
for a quick start, or the directory of "nlvpn authority" on an admin machine (then
pass --gateway and --pin, which the gateway prints at its start).
The token carries the role, the name, the expiry, the gateway address and its
certificate pin, and a one-time enrollment key: the machine that first uses it binds
it to its own key, and the gateway and its peers check that binding. Keep tokens
secret: hand them over as files (--out writes one readable only by you; nodes read
it with --token-file).`,
		Flags: []cli.Flag{
			stateDirFlag("nlvpn-gw"),
			&cli.StringFlag{Name: "agent", Usage: "issue an agent token for `NAME`"},
			&cli.StringFlag{Name: "client", Usage: "issue a client token for `NAME`"},
			&cli.StringSliceFlag{Name: "gateway", Usage: "gateway HOST:PORT to put in the token (default: the gateway's --public-addr); repeatable for the gateways of a cluster (they share the gateway key, so the one pin verifies each)"},
			&cli.StringFlag{Name: "pin", Usage: "the gateway's certificate fingerprint to put in the token (default: from the gateway's state in --state-dir)"},
			&cli.DurationFlag{Name: "ttl", Value: 720 * time.Hour, Usage: "how long the token is valid"},
			&cli.StringSliceFlag{Name: "allow-agent", Usage: "client tokens (required): an agent it may use (repeatable; '*' for every agent)"},
			&cli.StringSliceFlag{Name: "group", Usage: "client tokens: a group the client is in, for agents' --policy rules (repeatable)"},
			&cli.IntFlag{Name: "uses", Value: 1, Usage: "how many machines may use the token (each enrolls its own key; the gateway refuses the token on any other)"},
			&cli.StringFlag{Name: "out", Aliases: []string{"o"}, Usage: "write the token to `FILE` (created 0600; an existing file is not overwritten)"},
		},
		Action: func(c *cli.Context) error {
			agentName, clientName := c.String("agent"), c.String("client")
			if (agentName == "") == (clientName == "") {
				return errors.New("give exactly one of --agent NAME or --client NAME")
			}
			if c.Duration("ttl") <= 0 {
				return errors.New("--ttl must be positive")
			}
			if u := c.Int("uses"); u < 1 || u > maxTokenUses {
				return fmt.Errorf("--uses must be between 1 and %d", maxTokenUses)
			}
			dir := c.String("state-dir")
			if _, err := os.Stat(filepath.Join(dir, gateway.AuthorityFile)); err != nil {
				return fmt.Errorf("no authority key in %s: run `nlvpn gateway --state-dir %s` there first (quick start), point --state-dir at the gateway's state, or at the directory of `nlvpn authority`", dir, dir)
			}
			auth, err := gateway.LoadAuthority(dir)
			if err != nil {
				return err
			}
			info, ok, err := gateway.ReadInfoFile(dir)
			if err != nil {
				return err
			}
			if _, err := os.Stat(filepath.Join(dir, "gateway.key")); !ok && err == nil {
				// A gateway's state from before its first start.
				st, err := gateway.OpenState(dir)
				if err != nil {
					return err
				}
				if info, err = st.ReadInfo(); err != nil {
					return err
				}
			}
			if p := c.String("pin"); p != "" {
				info.Pin = p
			}
			if info.Pin == "" && info.ACMEDomain == "" {
				return fmt.Errorf("no gateway pin in %s: pass --pin (the gateway prints its certificate fingerprint at start)", dir)
			}
			gws := c.StringSlice("gateway")
			if len(gws) == 0 && info.PublicAddr != "" {
				gws = []string{info.PublicAddr}
			}
			if len(gws) == 0 {
				return errors.New("no gateway address: pass --gateway HOST:PORT (or start the gateway with --public-addr)")
			}
			if err := token.CheckGateways(gws); err != nil {
				return fmt.Errorf("--gateway: %w", err)
			}
			cl := token.Claims{Expires: time.Now().Add(c.Duration("ttl")).Unix(), Gateway: gws[0], Gateways: gws[1:], Pin: info.Pin}
			if u := c.Int("uses"); u > 1 {
				cl.Uses = u
			}
			if agentName != "" {
				cl.Role, cl.Name = token.RoleAgent, agentName
				if len(c.StringSlice("allow-agent")) > 0 {
					return errors.New("--allow-agent is for client tokens")
				}
				if len(c.StringSlice("group")) > 0 {
					return errors.New("--group is for client tokens")
				}
			} else {
				cl.Role, cl.Name = token.RoleClient, clientName
				cl.Agents = c.StringSlice("allow-agent")
				for _, g := range c.StringSlice("group") {
					if !token.ValidName(g) {
						return fmt.Errorf("--group %q: use lower-case letters, digits, '.', '_' and '-' (at most 63)", g)
					}
					cl.Groups = append(cl.Groups, g)
				}
			}
			if !token.ValidName(cl.Name) {
				return fmt.Errorf("name %q: use lower-case letters, digits, '.', '_' and '-' (at most 63)", cl.Name)
			}
			if cl.Role == token.RoleClient && len(cl.Agents) == 0 {
				// No silent "every agent": a client credential names what it
				// may use, and every agent checks that itself.
				return errors.New("say which agents the client may use: --allow-agent NAME (repeatable), or --allow-agent '*' for every agent")
			}
			t, err := token.Issue(auth, cl)
			if err != nil {
				return err
			}
			if out := c.String("out"); out != "" {
				if err := writeTokenFile(out, t); err != nil {
					return err
				}
			} else {
				fmt.Println(t)
			}
			// Its ID, for `nlvpn token revoke --id`, on stderr: stdout is
			// the token alone.
			issued, _ := token.Parse(t)
			fmt.Fprintf(os.Stderr, "nlvpn: token %s for %s %q, valid until %s (revoke: nlvpn token revoke --state-dir %s --id %s)\n",
				issued.ID, cl.Role, cl.Name, time.Unix(cl.Expires, 0).UTC().Format(time.RFC3339), dir, issued.ID)
			return nil
		},
	}
}

// maxTokenUses bounds --uses: a token for a fleet should be a fleet's
// worth, not unlimited (the gateway remembers every key that used it).
const maxTokenUses = 1000

// revokeCmd is `nlvpn token revoke`.
func revokeCmd() *cli.Command {
	return &cli.Command{
		Name:      "revoke",
		Usage:     "revoke a token, or every token of a client or agent issued until now",
		UsageText: "nlvpn token revoke --state-dir DIR (--client NAME | --agent NAME | --id ID)",
		Description: `Adds the revocation to the authority's revocation list in DIR (the file
"revocations"), signed with the authority key there: the gateway's state directory
when the authority lives beside the gateway, or the authority's directory on an
admin machine (then copy DIR/revocations into the gateway's state directory). A
running gateway reads the list within a second: it disconnects the nodes that use a
revoked token and refuses it from then on, saying it was revoked; and it passes the
signed list to the agents, which check the signature and end those clients'
sessions themselves (on the direct path too). Neither the gateway nor anyone else
can forge or alter the list, nor bring back an older one at an agent that has seen a
newer one. Revoking a name covers its tokens issued until now; a token issued for
it afterwards works.`,
		Flags: []cli.Flag{
			stateDirFlag("nlvpn-gw"),
			&cli.StringFlag{Name: "client", Usage: "revoke every token of client `NAME` issued until now"},
			&cli.StringFlag{Name: "agent", Usage: "revoke every token of agent `NAME` issued until now"},
			&cli.StringFlag{Name: "id", Usage: "revoke the token with this `ID` (printed when it was issued)"},
		},
		Action: func(c *cli.Context) error {
			r := gateway.Revocation{At: time.Now().Unix()}
			n := 0
			for _, f := range []struct{ flag, role string }{{"client", token.RoleClient}, {"agent", token.RoleAgent}} {
				if v := c.String(f.flag); v != "" {
					if !token.ValidName(v) {
						return fmt.Errorf("--%s %q is not a valid name", f.flag, v)
					}
					r.Role, r.Name = f.role, v
					n++
				}
			}
			if id := c.String("id"); id != "" {
				if len(id) > 64 || strings.ContainsAny(id, " \t\n\"") {
					return fmt.Errorf("--id %q is not a token ID", id)
				}
				r.ID = id
				n++
			}
			if n != 1 {
				return errors.New("give exactly one of --client NAME, --agent NAME or --id ID")
			}
			dir := c.String("state-dir")
			if _, err := os.Stat(filepath.Join(dir, gateway.AuthorityFile)); err != nil {
				return fmt.Errorf("no authority key in %s: revocations are signed by the authority; point --state-dir at the directory that holds %s (the gateway's state, or the authority's directory on an admin machine)", dir, gateway.AuthorityFile)
			}
			auth, err := gateway.LoadAuthority(dir)
			if err != nil {
				return err
			}
			if err := gateway.AddRevocation(dir, auth, r); err != nil {
				return err
			}
			if _, ok, _ := gateway.ReadInfoFile(dir); !ok {
				fmt.Fprintf(os.Stderr, "nlvpn: copy %s into the gateway's state directory; the gateway passes it to the agents\n", gateway.RevocationsPath(dir))
			}
			what := "token " + r.ID
			if r.ID == "" {
				what = fmt.Sprintf("every token of %s %q issued until %s", r.Role, r.Name, time.Unix(r.At, 0).UTC().Format(time.RFC3339))
			}
			fmt.Fprintf(os.Stderr, "nlvpn: revoked %s; a running gateway acts on it within a second\n", what)
			return nil
		},
	}
}

// nodeFlags are shared by agent and up.
func nodeFlags() []cli.Flag {
	return []cli.Flag{
		// No EnvVars on --token: NLVPN_TOKEN is read by readToken, so that
		// a token in argv can be told apart (and warned about).
		&cli.StringFlag{Name: "token", Usage: "token from \"nlvpn token\"; - reads it from standard input. Prefer --token-file or NLVPN_TOKEN: on the command line every local user can read it (default: NLVPN_TOKEN, else token = in the config file)"},
		&cli.StringFlag{Name: "token-file", Usage: "read the token from `FILE` (keep it 0600)"},
		&cli.StringSliceFlag{Name: "gateway", Usage: "gateway HOST:PORT, overriding the token's (or NLVPN_GATEWAY, or gateway = in the config file); repeatable (or comma-separated) for the gateways of a cluster: the node uses the nearest that answers and moves to another when it goes away", EnvVars: []string{"NLVPN_GATEWAY"}},
		stateDirFlag("nlvpn"),
		&cli.StringFlag{Name: "config", Usage: "config file (default: STATE-DIR/config)", EnvVars: []string{"NLVPN_CONFIG"}},
		&cli.StringFlag{Name: "transport", Value: control.OverAuto, Usage: "how to reach the gateway: auto (UDP; TCP/TLS to the same port number too if UDP gets no answer within 2.5 s), udp, or tcp", EnvVars: []string{"NLVPN_TRANSPORT"}},
		&cli.StringFlag{Name: "proxy", Usage: "reach the gateway over TCP through the HTTP proxy at `URL` (http://[user:pass@]host:port, CONNECT); default: HTTPS_PROXY/https_proxy, honouring NO_PROXY; none: no proxy"},
		&cli.IntFlag{Name: "mtu", Usage: "the path MTU `N` to the gateway and peers (the smallest link on the way: 1492 PPPoE, 1280 a tunnel), for paths that drop big packets without saying so: this node's UDP packets are then at most min(N, 1480) - 28 bytes, and its sessions' tunnel MTU at most min(N, 1480) - 112 (lower if the other end's path is smaller). At least 1280 (default: 1500, lowered by itself when the path says so)"},
	}
}

// udpSizeFlag is the UDP size --mtu fixes, or 0 without it.
func udpSizeFlag(c *cli.Context) (int, error) {
	if !c.IsSet("mtu") {
		return 0, nil
	}
	n, err := wire.UDPSize(c.Int("mtu"), false) // the underlay is IPv4
	if err != nil {
		return 0, fmt.Errorf("--mtu: %w", err)
	}
	return n, nil
}

// nodeSetup resolves token and gateway (flag > environment > config file),
// loads or makes the node key, and returns what a role needs.
type nodeSetup struct {
	stateDir   string
	configPath string
	token      string
	claims     *token.Claims
	gateway    string
	gateways   []string // further gateways of the network (a cluster)
	key        *identity.Key
	over       string   // --transport
	proxy      *url.URL // --proxy or the environment's; nil: none
	tokenFrom  tokenSource
	tokenKey   string // where the config file keeps this role's token
}

// configTokenKey is the config file key of a role's token.
func configTokenKey(role string) string {
	if role == token.RoleAgent {
		return "agent_token"
	}
	return "token"
}

func setupNode(c *cli.Context, role string) (*nodeSetup, error) {
	ns := &nodeSetup{stateDir: c.String("state-dir")}
	ns.configPath = c.String("config")
	if ns.configPath == "" {
		ns.configPath = filepath.Join(ns.stateDir, "config")
	}
	file, err := config.Load(ns.configPath)
	if err != nil {
		return nil, err
	}
	// connect relays a connection over its standard input.
	ns.tokenKey = configTokenKey(role)
	ns.token, ns.tokenFrom, err = readToken(c, os.Stdin, c.Command.Name == "connect", file, ns.tokenKey, "token")
	if err != nil {
		return nil, err
	}
	if ns.token == "" {
		return nil, errors.New("no token: pass --token-file FILE or --token - (standard input), set NLVPN_TOKEN, or put token = ... in " + ns.configPath)
	}
	ns.key, err = identity.LoadOrCreate(filepath.Join(ns.stateDir, "node.key"))
	if err != nil {
		return nil, err
	}
	// A token enrolls this machine: its claims are bound to the node key
	// here, and the resulting credential (no secret in it but the key's
	// file) is what the node presents and remembers.
	if token.IsCredential(ns.token) {
		cr, err := token.ParseCredential(ns.token)
		if err != nil {
			return nil, fmt.Errorf("the credential from %s is not usable: %w", ns.tokenFrom, err)
		}
		if !cr.Node.Equal(ns.key.Public()) {
			return nil, fmt.Errorf("the credential from %s is bound to another machine's key (not %s's); use a token from `nlvpn token` here", ns.tokenFrom, filepath.Join(ns.stateDir, "node.key"))
		}
		ns.claims = cr.Claims
	} else {
		t, err := token.ParseToken(ns.token)
		if err != nil {
			return nil, fmt.Errorf("the token from %s is not usable: %w", ns.tokenFrom, err)
		}
		ns.claims, ns.token = t.Claims, t.Enroll(ns.key.Public())
	}
	if ns.claims.Role != role {
		return nil, fmt.Errorf("this is a token for %s %q; `nlvpn %s` needs %s token", ns.claims.Role, ns.claims.Name, map[string]string{token.RoleAgent: "agent", token.RoleClient: "up"}[role], map[string]string{token.RoleAgent: "an agent", token.RoleClient: "a client"}[role])
	}
	if exp := time.Unix(ns.claims.Expires, 0); time.Now().After(exp) {
		return nil, fmt.Errorf("the token for %q expired at %s; ask for a new one (nlvpn token)", ns.claims.Name, exp.UTC().Format(time.RFC3339))
	}
	// Empty items are dropped: NLVPN_GATEWAY= (set but empty) means none.
	var gws []string
	for _, g := range c.StringSlice("gateway") {
		gws = append(gws, splitList(g)...)
	}
	if len(gws) == 0 {
		gws = splitList(file["gateway"])
	}
	if len(gws) == 0 && ns.claims.Gateway != "" {
		gws = append([]string{ns.claims.Gateway}, ns.claims.Gateways...)
	}
	if len(gws) == 0 {
		return nil, errors.New("no gateway address: the token has none; pass --gateway HOST:PORT")
	}
	if err := token.CheckGateways(gws); err != nil {
		return nil, err
	}
	ns.gateway, ns.gateways = gws[0], gws[1:]
	switch ns.over = c.String("transport"); ns.over {
	case control.OverAuto, control.OverUDP, control.OverTCP:
	default:
		return nil, fmt.Errorf("--transport %q: want auto, udp or tcp", ns.over)
	}
	switch p := c.String("proxy"); p {
	case "none":
	case "":
		if ns.proxy, err = connectproxy.FromEnvironment(ns.gateway); err != nil {
			return nil, fmt.Errorf("HTTPS_PROXY: %w", err)
		}
	default:
		if ns.proxy, err = connectproxy.Parse(p); err != nil {
			return nil, fmt.Errorf("--proxy: %w", err)
		}
	}
	if ns.proxy != nil && ns.over == control.OverUDP {
		return nil, errors.New("--proxy (or HTTPS_PROXY) goes with --transport auto or tcp: a proxy carries TCP only")
	}
	return ns, nil
}

// remember saves token and gateway to the config file after they worked,
// so the next run needs neither.
// splitList splits a comma-separated list, dropping empty items.
func splitList(s string) []string {
	var l []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			l = append(l, f)
		}
	}
	return l
}

func (ns *nodeSetup) remember(gatewayFlag bool) {
	file, err := config.Load(ns.configPath)
	if err != nil {
		return
	}
	changed := file[ns.tokenKey] != ns.token
	file[ns.tokenKey] = ns.token
	if gw := strings.Join(append([]string{ns.gateway}, ns.gateways...), ","); gatewayFlag && file["gateway"] != gw {
		file["gateway"], changed = gw, true
	}
	if !changed {
		return
	}
	if err := file.Save(ns.configPath); err != nil {
		slog.Warn("could not save the token to the config file", "path", ns.configPath, "err", err)
		return
	}
	slog.Info("saved token and gateway for the next run", "config", ns.configPath)
}

func agentCmd() *cli.Command {
	return &cli.Command{
		Name:  "agent",
		Usage: "run the headless agent that gives clients access to this network",
		Description: `Registers with the gateway under the name in its token and serves the advertised
subnets to the clients the gateway introduces, after checking each client's credential
against the authority that signed its own token. Each client's TCP, UDP and ping become
real connections from this host's own sockets (a userspace netstack): no root and no
route back from the LAN are needed. Traffic to anything not advertised is refused, and
so are this host's own addresses and link-local ones (cloud metadata) unless a --policy
rule names them. --policy FILE decides per client (rules: allow|deny WHO DEST [PORTS]
[PROTO], first match wins, default deny; see the README); SIGHUP reloads it.
DNS queries to its overlay address (UDP and TCP port 53), of any type, are forwarded to
the LAN's resolvers (--dns-server, or this host's /etc/resolv.conf) and cached.
With --routed (needs CAP_NET_ADMIN) the clients' packets for the advertised subnets go
into a TUN device instead and this host's kernel forwards them, masqueraded to its own
LAN address, as a WireGuard subnet router does: faster, and the LAN host's own TCP
recovers from loss. IP forwarding is on while the agent runs; LAN hosts still cannot
start connections toward clients, and the policy is the same.
It reconnects to the gateway by itself.`,
		Flags: append(append(nodeFlags(),
			&cli.StringSliceFlag{Name: "advertise", Usage: "`CIDR` clients may reach (repeatable), e.g. 192.168.1.0/24"},
			&cli.StringSliceFlag{Name: "dns-domain", Usage: "a `DOMAIN` of this LAN (repeatable, e.g. office.lan): TUN clients send lookups of names under it to this agent's DNS, which forwards them to the LAN's resolvers (--dns-server); other names are untouched"},
			&cli.BoolFlag{Name: "allow-loopback", Usage: "let clients reach this host's own loopback services (as 127.0.0.1 or as the agent's overlay address); refused and logged otherwise"},
			&cli.BoolFlag{Name: "routed", Usage: "forward the clients' packets with this host's kernel (TUN device, IP forwarding, masquerade) instead of the userspace netstack; needs CAP_NET_ADMIN"},
			&cli.StringFlag{Name: "tun", Value: agent.DefaultTunName, Usage: "TUN device name with --routed"},
			&cli.BoolFlag{Name: "exit-node", Usage: "allow --advertise 0.0.0.0/0 or ::/0: clients that accept it may send all their traffic out through this host"},
			&cli.IntFlag{Name: "max-tcp-per-client", Value: netstack.DefaultEgressLimits.TCPPerClient, Usage: "TCP connections one client may have open through this agent; beyond, new ones are refused (RST); with --routed this and --max-udp-per-client together bound all of a client's connections"},
			&cli.IntFlag{Name: "max-udp-per-client", Value: netstack.DefaultEgressLimits.UDPPerClient, Usage: "UDP flows (address/port pairs) one client may have open; beyond, new ones are dropped"},
			&cli.IntFlag{Name: "max-tcp", Value: netstack.DefaultEgressLimits.TCPTotal, Usage: "TCP connections of all clients together"},
			&cli.IntFlag{Name: "max-udp", Value: netstack.DefaultEgressLimits.UDPTotal, Usage: "UDP flows of all clients together"},
			&cli.StringFlag{Name: "policy", Usage: "per-client access rules from `FILE` (first match wins, default deny; reloaded on SIGHUP); without it every client reaches everything advertised"},
			&cli.StringSliceFlag{Name: "dns-server", Usage: "LAN resolver (`IP` or IP:PORT, repeatable, tried in order) that clients' DNS queries to the agent's overlay address are forwarded to; default: the nameservers in /etc/resolv.conf (a loopback one such as systemd-resolved's 127.0.0.53 works: the agent sends from this host)"},
		), metricsFlags("")...),
		Action: func(c *cli.Context) error {
			adv, err := parseAdvertise(c.StringSlice("advertise"), c.Bool("exit-node"), c.Bool("allow-loopback"))
			if err != nil {
				return err
			}
			domains, err := parseDomains(c.StringSlice("dns-domain"))
			if err != nil {
				return err
			}
			dnsServers, err := parseDNSServers(c.StringSlice("dns-server"))
			if err != nil {
				return err
			}
			if err := checkMetrics(c); err != nil {
				return err
			}
			ns, err := setupNode(c, token.RoleAgent)
			if err != nil {
				return err
			}
			udpSize, err := udpSizeFlag(c)
			if err != nil {
				return err
			}
			var pol *policy.Current
			if path := c.String("policy"); path != "" {
				p, err := policy.Load(path)
				if err != nil {
					return fmt.Errorf("--policy: %w", err)
				}
				pol = &policy.Current{}
				pol.Store(p)
				stop := reloadOnHUP(path, pol)
				defer stop()
				slog.Info("policy in force", "file", path, "rules", len(p.Rules))
			}
			// SIGHUP reloads the policy; without one it ends the agent.
			sigctx := signalContext
			if pol != nil {
				sigctx = signalContextKeepHUP
			}
			ctx, cancel := sigctx(c)
			defer cancel()
			reg, stopMetrics, err := startMetrics(c, metrics.Options{})
			if err != nil {
				return err
			}
			defer stopMetrics()
			return agent.Run(ctx, agent.Config{
				Policy:  pol,
				Metrics: reg,
				Gateway: ns.gateway, Gateways: ns.gateways, Pin: ns.claims.Pin, Token: ns.token, Key: ns.key, Advertise: adv, Over: ns.over, Proxy: ns.proxy,
				AllowLoopback: c.Bool("allow-loopback"),
				DNSDomains:    domains,
				DNSServers:    dnsServers,
				UDPSize:       udpSize,
				Routed:        c.Bool("routed"),
				TunName:       c.String("tun"),
				Limits: netstack.EgressLimits{TCPPerClient: c.Int("max-tcp-per-client"), UDPPerClient: c.Int("max-udp-per-client"),
					TCPTotal: c.Int("max-tcp"), UDPTotal: c.Int("max-udp")},
				StatusSocket: filepath.Join(ns.stateDir, "status.sock"),
				OnUp:         func() { ns.remember(c.IsSet("gateway")) },
				Log:          slog.Default().With("agent", ns.claims.Name),
			})
		},
	}
}

func upCmd() *cli.Command {
	return &cli.Command{
		Name:  "up",
		Usage: "connect this machine to an agent's network: a TUN device as root, local SOCKS5/HTTP proxies without",
		Description: `Asks the gateway for a session with the agent, checks the agent's key (pinned on first
use in STATE-DIR/known_agents; a changed key is an error), creates a TUN device and
routes the agent's overlay address and advertised subnets into it. Every program on
the machine then reaches those subnets. Ctrl-C or SIGTERM removes the routes and the
device. Without CAP_NET_ADMIN (or with --netstack) it runs the same tunnel on a userspace
netstack instead and serves a SOCKS5 and an HTTP proxy on loopback; names given to the
proxies are resolved by the agent. After a first successful run the token is saved to
the config file, so later runs need only --agent. The tunnel starts on the gateway's
relay and moves to a direct (hole-punched) path as soon as one is confirmed; see
--direct and --relay. nlvpn status shows which is in use.`,
		Flags: append(append(append(nodeFlags(),
			&cli.StringFlag{Name: "agent", Aliases: []string{"n"}, Usage: "`NAME` of the agent to connect to", Required: true},
			&cli.StringFlag{Name: "tun", Value: "nlvpn0", Usage: "TUN device name"},
			&cli.BoolFlag{Name: "netstack", Usage: "no TUN device: run a userspace netstack behind local SOCKS5 and HTTP proxies (chosen by itself without CAP_NET_ADMIN)"},
			&cli.DurationFlag{Name: "connect-timeout", Value: 20 * time.Second, Usage: "give up if the gateway cannot be reached at start within this"},
			&cli.DurationFlag{Name: "wait", Aliases: []string{"wait-agent"}, Usage: "at start, wait this long for an agent that is not online yet, asking every few seconds (0: until stopped; -1s: do not wait)"},
			&cli.StringSliceFlag{Name: "accept-routes", Usage: "also route advertised subnets inside `PREFIX` that are refused by default (broader than /8, containing the gateway, overlapping this machine's own networks); repeatable"},
			&cli.BoolFlag{Name: "exit-node", Usage: "accept a default route from the agent: all of this machine's traffic goes through it"},
			&cli.StringSliceFlag{Name: "dns-domain", Usage: "TUN mode: also resolve names under `DOMAIN` through the agent's DNS (repeatable), besides the domains the agent names; set per link in systemd-resolved, other names untouched"},
			&cli.BoolFlag{Name: "accept-inbound", Usage: "TUN mode: let connections from the agent's side reach this machine (default: only replies to connections it opens come in)"},
		), modeFlagList()...), append(proxyFlagList(), metricsFlags("")...)...),
		Action: func(c *cli.Context) error {
			limitClientMemory()
			accept, err := parsePrefixes("--accept-routes", c.StringSlice("accept-routes"))
			if err != nil {
				return err
			}
			routes := client.RoutePolicy{Accept: accept, ExitNode: c.Bool("exit-node")}
			domains, err := parseDomains(c.StringSlice("dns-domain"))
			if err != nil {
				return err
			}
			if !token.ValidName(c.String("agent")) {
				return fmt.Errorf("--agent %q is not a valid agent name", c.String("agent"))
			}
			if err := checkMetrics(c); err != nil {
				return err
			}
			ns, err := setupNode(c, token.RoleClient)
			if err != nil {
				return err
			}
			if !ns.claims.MayUse(c.String("agent")) {
				return fmt.Errorf("the token of client %q does not allow agent %q (it allows %s)", ns.claims.Name, c.String("agent"), strings.Join(ns.claims.Agents, ", "))
			}
			mode, err := modeFlags(c)
			if err != nil {
				return err
			}
			udpSize, err := udpSizeFlag(c)
			if err != nil {
				return err
			}
			var nsCfg *client.NetstackConfig
			if ok, why := platform.CanCreateTUN(); c.Bool("netstack") || !ok {
				if nsCfg, err = proxyConfig(c); err != nil {
					return err
				}
				reason := "--netstack given"
				if !c.Bool("netstack") {
					reason = why
				}
				fmt.Fprintf(os.Stderr, "nlvpn: netstack mode (%s): SOCKS5 proxy on %s, HTTP proxy on %s; e.g. curl --socks5-hostname %s http://host.on.the.lan/\n",
					reason, orNone(nsCfg.SOCKS5), orNone(nsCfg.HTTP), nsCfg.SOCKS5)
			} else {
				fmt.Fprintf(os.Stderr, "nlvpn: TUN mode (device %s): every program on this machine reaches the agent's subnets\n", c.String("tun"))
			}
			ctx, cancel := signalContext(c)
			defer cancel()
			reg, stopMetrics, err := startMetrics(c, metrics.Options{})
			if err != nil {
				return err
			}
			defer stopMetrics()
			return client.Run(ctx, client.Config{
				Netstack: nsCfg,
				Metrics:  reg,
				Mode:     mode, DirectTimeout: c.Duration("direct-timeout"),
				StatusSocket: filepath.Join(ns.stateDir, "status.sock"),
				Gateway:      ns.gateway, Gateways: ns.gateways, Pin: ns.claims.Pin, Token: ns.token, Key: ns.key, Agent: c.String("agent"), Over: ns.over, Proxy: ns.proxy,
				KnownAgents: filepath.Join(ns.stateDir, "known_agents"), TunName: c.String("tun"),
				ConnectTimeout: c.Duration("connect-timeout"),
				WaitAgent:      c.Duration("wait"),
				UDPSize:        udpSize,
				Routes:         routes,
				AcceptInbound:  c.Bool("accept-inbound"),
				DNSDomains:     domains,
				Log:            slog.Default(),
				OnUp:           func() { ns.remember(c.IsSet("gateway")) },
			})
		},
	}
}

func modeFlags(c *cli.Context) (string, error) {
	switch {
	case c.Bool("direct") && c.Bool("relay"):
		return "", errors.New("--direct and --relay exclude each other")
	case c.Bool("direct"):
		if c.Duration("direct-timeout") <= 0 {
			return "", errors.New("--direct-timeout must be positive")
		}
		return wire.ModeDirect, nil
	case c.Bool("relay"):
		return wire.ModeRelay, nil
	}
	return wire.ModeAuto, nil
}

// nonZero prints a counter map's non-zero entries, sorted by name.
func nonZero(m map[string]uint64) string {
	var parts []string
	for k, v := range m {
		if v > 0 {
			parts = append(parts, fmt.Sprintf("%s %d", k, v))
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func statusCmd() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the running tunnel's path (direct or relay), remote address, RTT and traffic; or a running agent's sessions",
		Description: `Asks the running ` + "`nlvpn up`" + ` or ` + "`nlvpn agent`" + ` (same --state-dir) over its local socket,
which only its user can open. For a client, --json prints one object with "path"
("direct" or "relay"), "remote", "rtt_ms", "tx_bytes", "rx_bytes", "since_switch_s" and
"transport" (how it reaches the gateway: "udp", "tcp" or "tcp via proxy HOST:PORT");
for an agent, "transport" too, "egress" ("netstack", or "routed via DEVICE" with --routed),
"sessions" (one per connected client), "drops" (packets lost inside
the agent, by where), "denied" (new flows its policy refused, by reason, and session
offers refused), "limited" (new flows, dials, echoes and DNS queries refused because a
client's or the agent's bound was hit), "probes" (hole-punch probes sent, refused and
rate-limited) and "dns" (what its DNS forwarder answered, from its cache or not, and
dropped); each session shows the flows its client holds and its own refusals.`,
		Flags: []cli.Flag{
			stateDirFlag("nlvpn"),
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object"},
		},
		Action: func(c *cli.Context) error {
			raw, err := status.Read(filepath.Join(c.String("state-dir"), "status.sock"))
			if err != nil {
				return err
			}
			if c.Bool("json") {
				_, err := fmt.Printf("%s\n", raw)
				return err
			}
			var role struct {
				Role string `json:"role"`
			}
			json.Unmarshal(raw, &role)
			if role.Role == "agent" {
				var st agent.Status
				if err := json.Unmarshal(raw, &st); err != nil {
					return fmt.Errorf("reading status: %w", err)
				}
				fmt.Printf("agent:    %s\ngateway:  over %s\negress:   %s\nclients:  %d\n", st.Name, orNone(st.Transport), orNone(st.Egress), len(st.Sessions))
				for _, s := range st.Sessions {
					fmt.Printf("  %s  session %s  %s %s  rtt %.2f ms  tx %d  rx %d bytes  flows tcp %d udp %d\n", s.Client, s.Session, s.Path, s.Remote, s.RTTMillis, s.TxBytes, s.RxBytes,
						s.Flows["tcp_flows"], s.Flows["udp_flows"])
					if line := nonZero(s.Limited); line != "" {
						fmt.Printf("    refused at its bounds: %s\n", line)
					}
				}
				if line := nonZero(st.Limited); line != "" {
					fmt.Printf("refused at bounds: %s\n", line)
				}
				if line := nonZero(st.DNS); line != "" {
					fmt.Printf("dns: %s\n", line)
				}
				return nil
			}
			var st client.Status
			if err := json.Unmarshal(raw, &st); err != nil {
				return fmt.Errorf("reading status: %w", err)
			}
			fmt.Printf("agent:    %s\npath:     %s\nremote:   %s\nrtt:      %.2f ms\ntx:       %d bytes\nrx:       %d bytes\nswitched: %s ago\ngateway:  over %s\n",
				st.Agent, st.Path, st.Remote, st.RTTMillis, st.TxBytes, st.RxBytes, time.Duration(st.SinceSwitchS*float64(time.Second)).Round(time.Second), orNone(st.Transport))
			return nil
		},
	}
}
