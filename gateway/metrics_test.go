package gateway

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/nlvpn/nlvpn/relay"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// gather collects the gateway's metrics by name, as a scrape would.
func gather(t *testing.T, g *Gateway) map[string]*dto.MetricFamily {
	t.Helper()
	reg := prometheus.NewPedanticRegistry() // also checks Describe against Collect
	if err := reg.Register(g); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gathering the gateway's metrics: %v", err)
	}
	out := make(map[string]*dto.MetricFamily)
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

// metricValue is the value of the series of name with the label pairs
// given (name, value, ...); it fails the test if there is none.
func metricValue(t *testing.T, mfs map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	mf := mfs[name]
	if mf == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch mf.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue()
		}
		t.Fatalf("%s has type %v", name, mf.GetType())
	}
	t.Fatalf("no series %s%v", name, labels)
	return 0
}

// The gateway's metrics during a relayed session: the conventions hold
// (promlint), the numbers match what happened, and no label carries a
// session ID, a node name or a key.
func TestGatewayMetrics(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	agent := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleAgent, Name: "miranda"}), advertise: lan})
	agent.ready(t)
	client := startNode(t, tg, nodeOpts{token: tg.token(t, token.Claims{Role: token.RoleClient, Name: "alice", Agents: []string{"miranda"}})})
	client.ready(t)
	r, err := request(t, client, connectMsg("miranda"))
	if err != nil || r.Session == nil {
		t.Fatalf("Connect: %+v, %v", r, err)
	}
	<-agent.offers
	id := r.Session.ID
	testRelay(t, tg, client, agent, id)

	problems, err := testutil.CollectAndLint(tg.g)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}

	mfs := gather(t, tg.g)
	rs := tg.g.RelayStats()
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"nlvpn_gateway_registrations_total", nil, 2},
		{"nlvpn_gateway_nodes", []string{"role", "agent"}, 1},
		{"nlvpn_gateway_nodes", []string{"role", "client"}, 1},
		{"nlvpn_relay_routes", nil, 1},
		{"nlvpn_relay_frames_total", nil, float64(rs.Frames)},
		{"nlvpn_relay_bytes_total", nil, float64(rs.Bytes)},
		{"nlvpn_relay_frames_dropped_total", []string{"reason", "unknown_session"}, 1}, // testRelay's stray frame
		{"nlvpn_relay_frames_dropped_total", []string{"reason", "queue_full"}, 0},
		{"nlvpn_gateway_refused_total", []string{"reason", "bad_token"}, 0},
		{"nlvpn_gateway_unauthenticated_connections", nil, 0},
		{"nlvpn_gateway_tcp_streams", nil, 0}, // both nodes came over UDP
		{"nlvpn_gateway_tcp_dropped_total", []string{"reason", "queue_full"}, 0},
	} {
		if got := metricValue(t, mfs, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if rs.Bytes < 20*50 {
		t.Errorf("relay bytes %d: testRelay relayed more", rs.Bytes)
	}
	// Every metric is ours and typed; counters are _total; labels take
	// fixed values only.
	secrets := []string{wire.SessionID(id), "miranda", "alice", agent.key.Public().String(), client.key.Public().String()}
	for name, mf := range mfs {
		if !strings.HasPrefix(name, "nlvpn_") {
			t.Errorf("metric %s lacks the nlvpn_ prefix", name)
		}
		if isCounter := mf.GetType() == dto.MetricType_COUNTER; isCounter != strings.HasSuffix(name, "_total") {
			t.Errorf("metric %s is a %v", name, mf.GetType())
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if n := lp.GetName(); n != "reason" && n != "role" && n != "result" && n != "direction" {
					t.Errorf("%s has label %s", name, lp.GetName())
				}
				for _, s := range secrets {
					if strings.Contains(lp.GetValue(), s) {
						t.Errorf("%s label %s=%q carries %q", name, lp.GetName(), lp.GetValue(), s)
					}
				}
			}
		}
	}

	// The nodes leave: the gauges come back to zero, the counters stay.
	client.stop(t)
	agent.stop(t)
	deadline := time.Now().Add(5 * time.Second)
	for {
		mfs = gather(t, tg.g)
		if metricValue(t, mfs, "nlvpn_gateway_nodes", "role", "agent")+metricValue(t, mfs, "nlvpn_gateway_nodes", "role", "client") == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodes still counted online 5 s after they left")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := metricValue(t, mfs, "nlvpn_gateway_registrations_total"); got != 2 {
		t.Errorf("registrations after the nodes left = %v, want 2", got)
	}
}

// Healthy says whether the gateway serves; /relay still serves JSON.
func TestGatewayHealthy(t *testing.T) {
	tg := startGateway(t, t.TempDir())
	// The port is bound (startGateway waits for that) a moment before the
	// QUIC listener accepts.
	deadline := time.Now().Add(3 * time.Second)
	for err := tg.g.Healthy(); err != nil; err = tg.g.Healthy() {
		if time.Now().After(deadline) {
			t.Fatalf("Healthy while running: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	rec := httptest.NewRecorder()
	tg.g.RelayHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/relay", nil))
	body, _ := io.ReadAll(rec.Body)
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" || !strings.Contains(string(body), `"frames":0`) {
		t.Errorf("/relay: %s %q", ct, body)
	}
	tg.cancel()
	select {
	case <-tg.done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10 s")
	}
	if err := tg.g.Healthy(); err == nil {
		t.Fatal("Healthy after Run returned")
	}
}

// The frame socket's counters follow what the relay forwarded: 200 frames
// from one node read, forwarded and received by the other, in fewer system
// calls than datagrams each way.
func TestRelaySocketMetrics(t *testing.T) {
	r := startRelayRig(t)
	frame := relay.Frame(42, make([]byte, 1000))
	buf := make([]byte, 2048)
	const n = 200
	got := 0
	for i := 0; i < n; i += 20 {
		for j := 0; j < 20; j++ {
			r.a.WriteToUDPAddrPort(frame, r.gw)
		}
		for j := 0; j < 20; j++ {
			r.b.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := r.b.Read(buf); err != nil {
				break
			}
			got++
		}
	}
	if got < n*9/10 {
		t.Fatalf("%d of %d frames forwarded", got, n)
	}
	mfs := gather(t, r.g)
	for _, c := range []struct {
		dir  string
		want float64
	}{{"read", n}, {"write", float64(got)}} {
		calls := metricValue(t, mfs, "nlvpn_relay_socket_calls_total", "direction", c.dir)
		dgrams := metricValue(t, mfs, "nlvpn_relay_socket_datagrams_total", "direction", c.dir)
		// The rig's relay checks come and go through the socket too.
		if dgrams < c.want || calls < 1 || calls > dgrams {
			t.Errorf("frame socket %s: %v calls, %v datagrams; want at least %v datagrams in fewer calls", c.dir, calls, dgrams, c.want)
		}
	}
}
