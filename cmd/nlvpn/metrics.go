package main

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/metrics"
)

// metricsFlags are --metrics and --metrics-allow-remote, for the roles
// that serve metrics. what names the role's extra paths for the help.
func metricsFlags(what string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics over HTTP on `ADDR`, a loopback address such as 127.0.0.1:9433 (off by default): /metrics" + what},
		&cli.BoolFlag{Name: "metrics-allow-remote", Usage: "let --metrics listen on an address other machines can reach; metrics carry no secrets, but show node counts and traffic volumes, so firewall the port"},
	}
}

// checkMetrics refuses a bad --metrics address before the role starts.
func checkMetrics(c *cli.Context) error {
	if addr := c.String("metrics"); addr != "" {
		if err := metrics.CheckAddr(addr, c.Bool("metrics-allow-remote")); err != nil {
			return metricsError(err)
		}
	}
	return nil
}

// startMetrics serves the Go runtime's and the process's metrics, and
// what the role registers in the returned Registerer, on --metrics; nil
// without the flag. Stop it with close.
func startMetrics(c *cli.Context, opt metrics.Options) (prometheus.Registerer, func(), error) {
	addr := c.String("metrics")
	if addr == "" {
		return nil, func() {}, nil
	}
	reg := metrics.NewRegistry()
	opt.AllowRemote = c.Bool("metrics-allow-remote")
	srv, err := metrics.Serve(addr, reg, opt)
	if err != nil {
		return nil, nil, metricsError(err)
	}
	slog.Info("serving metrics", "addr", srv.Addr().String())
	return reg, func() { srv.Close() }, nil
}

func metricsError(err error) error {
	if errors.Is(err, metrics.ErrNotLoopback) {
		return fmt.Errorf("--metrics %w, or pass --metrics-allow-remote to serve them anyway", err)
	}
	return fmt.Errorf("--metrics: %w", err)
}
