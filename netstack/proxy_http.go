package netstack

import (
	"io"
	"net"

	"github.com/nlvpn/nlvpn/httpproxy"
)

// ServeHTTP serves an HTTP proxy (package httpproxy) into the tunnel on ln
// until ln is closed (then it returns nil) or the Proxy is. (It is not an
// http.Handler.)
func (p *Proxy) ServeHTTP(ln net.Listener, auth *Credentials) error {
	cfg := httpproxy.Config{
		Dial: p.DialContext, Log: p.log, Context: p.ctx,
		Counters:      httpproxy.Counters{ProtocolErrors: &p.c.protoErrors, AuthFailures: &p.c.authFailures},
		HeaderTimeout: proxyHandshakeTimeout, DialTimeout: DefaultProxyDialTimeout,
		Track: func(c io.Closer) (func(), bool) {
			if !p.addCloser(c) {
				return nil, false
			}
			return func() { p.removeCloser(c) }, true
		},
		Splice: func(client, remote net.Conn) { egSplice(client, remote) },
	}
	if auth != nil {
		cfg.Auth = &httpproxy.Credentials{User: auth.User, Password: auth.Password}
	}
	srv := httpproxy.New(cfg)
	defer srv.Close()
	return p.serve(ln, "http", srv.Handle)
}
