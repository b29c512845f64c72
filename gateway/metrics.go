package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
)

// Handler serves the gateway's counters: /relay as JSON (per-session
// relayed bytes, so anyone can check the relay went quiet after a switch
// to a direct path), /metrics in the Prometheus text format. It shows
// byte counts and node names only, never traffic.
func (g *Gateway) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/relay", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(g.hub.Stats())
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		s := g.hub.Stats()
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		fmt.Fprintf(w, "# TYPE nlvpn_relay_frames_total counter\nnlvpn_relay_frames_total %d\n", s.Frames)
		fmt.Fprintf(w, "# TYPE nlvpn_relay_bytes_total counter\nnlvpn_relay_bytes_total %d\n", s.Bytes)
		fmt.Fprintf(w, "# TYPE nlvpn_relay_dropped_total counter\n")
		for _, d := range []struct {
			reason string
			n      uint64
		}{{"unknown_session", s.DropUnknown}, {"not_endpoint", s.DropNotEndpoint}, {"queue_full", s.DropQueueFull}, {"malformed", s.DropMalformed}, {"send_failed", s.DropSendFailed}} {
			fmt.Fprintf(w, "nlvpn_relay_dropped_total{reason=%q} %d\n", d.reason, d.n)
		}
		fmt.Fprintf(w, "# TYPE nlvpn_relay_routes gauge\nnlvpn_relay_routes %d\n", s.Routes)
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_registrations_refused_total counter\nnlvpn_gateway_registrations_refused_total %d\n", g.rejected.Load())
		// Strangers: connections turned away before their node
		// registered, by reason, Retries demanded, and unauthenticated
		// connections now (admission).
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_refused_total counter\n")
		for r := range numReasons {
			fmt.Fprintf(w, "nlvpn_gateway_refused_total{reason=%q} %d\n", r.String(), g.refusals[r].Load())
		}
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_retries_total counter\nnlvpn_gateway_retries_total %d\n", g.adm.retries.Load())
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_unauthenticated gauge\nnlvpn_gateway_unauthenticated %d\n", g.adm.unauthenticated())
		ts := g.TCPStats()
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_tcp_streams gauge\nnlvpn_gateway_tcp_streams %d\n", g.tcpStreams())
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_tcp_dropped_total counter\n")
		fmt.Fprintf(w, "nlvpn_gateway_tcp_dropped_total{reason=\"queue_full\"} %d\nnlvpn_gateway_tcp_dropped_total{reason=\"no_stream\"} %d\n", ts.DropQueueFull, ts.DropNoStream)
		fmt.Fprintf(w, "# TYPE nlvpn_gateway_tcp_closed_total counter\n")
		fmt.Fprintf(w, "nlvpn_gateway_tcp_closed_total{reason=\"bad_frame\"} %d\nnlvpn_gateway_tcp_closed_total{reason=\"write_timeout\"} %d\n", ts.BadFrames, ts.WriteTimeouts)
		sort.Slice(s.Sessions, func(i, j int) bool { return s.Sessions[i].ID < s.Sessions[j].ID })
		fmt.Fprintf(w, "# TYPE nlvpn_relay_session_bytes_total counter\n")
		for _, r := range s.Sessions {
			fmt.Fprintf(w, "nlvpn_relay_session_bytes_total{session=\"%016x\",a=%q,b=%q} %d\n", r.ID, r.A, r.B, r.RelayedTotal)
		}
	})
	return mux
}
