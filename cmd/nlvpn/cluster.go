package main

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/cluster"
)

func clusterFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "cluster", Usage: "serve one network with other gateways, sharing their state through the NATS JetStream servers at `URLS` (comma-separated, e.g. nats://nats-1:4222,nats://nats-2:4222); needs --public-addr, and every gateway of the cluster must have the same gateway.key and authority"},
		&cli.StringFlag{Name: "cluster-creds", Usage: "credentials `FILE` for NATS: a NATS .creds file (user JWT and nkey seed) or one line user:password; keep it 0600"},
	}
}

// clusterConfig reads --cluster and --cluster-creds; nil without --cluster.
func clusterConfig(c *cli.Context) (*cluster.Config, error) {
	s := c.String("cluster")
	if s == "" {
		if c.IsSet("cluster-creds") {
			return nil, errors.New("--cluster-creds needs --cluster")
		}
		return nil, nil
	}
	if c.String("public-addr") == "" {
		return nil, errors.New("--cluster needs --public-addr HOST:PORT: the other gateways send nodes to this gateway there")
	}
	var urls []string
	for _, u := range strings.Split(s, ",") {
		u = strings.TrimSpace(u)
		p, err := url.Parse(u)
		if err != nil || p.Host == "" || (p.Scheme != "nats" && p.Scheme != "tls") {
			return nil, fmt.Errorf("--cluster: %q is not a NATS URL (nats://HOST:PORT or tls://HOST:PORT)", u)
		}
		if p.User != nil {
			return nil, fmt.Errorf("--cluster: %q carries credentials; put them in a file for --cluster-creds", p.Redacted())
		}
		urls = append(urls, u)
	}
	return &cluster.Config{URLs: urls, Creds: c.String("cluster-creds")}, nil
}
