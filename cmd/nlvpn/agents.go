package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/client"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

func agentsCmd() *cli.Command {
	return &cli.Command{
		Name:  "agents",
		Usage: "list the agents this client may use, online or not, with the subnets they advertise",
		Description: `Asks the gateway, as this client (same token or --state-dir as ` + "`nlvpn up`" + `; a running
` + "`up`" + ` is not disturbed). The list holds every agent the client's token allows that has
registered with the gateway, online now or not; for an offline agent, the subnets it
advertised and when it was last connected. The subnets are the gateway's word: a
tunnel takes them from the agent itself. --json prints {"agents": [{"name", "online",
"advertise", "last_seen"}]} (last_seen in unix seconds, for offline agents).`,
		Flags: append(nodeFlags(),
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object"},
			&cli.DurationFlag{Name: "timeout", Value: 10 * time.Second, Usage: "give up if the gateway does not answer within this"},
		),
		Action: func(c *cli.Context) error {
			ns, err := setupNode(c, token.RoleClient)
			if err != nil {
				return err
			}
			// A listing, not a service: only warnings unless asked for more.
			log := slog.Default()
			if lv := c.String("log-level"); lv != "debug" {
				log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
			}
			ctx, cancel := signalContext(c)
			defer cancel()
			ctx, cancelT := context.WithTimeout(ctx, c.Duration("timeout"))
			defer cancelT()
			l, err := client.ListAgents(ctx, client.ListConfig{Gateway: ns.gateway, Gateways: ns.gateways, Pin: ns.claims.Pin, Token: ns.token, Key: ns.key, Log: log})
			if err != nil {
				return err
			}
			ns.remember(c.IsSet("gateway"))
			if c.Bool("json") {
				if l.Agents == nil {
					l.Agents = []wire.AgentInfo{}
				}
				return json.NewEncoder(os.Stdout).Encode(l)
			}
			return printAgents(os.Stdout, l, time.Now())
		},
	}
}

func printAgents(w io.Writer, l *wire.Agents, now time.Time) error {
	if len(l.Agents) == 0 {
		_, err := fmt.Fprintln(w, "no agents: none that this client's token allows has registered with the gateway yet")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, "AGENT\tSTATUS\tSUBNETS")
	for _, a := range l.Agents {
		st := "online"
		if !a.Online {
			st = "offline"
			if a.LastSeen > 0 {
				st = fmt.Sprintf("offline, last seen %s ago", roughly(now.Sub(time.Unix(a.LastSeen, 0))))
			}
		}
		subnets := make([]string, len(a.Advertise))
		for i, p := range a.Advertise {
			subnets[i] = p.String()
		}
		if len(subnets) == 0 {
			subnets = []string{"(none: only the agent's own overlay address)"}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", a.Name, st, strings.Join(subnets, ", "))
	}
	if l.Truncated {
		fmt.Fprintln(tw, "(more agents than fit in one answer; the list is cut)")
	}
	return tw.Flush()
}

// roughly rounds a duration the way a person says it.
func roughly(d time.Duration) string {
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return d.Round(time.Minute).String()
	case d < 48*time.Hour:
		return d.Round(time.Hour).String()
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}
