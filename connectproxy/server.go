package connectproxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"
)

// Server is a minimal CONNECT-only proxy, for tests and the namespace lab
// (nlvpn-lab connect-proxy), not for production: it tunnels to any
// address, without authentication, and answers everything else 405.
type Server struct {
	Log *slog.Logger
	// Dial opens the connection to the target; nil: net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	mu   sync.Mutex
	n    int // tunnels opened
}

// Tunnels is the number of CONNECT tunnels the server opened.
func (s *Server) Tunnels() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
		return
	}
	dial := s.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	up, err := dial(ctx, "tcp", r.Host)
	cancel()
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer up.Close()
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "no hijacking", http.StatusInternalServerError)
		return
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	if _, err := c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")); err != nil {
		return
	}
	s.mu.Lock()
	s.n++
	s.mu.Unlock()
	if s.Log != nil {
		s.Log.Info("CONNECT", "from", r.RemoteAddr, "to", r.Host)
	}
	done := make(chan struct{}, 2)
	go func() {
		// What the client sent after its request, then the rest.
		if n := brw.Reader.Buffered(); n > 0 {
			b, _ := brw.Reader.Peek(n)
			up.Write(b)
		}
		io.Copy(up, c)
		if tc, ok := up.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		done <- struct{}{}
	}()
	go func() {
		io.Copy(c, up)
		if tc, ok := c.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
		done <- struct{}{}
	}()
	<-done
	<-done
}
