// Package connectproxy opens TCP connections through an HTTP proxy's
// CONNECT method, the way out of networks that let only a proxy through,
// and finds the proxy to use: a URL given by the user, or HTTPS_PROXY /
// https_proxy from the environment, honouring NO_PROXY.
package connectproxy

import (
	"bufio"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"golang.org/x/net/http/httpproxy"
)

// Parse reads a proxy URL: http://[user:password@]host[:port], or just
// host:port. Port 80 if none is given; only http proxies are understood.
func Parse(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err == nil && u.Host == "" {
		err = errors.New("no host")
	}
	if err != nil {
		return nil, fmt.Errorf("proxy %q: %w", s, err)
	}
	if u.Scheme != "http" {
		return nil, fmt.Errorf("proxy %q: only http:// proxies are supported", s)
	}
	if u.Host == "" || u.Hostname() == "" {
		return nil, fmt.Errorf("proxy %q: no host", s)
	}
	if u.Port() == "" {
		u.Host = net.JoinHostPort(u.Hostname(), "80")
	}
	return u, nil
}

// FromEnvironment is the proxy that HTTPS_PROXY (or https_proxy) names for
// a TLS connection to target (host:port), or nil: none set, or NO_PROXY
// (no_proxy) exempts target, or target is a loopback address.
func FromEnvironment(target string) (*url.URL, error) {
	u, err := httpproxy.FromEnvironment().ProxyFunc()(&url.URL{Scheme: "https", Host: target})
	if err != nil || u == nil {
		return nil, err
	}
	return Parse(u.String())
}

// Dialer dials through one proxy.
type Dialer struct {
	Proxy *url.URL
	// Forward opens the TCP connection to the proxy; nil: a net.Dialer.
	Forward func(ctx context.Context, network, addr string) (net.Conn, error)
}

// maxResponse bounds the proxy's answer to a CONNECT (status line and
// headers).
const maxResponse = 16 << 10

// DialContext opens a connection to addr (host:port) through the proxy.
// Once it returns, the connection is a clean byte stream to addr.
func (d *Dialer) DialContext(ctx context.Context, addr string) (net.Conn, error) {
	fwd := d.Forward
	if fwd == nil {
		fwd = (&net.Dialer{}).DialContext
	}
	c, err := fwd(ctx, "tcp", d.Proxy.Host)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", d.Proxy.Host, err)
	}
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(30 * time.Second)
	}
	c.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	nc, err := d.connect(c, addr)
	stop()
	if err != nil {
		c.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", err, ctx.Err())
		}
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return nc, nil
}

func (d *Dialer) connect(c net.Conn, addr string) (net.Conn, error) {
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Opaque: addr}, Host: addr, Header: make(http.Header)}
	if u := d.Proxy.User; u != nil {
		pw, _ := u.Password()
		req.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pw)))
	}
	if err := req.Write(c); err != nil {
		return nil, fmt.Errorf("proxy %s: %w", d.Proxy.Host, err)
	}
	lr := &io.LimitedReader{R: c, N: maxResponse}
	br := bufio.NewReaderSize(lr, 4096)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		if lr.N <= 0 {
			err = errors.New("answer too long")
		}
		return nil, fmt.Errorf("proxy %s: CONNECT %s: %w", d.Proxy.Host, addr, err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("proxy %s refused CONNECT %s: %s", d.Proxy.Host, addr, resp.Status)
	}
	if br.Buffered() > 0 {
		// Bytes of the tunnel that came with the answer.
		rest, _ := br.Peek(br.Buffered())
		return &prefixConn{Conn: c, pre: append([]byte(nil), rest...)}, nil
	}
	return c, nil
}

// prefixConn reads pre before the connection's own bytes.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}
