// Package metrics serves one process's Prometheus metrics over HTTP: a
// registry that already holds the Go runtime and process collectors, and a
// server that listens only on loopback unless told otherwise. The roles
// (gateway, agent, client) register their own collectors; they never
// import this package.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a registry with the Go runtime and process
// collectors in it.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// ErrNotLoopback is returned by CheckAddr for an address that other
// machines could reach.
var ErrNotLoopback = errors.New("not a loopback address")

// CheckAddr checks that addr is HOST:PORT and, unless allowRemote, that
// HOST is a loopback address (or "localhost"). Metrics name nodes and show
// how much traffic flows when: nothing to hand to every machine that can
// reach the port. An empty host (":9433") means every interface.
func CheckAddr(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q: want HOST:PORT, e.g. 127.0.0.1:9433", addr)
	}
	if allowRemote || host == "localhost" {
		return nil
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() {
		return nil
	}
	where := host
	if where == "" {
		where = "every interface"
	}
	return fmt.Errorf("%q: %w (%s): other machines could read the metrics; use 127.0.0.1:PORT", addr, ErrNotLoopback, where)
}

// Options are what a Server serves besides /metrics.
type Options struct {
	// AllowRemote lets the server listen on a non-loopback address.
	AllowRemote bool
	// Health, if set, answers /healthz: 200 "ok" when it returns nil, 503
	// with its error otherwise.
	Health func() error
	// Handlers are more paths to serve (e.g. the gateway's /relay).
	Handlers map[string]http.Handler
	Log      *slog.Logger
}

// maxScrapesInFlight bounds concurrent scrapes; more get a 503 and are
// counted in promhttp_metric_handler_requests_total{code="503"}.
const maxScrapesInFlight = 4

// maxConns bounds the connections open to the server (a scraper needs
// one); more are closed at once and counted in
// nlvpn_metrics_connections_refused_total.
const maxConns = 16

// Server serves a registry's metrics over HTTP.
type Server struct {
	srv  *http.Server
	ln   net.Listener
	done chan struct{}
}

// Serve checks addr (CheckAddr), listens on it and serves /metrics from
// reg, plus what opt adds, until Close.
func Serve(addr string, reg *prometheus.Registry, opt Options) (*Server, error) {
	if err := CheckAddr(addr, opt.AllowRemote); err != nil {
		return nil, err
	}
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.InstrumentMetricHandler(reg, promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		Registry:            reg, // counts the handler's own errors
		MaxRequestsInFlight: maxScrapesInFlight,
		Timeout:             10 * time.Second,
		ErrorLog:            slog.NewLogLogger(opt.Log.Handler(), slog.LevelWarn),
	})))
	if opt.Health != nil {
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			if err := opt.Health(); err != nil {
				w.WriteHeader(http.StatusServiceUnavailable)
				fmt.Fprintln(w, err)
				return
			}
			fmt.Fprintln(w, "ok")
		})
	}
	for path, h := range opt.Handlers {
		mux.Handle(path, h)
	}
	refused := prometheus.NewCounter(prometheus.CounterOpts{Name: "nlvpn_metrics_connections_refused_total",
		Help: "Connections to the metrics endpoint closed at once because 16 were open."})
	if err := reg.Register(refused); err != nil {
		return nil, err
	}
	var open atomic.Int64
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		reg.Unregister(refused)
		return nil, err
	}
	s := &Server{ln: ln, done: make(chan struct{}),
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
			WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 16 << 10,
			ConnState: func(c net.Conn, st http.ConnState) {
				switch st {
				case http.StateNew:
					if open.Add(1) > maxConns {
						refused.Inc()
						c.Close() // the server then reports it closed
					}
				case http.StateClosed, http.StateHijacked:
					open.Add(-1)
				}
			}}}
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			opt.Log.Warn("metrics server stopped", "err", err)
		}
	}()
	return s, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// shutdownGrace is how long Close lets scrapes under way finish.
const shutdownGrace = 2 * time.Second

// Close stops listening, lets scrapes under way finish (briefly), then
// closes what is left.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	if err != nil {
		err = s.srv.Close()
	}
	<-s.done
	return err
}
