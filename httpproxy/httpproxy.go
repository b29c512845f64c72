// Package httpproxy is the client's local HTTP proxy: CONNECT host:port is
// answered 200 and spliced; absolute-form http:// requests are forwarded.
// Both go through the Server's Dial (the tunnel). With credentials,
// Proxy-Authorization: Basic is required (407). The request header is
// read under a deadline and bounded in size.
package httpproxy

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
	"sync/atomic"
	"syscall"
	"time"
)

// Credentials are the username and password a Server requires.
type Credentials struct{ User, Password string }

// Counters are where a Server counts; nil fields are not counted.
type Counters struct {
	ProtocolErrors *atomic.Uint64 // requests that are not proxy requests, CONNECT without host:port
	AuthFailures   *atomic.Uint64 // missing or wrong credentials
}

func add(c *atomic.Uint64) {
	if c != nil {
		c.Add(1)
	}
}

// Config configures a Server.
type Config struct {
	// Dial opens a connection through the tunnel (host:port; names are
	// resolved by it).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	Auth *Credentials // nil: no authentication
	Log  *slog.Logger // nil: slog.Default()
	// Context ends every request in progress when it ends.
	Context  context.Context
	Counters Counters
	// HeaderTimeout bounds reading a request's header (slowloris);
	// DialTimeout a CONNECT's dial. Zero: 10 s and 20 s.
	HeaderTimeout, DialTimeout time.Duration
	// Track, if set, tells the owner of a CONNECT's dialed connection so
	// that it can close it at shutdown; release forgets it. ok false: the
	// owner is shutting down.
	Track func(io.Closer) (release func(), ok bool)
	// Splice, if set, copies both ways between a CONNECT's client and its
	// dialed connection until both are done; nil: a plain copy each way.
	Splice func(client, remote net.Conn)
}

// Server is a running HTTP proxy. Connections are handed to it one by one
// with Handle (the caller accepts and bounds them); Close ends it.
type Server struct {
	cfg  Config
	log  *slog.Logger
	tr   *http.Transport
	rp   *httputil.ReverseProxy
	srv  *http.Server
	hl   *connListener
	errc chan error
}

// New starts a Server.
func New(cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Context == nil {
		cfg.Context = context.Background()
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = 10 * time.Second
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 20 * time.Second
	}
	s := &Server{cfg: cfg, log: cfg.Log.With("proto", "http"), errc: make(chan error, 1)}
	s.tr = &http.Transport{
		DialContext:           cfg.Dial,
		Proxy:                 nil, // never chain to the environment's proxy
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
	s.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL = pr.In.URL
			pr.Out.Host = pr.In.Host
		},
		Transport:     s.tr,
		FlushInterval: -1, // stream
		ErrorLog:      slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug),
		ErrorHandler:  s.forwardError,
	}
	s.srv = &http.Server{
		Handler:           s,
		ReadHeaderTimeout: cfg.HeaderTimeout,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return cfg.Context },
	}
	// The caller bounds and tracks connections; the http.Server runs each
	// one (an in-process listener hands them over).
	s.hl = &connListener{addr: dummyAddr{}, conns: make(chan net.Conn), done: make(chan struct{})}
	go func() { s.errc <- s.srv.Serve(s.hl) }()
	return s
}

// Handle serves c and returns once the http.Server is done with it (or
// the Server's context ends).
func (s *Server) Handle(c net.Conn) {
	wc := &trackedConn{Conn: c, closed: make(chan struct{})}
	select {
	case s.hl.conns <- wc:
	case <-s.hl.done:
		return
	}
	select {
	case <-wc.closed:
	case <-s.cfg.Context.Done():
	}
}

// Close stops the Server: its connections and the transport's idle ones
// are closed.
func (s *Server) Close() {
	s.hl.Close()
	_ = s.srv.Close()
	<-s.errc
	s.tr.CloseIdleConnections()
}

// connListener hands connections to the http.Server.
type connListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return l.addr }

type dummyAddr struct{}

func (dummyAddr) Network() string { return "tcp" }
func (dummyAddr) String() string  { return "httpproxy" }

type closeWriter interface{ CloseWrite() error }

// trackedConn signals when the http.Server closes (or hijacks and then
// closes) a connection.
type trackedConn struct {
	net.Conn
	closed chan struct{}
	once   sync.Once
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}

func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return errors.New("cannot half-close")
}

// ServeHTTP answers one proxy request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Auth != nil && !s.authorized(r) {
		add(s.cfg.Counters.AuthFailures)
		w.Header().Set("Proxy-Authenticate", `Basic realm="nlvpn"`)
		http.Error(w, "proxy authentication required", http.StatusProxyAuthRequired)
		return
	}
	if r.Method == http.MethodConnect {
		s.connect(w, r)
		return
	}
	if !r.URL.IsAbs() || r.URL.Scheme != "http" || r.URL.Host == "" {
		add(s.cfg.Counters.ProtocolErrors)
		http.Error(w, "this is a proxy: send absolute http:// URLs or CONNECT", http.StatusBadRequest)
		return
	}
	s.rp.ServeHTTP(w, r)
}

func (s *Server) authorized(r *http.Request) bool {
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
	okUser := subtle.ConstantTimeCompare([]byte(user), []byte(s.cfg.Auth.User))
	okPass := subtle.ConstantTimeCompare([]byte(pass), []byte(s.cfg.Auth.Password))
	return okUser&okPass == 1
}

// statusFor maps a dial error to a proxy status code.
func statusFor(err error) int {
	var ne net.Error
	if errors.Is(err, syscall.ETIMEDOUT) || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() {
		return http.StatusGatewayTimeout
	}
	return http.StatusBadGateway
}

func (s *Server) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	s.log.Debug("http forward failed", "url", r.URL.String(), "error", err)
	if errors.Is(err, context.Canceled) {
		return
	}
	http.Error(w, "nlvpn proxy: "+err.Error(), statusFor(err))
}

func (s *Server) connect(w http.ResponseWriter, r *http.Request) {
	target := r.Host
	if _, _, err := net.SplitHostPort(target); err != nil {
		add(s.cfg.Counters.ProtocolErrors)
		http.Error(w, "CONNECT needs host:port", http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.DialTimeout)
	remote, err := s.cfg.Dial(ctx, "tcp", target)
	cancel()
	if err != nil {
		s.log.Debug("http connect failed", "dst", target, "error", err)
		http.Error(w, "nlvpn proxy: "+err.Error(), statusFor(err))
		return
	}
	defer remote.Close()
	if s.cfg.Track != nil {
		release, ok := s.cfg.Track(remote)
		if !ok {
			http.Error(w, "proxy closing", http.StatusServiceUnavailable)
			return
		}
		defer release()
	}
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
		client = &bufferedConn{Conn: c, r: brw.Reader}
	}
	s.log.Debug("http connect", "dst", target)
	if s.cfg.Splice != nil {
		s.cfg.Splice(client, remote)
		return
	}
	done := make(chan struct{})
	go func() { io.Copy(remote, client); remote.Close(); close(done) }()
	io.Copy(client, remote)
	client.Close()
	<-done
}

// bufferedConn reads what the http.Server had already buffered first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c *bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return errors.New("cannot half-close")
}
