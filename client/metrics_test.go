package client

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The client's metrics follow the conventions, show the path as a gauge
// per path, and carry neither the session ID nor an address.
func TestClientMetrics(t *testing.T) {
	c := statusClient()
	m := statusCollector{c.Status}
	problems, err := testutil.CollectAndLint(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	want := `
# HELP nlvpn_client_path 1 for the path the tunnel uses now (direct, relay; none while a direct-only tunnel has none), 0 for the others.
# TYPE nlvpn_client_path gauge
nlvpn_client_path{path="direct"} 0
nlvpn_client_path{path="none"} 0
nlvpn_client_path{path="relay"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "nlvpn_client_path"); err != nil {
		t.Error(err)
	}
	c.pmu.Lock()
	c.path = pathState{kind: "direct", remote: "198.18.0.9:4000", since: time.Now()}
	c.pmu.Unlock()
	want = strings.NewReplacer(`"direct"} 0`, `"direct"} 1`, `"relay"} 1`, `"relay"} 0`).Replace(want)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "nlvpn_client_path"); err != nil {
		t.Error(err)
	}

	// Not connected to the gateway (this client has no connection).
	disconnected := `
# HELP nlvpn_gateway_connected 1 while connected to the gateway over this transport (udp, tcp, tcp_proxy), 0 otherwise.
# TYPE nlvpn_gateway_connected gauge
nlvpn_gateway_connected{transport="tcp"} 0
nlvpn_gateway_connected{transport="tcp_proxy"} 0
nlvpn_gateway_connected{transport="udp"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(disconnected), "nlvpn_gateway_connected"); err != nil {
		t.Error(err)
	}

	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, mf := range mfs {
		names = append(names, mf.GetName())
		for _, s := range mf.GetMetric() {
			for _, lp := range s.GetLabel() {
				if n := lp.GetName(); n != "path" && n != "reason" && n != "transport" {
					t.Errorf("%s has label %s", mf.GetName(), lp.GetName())
				}
				if strings.ContainsAny(lp.GetValue(), ".:") {
					t.Errorf("%s label %s=%q looks like an address", mf.GetName(), lp.GetName(), lp.GetValue())
				}
			}
		}
	}
	for _, n := range []string{"nlvpn_tunnel_transmit_bytes_total", "nlvpn_tunnel_receive_bytes_total", "nlvpn_packets_dropped_total", "nlvpn_client_rtt_seconds"} {
		if !strings.Contains(strings.Join(names, " "), n) {
			t.Errorf("no %s among %v", n, names)
		}
	}
}
