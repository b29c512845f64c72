package main

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/nlvpn/nlvpn/gateway"
)

func acmeFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "acme-domain", Usage: "get the certificate for `NAME` (the host of --public-addr) from an ACME CA, Let's Encrypt by default, and renew it by itself; tokens then carry no pin and nodes verify the chain and the name, so renewals never break them"},
		&cli.StringFlag{Name: "acme-email", Usage: "contact `EMAIL` for the ACME account (expiry notices); optional"},
		&cli.StringFlag{Name: "acme-directory", Usage: "the ACME CA's directory `URL` (default: Let's Encrypt's production CA)"},
		&cli.StringFlag{Name: "acme-http", Value: ":80", Usage: "TCP `ADDR` where the CA's HTTP-01 checks are answered; a public CA comes to port 80"},
		&cli.StringFlag{Name: "acme-ca", Usage: "PEM `FILE` of roots to trust for the ACME CA's own API (a private CA, e.g. step-ca); default: the system's"},
	}
}

// acmeConfig reads the --acme-* flags; nil without --acme-domain.
func acmeConfig(c *cli.Context) (*gateway.ACMEConfig, error) {
	d := c.String("acme-domain")
	if d == "" {
		for _, f := range []string{"acme-email", "acme-directory", "acme-ca"} {
			if c.IsSet(f) {
				return nil, fmt.Errorf("--%s needs --acme-domain", f)
			}
		}
		return nil, nil
	}
	if c.String("cert") != "" {
		return nil, errors.New("--acme-domain and --cert exclude each other")
	}
	if pa := c.String("public-addr"); pa == "" {
		return nil, fmt.Errorf("--acme-domain needs --public-addr %s:PORT: tokens name the gateway by that name", d)
	} else if host, _, _ := net.SplitHostPort(pa); host != d {
		return nil, fmt.Errorf("--public-addr %q names another host than --acme-domain %q: nodes would check the certificate for %q", pa, d, host)
	}
	cfg := &gateway.ACMEConfig{Domain: d, Email: c.String("acme-email"), Directory: c.String("acme-directory"), HTTPAddr: c.String("acme-http")}
	if f := c.String("acme-ca"); f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("--acme-ca: %w", err)
		}
		cfg.Roots = x509.NewCertPool()
		if !cfg.Roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--acme-ca %s: no PEM certificate in it", f)
		}
	}
	return cfg, nil
}
