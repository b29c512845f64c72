package netstack

// HTTP proxy: CONNECT host:port is answered 200 and spliced; absolute-form
// http:// requests are forwarded by an http.Transport that dials through the
// tunnel. With credentials, Proxy-Authorization: Basic is required (407).

import (
	"bufio"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strings"
	"sync"
	"syscall"
	"time"
)

func newProxyTransport(p *Proxy) *http.Transport {
	return &http.Transport{
		DialContext:           p.DialContext,
		Proxy:                 nil, // never chain to the environment's proxy
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// ServeHTTP serves an HTTP proxy on ln until ln is closed (then it returns
// nil) or the Proxy is. (It is not an http.Handler.)
func (p *Proxy) ServeHTTP(ln net.Listener, auth *Credentials) error {
	h := &proxyHTTPHandler{p: p, auth: auth, log: p.log.With("proto", "http")}
	h.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL = pr.In.URL
			pr.Out.Host = pr.In.Host
		},
		Transport:     p.httpTr,
		FlushInterval: -1, // stream
		ErrorLog:      slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		ErrorHandler:  h.forwardError,
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: proxyHandshakeTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return p.ctx },
	}
	// serve bounds and tracks connections; the http.Server runs each one
	// (an in-process listener hands them over).
	hl := &proxyConnListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(hl) }()
	err := p.serve(ln, "http", func(c net.Conn) {
		wc := &proxyTrackedConn{Conn: c, closed: make(chan struct{})}
		select {
		case hl.conns <- wc:
		case <-hl.done:
			return
		}
		// Hold the slot until the http.Server is done with the conn.
		select {
		case <-wc.closed:
		case <-p.ctx.Done():
		}
	})
	hl.Close()
	_ = srv.Close()
	<-errc
	return err
}

// proxyConnListener hands connections accepted by Proxy.serve to an http.Server.
type proxyConnListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *proxyConnListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *proxyConnListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *proxyConnListener) Addr() net.Addr { return l.addr }

// proxyTrackedConn signals when the http.Server closes (or hijacks and then
// closes) a connection.
type proxyTrackedConn struct {
	net.Conn
	closed chan struct{}
	once   sync.Once
}

func (c *proxyTrackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

func (c *proxyTrackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(egCloseWriter); ok {
		return cw.CloseWrite()
	}
	return errors.New("cannot half-close")
}

type proxyHTTPHandler struct {
	p    *Proxy
	auth *Credentials
	log  *slog.Logger
	rp   *httputil.ReverseProxy
}

func (h *proxyHTTPHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if h.auth != nil && !h.authorized(r) {
		h.p.c.authFailures.Add(1)
		w.Header().Set("Proxy-Authenticate", `Basic realm="nlvpn"`)
		http.Error(w, "proxy authentication required", http.StatusProxyAuthRequired)
		return
	}
	if r.Method == http.MethodConnect {
		h.connect(w, r)
		return
	}
	if !r.URL.IsAbs() || r.URL.Scheme != "http" || r.URL.Host == "" {
		h.p.c.protoErrors.Add(1)
		http.Error(w, "this is a proxy: send absolute http:// URLs or CONNECT", http.StatusBadRequest)
		return
	}
	h.rp.ServeHTTP(w, r)
}

func (h *proxyHTTPHandler) authorized(r *http.Request) bool {
	v := r.Header.Get("Proxy-Authorization")
	scheme, cred, ok := strings.Cut(v, " ")
	if !ok || !strings.EqualFold(scheme, "Basic") {
		return false
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return false
	}
	user, pass, ok := strings.Cut(string(raw), ":")
	if !ok {
		return false
	}
	okUser := subtle.ConstantTimeCompare([]byte(user), []byte(h.auth.User))
	okPass := subtle.ConstantTimeCompare([]byte(pass), []byte(h.auth.Password))
	return okUser&okPass == 1
}

// httpStatusFor maps a dial error to a proxy status code.
func httpStatusFor(err error) int {
	var ne net.Error
	if errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

func (h *proxyHTTPHandler) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	h.log.Debug("http forward failed", "url", r.URL.String(), "error", err)
	if errors.Is(err, context.Canceled) {
		return
	}
	http.Error(w, "nlvpn proxy: "+err.Error(), httpStatusFor(err))
}

func (h *proxyHTTPHandler) connect(w http.ResponseWriter, r *http.Request) {
	target := r.Host
	if _, _, err := net.SplitHostPort(target); err != nil {
		h.p.c.protoErrors.Add(1)
		http.Error(w, "CONNECT needs host:port", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), DefaultProxyDialTimeout)
	remote, err := h.p.DialContext(ctx, "tcp", target)
	cancel()
	if err != nil {
		h.log.Debug("http connect failed", "dst", target, "error", err)
		http.Error(w, "nlvpn proxy: "+err.Error(), httpStatusFor(err))
		return
	}
	if !h.p.addCloser(remote) {
		http.Error(w, "proxy closing", http.StatusServiceUnavailable)
		return
	}
	defer h.p.removeCloser(remote)
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "cannot hijack", http.StatusInternalServerError)
		return
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Time{})
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	var client net.Conn = c
	if n := brw.Reader.Buffered(); n > 0 {
		// Bytes the client sent right after the request (e.g. a TLS hello).
		client = &proxyBufferedConn{Conn: c, r: brw.Reader}
	}
	h.log.Debug("http connect", "dst", target)
	egSplice(client, remote)
}

// proxyBufferedConn reads what the http.Server had already buffered first.
type proxyBufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *proxyBufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c *proxyBufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(egCloseWriter); ok {
		return cw.CloseWrite()
	}
	return errors.New("cannot half-close")
}
