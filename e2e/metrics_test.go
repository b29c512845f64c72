//go:build linux

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/nlvpn/nlvpn/lab"
)

// Where the agent and the client serve their metrics, each in its own
// namespace (the gateway's is metricsAddr).
const (
	agentMetricsAddr  = "127.0.0.1:9434"
	clientMetricsAddr = "127.0.0.1:9435"
)

// scrape fetches http://addr/metrics in ns and returns each series'
// value by its name and labels as Prometheus prints them, e.g.
// `nlvpn_gateway_nodes{role="agent"}`.
func scrape(t *testing.T, ns, addr string) map[string]float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, _, err := lab.Run(ctx, ns, "curl", "-sS", "-f", "--noproxy", "*", "--max-time", "5", "http://"+addr+"/metrics")
	if err != nil {
		t.Fatalf("scraping %s in %s: %v", addr, ns, err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(string(out)))
	if err != nil {
		t.Fatalf("%s/metrics is not the Prometheus text format: %v", addr, err)
	}
	vals := make(map[string]float64)
	for name, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var labels []string
			for _, lp := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", lp.GetName(), lp.GetValue()))
			}
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				vals[key] = m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				vals[key] = m.GetGauge().GetValue()
			case dto.MetricType_UNTYPED:
				vals[key] = m.GetUntyped().GetValue()
			}
		}
	}
	return vals
}

// The counters people scrape, per role, that a download moves.
const (
	gwRelayBytes = "nlvpn_relay_bytes_total"
	agentTx      = "nlvpn_tunnel_transmit_bytes_total"
	clientRx     = "nlvpn_tunnel_receive_bytes_total"
)

// The gateway's, the agent's and the client's /metrics, scraped before,
// during and after a download through the tunnel, show the bytes moving:
// on the relay path all three counters grow by at least the download's
// size; on the direct path the agent's and the client's do, and the
// relay's hardly moves.
func TestMetricsShowBytesMoving(t *testing.T) {
	for _, mode := range []string{"relay", "direct"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, coneCone, false, "--metrics", clientMetricsAddr)
			e.restartAgent(t, "--advertise", e.lab.LANSubnet.String(), "--metrics", agentMetricsAddr)
			if mode == "relay" {
				e.startClientMode(t, "--relay")
			} else {
				e.startClientMode(t)
			}
			e.waitPath(t, mode, 15*time.Second)
			ns := e.lab.NS
			type scrapes struct{ gw, agent, client map[string]float64 }
			// The agent first: the checks below hold the others to what
			// the agent had sent, and each scrape (a curl in a namespace)
			// can take a good part of a second on a loaded machine, so a
			// later scrape sees at least what an earlier one did. (The
			// gateway scraped first once showed 44 KB relayed against the
			// agent's 1 MiB sent a moment later.)
			all := func() scrapes {
				var s scrapes
				s.agent = scrape(t, ns.Agent, agentMetricsAddr)
				s.client = scrape(t, ns.Client, clientMetricsAddr)
				s.gw = scrape(t, ns.GW, metricsAddr)
				return s
			}
			before := all()
			for _, c := range []struct {
				vals map[string]float64
				key  string
			}{{before.gw, `nlvpn_gateway_nodes{role="agent"}`}, {before.gw, `nlvpn_gateway_nodes{role="client"}`},
				{before.agent, `nlvpn_agent_sessions{path="` + mode + `"}`}, {before.client, `nlvpn_client_path{path="` + mode + `"}`},
				{before.agent, `nlvpn_gateway_connected{transport="udp"}`}, {before.client, `nlvpn_gateway_connected{transport="udp"}`}} {
				if c.vals[c.key] != 1 {
					t.Errorf("%s = %v, want 1", c.key, c.vals[c.key])
				}
			}
			for _, vals := range []map[string]float64{before.gw, before.agent, before.client} {
				if _, ok := vals["process_resident_memory_bytes"]; !ok {
					t.Error("no process metrics")
				}
				if _, ok := vals["go_goroutines"]; !ok {
					t.Error("no Go runtime metrics")
				}
			}

			// 12 MiB at 2 MB/s: about 6 s, long enough to scrape during.
			const size = 12 << 20
			done := make(chan error, 1)
			go func() { done <- e.download(t, size, 61, "--limit-rate", "2M") }()
			var during scrapes
			e.waitFor(t, 20*time.Second, "the agent's counter to move during the download", func() error {
				select {
				case err := <-done:
					done <- err
					return errStop(fmt.Errorf("the download ended (%v) before the agent's metrics showed 1 MiB of it", err))
				default:
				}
				during = all()
				if d := during.agent[agentTx] - before.agent[agentTx]; d < 1<<20 {
					return fmt.Errorf("agent sent %.0f bytes so far", d)
				}
				return nil
			})
			if d := during.client[clientRx] - before.client[clientRx]; d < 512<<10 {
				t.Errorf("mid-download the client's %s grew by %.0f bytes only", clientRx, d)
			}
			if d := during.gw[gwRelayBytes] - before.gw[gwRelayBytes]; mode == "relay" && d < 512<<10 {
				t.Errorf("mid-download the gateway's %s grew by %.0f bytes only", gwRelayBytes, d)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("download: %v", err)
				}
			case <-time.After(60 * time.Second):
				t.Fatal("download did not finish within 60 s")
			}
			after := all()
			grew := func(who string, b, a map[string]float64, key string) float64 {
				d := a[key] - b[key]
				t.Logf("%s %s: +%.0f bytes for a %d-byte download", who, key, d, size)
				return d
			}
			if d := grew("agent", before.agent, after.agent, agentTx); d < size {
				t.Errorf("the agent's %s grew by %.0f, less than the %d bytes downloaded", agentTx, d, size)
			}
			if d := grew("client", before.client, after.client, clientRx); d < size {
				t.Errorf("the client's %s grew by %.0f, less than the %d bytes downloaded", clientRx, d, size)
			}
			d := grew("gateway", before.gw, after.gw, gwRelayBytes)
			switch {
			case mode == "relay" && d < size:
				t.Errorf("the gateway's %s grew by %.0f, less than the %d bytes relayed", gwRelayBytes, d, size)
			case mode == "direct" && d > size/16:
				t.Errorf("on the direct path the gateway's %s grew by %.0f", gwRelayBytes, d)
			}
			// No label anywhere carries the session's ID.
			st, err := e.status(t)
			if err != nil {
				t.Fatal(err)
			}
			if st.Session == "" {
				t.Fatal("the client's status shows no session")
			}
			for _, vals := range []map[string]float64{after.gw, after.agent, after.client} {
				for k := range vals {
					if strings.Contains(k, st.Session) {
						t.Errorf("series %s carries the session ID %s", k, st.Session)
					}
				}
			}
			// The gateway's health check.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, _, err := lab.Run(ctx, ns.GW, "curl", "-sS", "-f", "--noproxy", "*", "--max-time", "5", "http://"+metricsAddr+"/healthz")
			if err != nil || strings.TrimSpace(string(out)) != "ok" {
				t.Errorf("gateway /healthz: %q, %v", out, err)
			}
		})
	}
}
