package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"

	"github.com/nlvpn/nlvpn/wire"
)

// ACMEConfig gets the gateway's certificate from an ACME CA (Let's
// Encrypt by default) for its public name, and renews it before it
// expires (golang.org/x/crypto/acme/autocert; the certificates and the
// account key are kept in STATE/acme, 0700).
//
// Tokens of such a gateway carry no pin: nodes verify the chain to their
// system's roots and the name, which a renewal keeps, whatever its new
// key. That trusts the public CAs with the gateway's identity, which is
// all the gateway has: the tunnels are end to end whatever it is.
type ACMEConfig struct {
	Domain    string         // the gateway's public name, as in its public address
	Email     string         // the CA's contact for the account; optional
	Directory string         // the CA's directory URL; "" is Let's Encrypt
	HTTPAddr  string         // where the CA's HTTP-01 checks are answered (TCP; port 80 for a public CA)
	Roots     *x509.CertPool // roots for the CA's own API (a private CA); nil: the system's
}

// maxACMEConns bounds the connections open to the HTTP-01 port.
const maxACMEConns = 64

// acmeRetry is how long the gateway waits between tries to get its first
// certificate at start; autocert itself renews from then on.
const acmeRetry = 30 * time.Second

// newACME sets up the certificate manager for cfg, with its cache in the
// state directory.
func newACME(cfg *ACMEConfig, stateDir string) (*autocert.Manager, error) {
	if !wire.ValidDomain(cfg.Domain) {
		return nil, fmt.Errorf("ACME domain %q is not a DNS name", cfg.Domain)
	}
	m := &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		Cache:      autocert.DirCache(filepath.Join(stateDir, "acme")),
		HostPolicy: autocert.HostWhitelist(cfg.Domain),
		Email:      cfg.Email,
	}
	if cfg.Directory != "" || cfg.Roots != nil {
		hc := &http.Client{Timeout: 30 * time.Second}
		if cfg.Roots != nil {
			hc.Transport = &http.Transport{TLSClientConfig: &tls.Config{RootCAs: cfg.Roots}}
		}
		m.Client = &acme.Client{DirectoryURL: cfg.Directory, HTTPClient: hc}
	}
	return m, nil
}

// acmeCertificate is the GetCertificate of the gateway's TLS: the
// manager's certificate for the one domain, also for a node that dialed
// the gateway by address and sent no server name. autocert picks an ECDSA
// certificate by the client's TLS 1.2 cipher suites, which a TLS 1.3-only
// client (every QUIC one) does not send: one that can check ECDSA
// signatures is shown as such, so that nodes get the smaller, faster
// ECDSA certificate rather than an RSA one.
func (g *Gateway) acmeCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	h := *hello
	if h.ServerName == "" {
		h.ServerName = g.cfg.ACME.Domain
	}
	if slices.Contains(h.SupportedVersions, tls.VersionTLS13) && slices.Contains(h.SignatureSchemes, tls.ECDSAWithP256AndSHA256) {
		h.CipherSuites = append(slices.Clip(h.CipherSuites), tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
	}
	return g.acme.GetCertificate(&h)
}

// prefetchHello is a node's ClientHello as far as the certificate choice
// goes: fetching the certificate with it at start means the first node
// does not wait for the CA.
func (g *Gateway) prefetchHello() *tls.ClientHelloInfo {
	return &tls.ClientHelloInfo{ServerName: g.cfg.ACME.Domain, SupportedVersions: []uint16{tls.VersionTLS13},
		SignatureSchemes: []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.Ed25519}}
}

// serveACME answers the CA's HTTP-01 checks on cfg.HTTPAddr and gets the
// first certificate, retrying until it has one or ctx ends; it returns
// once the listener is up.
func (g *Gateway) serveACME(ctx context.Context) error {
	ln, err := net.Listen("tcp", g.cfg.ACME.HTTPAddr)
	if err != nil {
		return fmt.Errorf("ACME HTTP-01 listener: %w", err)
	}
	// Anything but a challenge gets a 404: this port serves nothing else.
	// A CA may name the port in Host ("gw.example.com:80"), which the
	// host policy would refuse: it is dropped first.
	challenges := g.acme.HTTPHandler(http.NotFoundHandler())
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if host, _, err := net.SplitHostPort(r.Host); err == nil {
			r.Host = host
		}
		challenges.ServeHTTP(w, r)
	})
	// The port is open to anyone: every connection is short-lived and
	// their number bounded (a CA's checks need a few at once).
	var open atomic.Int64
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 10 * time.Second, IdleTimeout: 30 * time.Second, MaxHeaderBytes: 8 << 10,
		ErrorLog: slog.NewLogLogger(g.log.Handler(), slog.LevelDebug),
		ConnState: func(c net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				if open.Add(1) > maxACMEConns {
					g.refusals[reasonACMEConnLimit].Add(1)
					c.Close() // the server then reports it closed
				}
			case http.StateClosed, http.StateHijacked:
				open.Add(-1)
			}
		}}
	go srv.Serve(ln)
	context.AfterFunc(ctx, func() { srv.Close() })
	log := g.log.With("domain", g.cfg.ACME.Domain, "http", ln.Addr().String())
	go func() {
		for {
			start := time.Now()
			c, err := g.acmeCertificate(g.prefetchHello())
			if err == nil && c.Leaf != nil {
				log.Info("ACME certificate ready", "not_after", c.Leaf.NotAfter.UTC().Format(time.RFC3339), "issuer", c.Leaf.Issuer.String(), "took", time.Since(start).Round(time.Millisecond))
				return
			}
			if err == nil {
				err = errors.New("certificate without a parsed leaf")
			}
			log.Error("cannot get a certificate from the ACME CA; nodes cannot connect until it works", "err", err, "retry_in", acmeRetry)
			select {
			case <-ctx.Done():
				return
			case <-time.After(acmeRetry):
			}
		}
	}()
	return nil
}
