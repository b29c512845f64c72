package gateway

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// logLines is a slog JSON sink that tests can read while the gateway writes.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(b)
}

func (l *logLines) logger() *slog.Logger { return slog.New(slog.NewJSONHandler(l, nil)) }

// with returns the lines whose msg is msg, decoded.
func (l *logLines) with(t *testing.T, msg string) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(l.buf.Bytes()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// TestRefusalLogRateLimit: each kind of refusal makes one log line per
// window, which says how many like it went unlogged; every refusal is
// counted.
func TestRefusalLogRateLimit(t *testing.T) {
	type event struct {
		at time.Duration // since the start
		r  reason
	}
	type line struct {
		r          reason
		suppressed float64 // 0: the field is absent
	}
	tests := []struct {
		name   string
		events []event
		want   []line
	}{
		{"one", []event{{0, reasonBadToken}}, []line{{reasonBadToken, 0}}},
		{"burst in one window", []event{{0, reasonBadToken}, {time.Second, reasonBadToken}, {2 * time.Second, reasonBadToken}, {9 * time.Second, reasonBadToken}},
			[]line{{reasonBadToken, 0}}},
		{"next window says how many were left out", []event{{0, reasonBadToken}, {time.Second, reasonBadToken}, {2 * time.Second, reasonBadToken}, {10 * time.Second, reasonBadToken}, {11 * time.Second, reasonBadToken}},
			[]line{{reasonBadToken, 0}, {reasonBadToken, 2}}},
		{"a long quiet", []event{{0, reasonHelloTimeout}, {time.Hour, reasonHelloTimeout}}, []line{{reasonHelloTimeout, 0}, {reasonHelloTimeout, 0}}},
		{"reasons apart", []event{{0, reasonBadToken}, {0, reasonPerSourceLimit}, {time.Second, reasonBadToken}, {time.Second, reasonPerSourceLimit}},
			[]line{{reasonBadToken, 0}, {reasonPerSourceLimit, 0}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var sink logLines
			g := &Gateway{logLimit: newLogLimiter(refusalLogEvery)}
			t0 := time.Unix(1000, 0)
			var now time.Time
			g.logLimit.now = func() time.Time { return now }
			for _, e := range tt.events {
				now = t0.Add(e.at)
				g.refused(sink.logger().With("remote", "192.0.2.1:4433"), slog.LevelInfo, e.r, "refused")
			}
			got := sink.with(t, "refused")
			if len(got) != len(tt.want) {
				t.Fatalf("%d log lines, want %d: %v", len(got), len(tt.want), got)
			}
			for i, w := range tt.want {
				if got[i]["reason"] != w.r.String() || got[i]["remote"] != "192.0.2.1:4433" {
					t.Errorf("line %d: %v, want reason %s and the remote address", i, got[i], w.r)
				}
				if s, _ := got[i]["suppressed"].(float64); s != w.suppressed {
					t.Errorf("line %d: suppressed = %v, want %v", i, got[i]["suppressed"], w.suppressed)
				}
			}
			counted := map[reason]uint64{}
			for _, e := range tt.events {
				counted[e.r]++
			}
			for r, n := range counted {
				if got := g.refusals[r].Load(); got != n {
					t.Errorf("%s counted %d times, want %d", r, got, n)
				}
			}
		})
	}
}

// TestStrangersLoggedOnce: a burst of hostile registrations makes one log
// line, with the remote address, and every one shows in the metrics.
func TestStrangersLoggedOnce(t *testing.T) {
	var sink logLines
	tg := startGatewayWith(t, func(c *Config) { c.Log = sink.logger() })
	const strangers = 4
	for i := range strangers {
		if _, _, err := hostile(t, tg, frame("\x00garbage{")); err != nil {
			t.Fatalf("stranger %d: %v", i, err)
		}
	}
	lines := sink.with(t, "bad registration")
	if len(lines) != 1 {
		t.Fatalf("%d log lines for %d bad registrations, want 1: %v", len(lines), strangers, lines)
	}
	if r, _ := lines[0]["remote"].(string); !strings.HasPrefix(r, "127.0.0.1:") || lines[0]["reason"] != "bad_registration" {
		t.Errorf("log line %v lacks the remote address or the reason", lines[0])
	}
	if got := metricValue(t, gather(t, tg.g), "nlvpn_gateway_refused_total", "reason", "bad_registration"); got != strangers {
		t.Errorf("nlvpn_gateway_refused_total{reason=bad_registration} = %v, want %d", got, strangers)
	}
}
