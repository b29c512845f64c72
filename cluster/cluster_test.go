package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nlvpn/nlvpn/cluster/clustertest"
)

// startNATS runs an embedded nats-server with JetStream on loopback, on
// port (0: any), storing in dir.
func startNATS(t *testing.T, dir string, port int) *server.Server {
	t.Helper()
	if port == 0 {
		port = -1
	}
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: port, JetStream: true, StoreDir: dir, NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(s.Shutdown)
	return s
}

// fakeSerial stands for the authority's verification in these tests: a
// list is "serial:N".
func fakeSerial(signed string) (uint64, error) {
	n, ok := strings.CutPrefix(signed, "serial:")
	if !ok {
		return 0, errors.New("not signed")
	}
	return strconv.ParseUint(n, 10, 64)
}

type gw struct {
	*Cluster
	mu    sync.Mutex
	revoc []string
	moved []string
	lost  []nameLost
}

// nameLost is one OnNameLost call.
type nameLost struct {
	name         string
	lost, holder Presence
}

func (g *gw) lostNames() []nameLost {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]nameLost(nil), g.lost...)
}

// homedHere says whether name is homed on this gateway (refreshed by it).
func (g *gw) homedHere(name string) bool {
	g.Cluster.mu.Lock()
	defer g.Cluster.mu.Unlock()
	_, ok := g.local[name]
	return ok
}

func (g *gw) revocations() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.revoc...)
}
func (g *gw) movedNames() []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]string(nil), g.moved...)
}

func join(t *testing.T, url, addr string, mod func(*Config)) *gw {
	t.Helper()
	g := &gw{}
	cfg := Config{URLs: []string{url}, PublicAddr: addr, Pin: "pin-1", Authority: "auth-1", PresenceTTL: 3 * time.Second,
		JoinTimeout: 10 * time.Second, RevocationSerial: fakeSerial,
		OnRevocations: func(s string) { g.mu.Lock(); g.revoc = append(g.revoc, s); g.mu.Unlock() },
		OnMoved:       func(name string, _ Presence) { g.mu.Lock(); g.moved = append(g.moved, name); g.mu.Unlock() },
		OnNameLost: func(name string, lost, holder Presence) {
			g.mu.Lock()
			g.lost = append(g.lost, nameLost{name, lost, holder})
			g.mu.Unlock()
		},
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := Join(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	g.Cluster = c
	t.Cleanup(c.Close)
	return g
}

// eventually polls cond every 20 ms for at most d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("not within %s: %s", d, what)
}

func TestJoinChecksPinAndAuthority(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	join(t, s.ClientURL(), "198.18.0.1:4433", nil) // the first stores its pin and authority
	for _, tc := range []struct {
		name, pin, auth, wantErr string
	}{
		{"same", "pin-1", "auth-1", ""},
		{"other pin", "pin-2", "auth-1", "gateway.key"},
		{"other authority", "pin-1", "auth-2", "same authority"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Join(context.Background(), Config{URLs: []string{s.ClientURL()}, PublicAddr: "198.18.0.2:4433", Pin: tc.pin, Authority: tc.auth, JoinTimeout: 5 * time.Second})
			if c != nil {
				c.Close()
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Join: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Join error = %v, want one saying %q", err, tc.wantErr)
			}
		})
	}
	if _, err := Join(context.Background(), Config{URLs: []string{s.ClientURL()}, Pin: "pin-1", Authority: "auth-1"}); err == nil || !strings.Contains(err.Error(), "--public-addr") {
		t.Fatalf("Join without a public address: %v, want an error naming --public-addr", err)
	}
}

func TestCredsFile(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, content string
		ok            bool
	}{
		{"user password", "gw:secret\n", true},
		{"creds", "-----BEGIN NATS USER JWT-----\nxyz\n------END NATS USER JWT------\n", true},
		{"no colon", "justaword", false},
		{"two lines", "a:b\nc:d", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := dir + "/" + strings.ReplaceAll(tc.name, " ", "_")
			if err := writeFile(p, tc.content); err != nil {
				t.Fatal(err)
			}
			_, err := credsOption(p)
			if (err == nil) != tc.ok {
				t.Fatalf("credsOption(%q) = %v, want ok=%v", tc.content, err, tc.ok)
			}
		})
	}
}

func TestAddressesUniqueAcrossGateways(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	prefix := netip.MustParsePrefix("100.64.0.0/10")
	// Both gateways bind 40 slots at once, half of them the same names
	// (a node that moved between them): every slot has one address on
	// both, and no address has two slots.
	got := [2]map[string]netip.Addr{{}, {}}
	var wg sync.WaitGroup
	for i, g := range []*gw{g1, g2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 40 {
				slot := fmt.Sprintf("client/c%d", j)
				if j%2 == 1 {
					slot = fmt.Sprintf("client/g%d-%d", i, j)
				}
				a, err := g.Address(context.Background(), slot, prefix)
				if err != nil {
					t.Errorf("gateway %d slot %s: %v", i+1, slot, err)
					return
				}
				got[i][slot] = a
			}
		}()
	}
	wg.Wait()
	owner := map[netip.Addr]string{}
	for i := range got {
		for slot, a := range got[i] {
			if !prefix.Contains(a) || a == prefix.Addr() || a == prefix.Addr().Next() {
				t.Errorf("slot %s got %s, not a node address in %s", slot, a, prefix)
			}
			if o, ok := owner[a]; ok && o != slot {
				t.Errorf("address %s given to %s and %s", a, o, slot)
			}
			owner[a] = slot
		}
	}
	for slot, a := range got[0] {
		if b, ok := got[1][slot]; ok && a != b {
			t.Errorf("slot %s: %s on gateway 1, %s on gateway 2", slot, a, b)
		}
	}
	if len(owner) != 60 {
		t.Errorf("%d addresses for 60 slots", len(owner))
	}
	// Stable: asked again, from the cache, the same.
	for slot, a := range got[1] {
		if b, err := g1.Address(context.Background(), slot, prefix); err != nil || a != b {
			t.Fatalf("slot %s again on gateway 1: %s %v, want %s", slot, b, err, a)
		}
	}
}

func TestPresenceAndNames(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	ctx := context.Background()
	adv := []netip.Prefix{netip.MustParsePrefix("192.168.1.0/24")}
	if err := g1.Announce(ctx, "miranda", Presence{Key: "key-A", Advertise: adv}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "gateway 2 sees miranda on gateway 1", func() bool {
		p, ok := g2.Lookup("miranda")
		return ok && p.Gateway == "198.18.0.1:4433" && p.Key == "key-A" && len(p.Advertise) == 1
	})
	for _, tc := range []struct {
		name, key string
		held      bool
	}{
		{"another key", "key-B", true},
		{"same key: moved", "key-A", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := g2.Announce(ctx, "miranda", Presence{Key: tc.key})
			var held *ErrNameHeld
			if errors.As(err, &held) != tc.held {
				t.Fatalf("Announce with %s: %v, held want %v", tc.key, err, tc.held)
			}
			if tc.held && held.Gateway != "198.18.0.1:4433" {
				t.Fatalf("held by %q, want gateway 1", held.Gateway)
			}
		})
	}
	eventually(t, 2*time.Second, "gateway 1 told that miranda moved", func() bool {
		p, ok := g1.Lookup("miranda")
		return ok && p.Gateway == "198.18.0.2:4433" && slices0(g1.movedNames()) == "miranda"
	})
	// Gateway 1 withdrawing what is no longer its own changes nothing.
	g1.Withdraw("miranda", "key-A")
	time.Sleep(200 * time.Millisecond)
	if p, ok := g2.Lookup("miranda"); !ok || p.Gateway != "198.18.0.2:4433" {
		t.Fatalf("after gateway 1's withdraw: %+v %v, want still on gateway 2", p, ok)
	}
	g2.Withdraw("miranda", "key-A")
	eventually(t, 2*time.Second, "miranda gone on gateway 1", func() bool { _, ok := g1.Lookup("miranda"); return !ok })
	eventually(t, 2*time.Second, "nothing online on gateway 2 after its withdraw", func() bool { return len(g2.Online()) == 0 })
}

func slices0(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// A gateway that dies (no withdraw, no refresh) loses its agents at the
// presence TTL on the others.
func TestPresenceExpiresWhenGatewayDies(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	if err := g1.Announce(context.Background(), "miranda", Presence{Key: "key-A"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "gateway 2 sees miranda", func() bool { _, ok := g2.Lookup("miranda"); return ok })
	// Kill gateway 1's link without a goodbye.
	g1.stop()
	g1.nc.Close()
	start := time.Now()
	eventually(t, 3*g2.ttl, "miranda gone after the TTL", func() bool { _, ok := g2.Lookup("miranda"); return !ok })
	t.Logf("presence gone %s after its gateway died (TTL %s)", time.Since(start).Round(time.Millisecond), g2.ttl)
}

func TestDirectoryAcrossGateways(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	want := DirEntry{Advertise: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, LastSeen: 1700000000, TokenID: "t1", Issued: 1, Expires: 2}
	g1.Seen(context.Background(), "office", want)
	eventually(t, 2*time.Second, "gateway 2's directory has office", func() bool {
		d, ok := g2.Directory()["office"]
		return ok && d.TokenID == "t1" && d.LastSeen == want.LastSeen && len(d.Advertise) == 1
	})
	// A third gateway joining later gets it from the bucket.
	g3 := join(t, s.ClientURL(), "198.18.0.3:4433", nil)
	if _, ok := g3.Directory()["office"]; !ok {
		t.Fatal("a gateway joining later does not see the directory")
	}
}

func TestRevocationsReachEveryGateway(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	ctx := context.Background()
	for _, tc := range []struct {
		publish string
		want    string // the newest list gateway 2 has heard of
		err     bool
	}{
		{"serial:2", "serial:2", false},
		{"serial:1", "serial:2", false}, // older: not put over the newer
		{"forged", "serial:2", true},    // does not verify: refused
		{"serial:3", "serial:3", false},
	} {
		start := time.Now()
		err := g1.PublishRevocations(ctx, tc.publish)
		if (err != nil) != tc.err {
			t.Fatalf("publish %q: %v", tc.publish, err)
		}
		eventually(t, 2*time.Second, "gateway 2 has "+tc.want, func() bool {
			r := g2.revocations()
			return len(r) > 0 && r[len(r)-1] == tc.want
		})
		t.Logf("publish %q: gateway 2 holds %s after %s", tc.publish, tc.want, time.Since(start).Round(time.Millisecond))
	}
	for _, r := range g2.revocations() {
		if r == "serial:1" || r == "forged" {
			t.Fatalf("gateway 2 was handed %q", r)
		}
	}
}

// A hostile writer to NATS (a broken gateway, the NATS operator) can put
// what it likes into the buckets: the caches take only what parses and
// fits, and count the rest.
func TestHostileEntriesCounted(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	js := jetStreamIn(t, s.ClientURL())
	ctx := context.Background()
	many := make([]string, MaxAdvertise+1)
	for i := range many {
		many[i] = fmt.Sprintf("\"10.%d.%d.0/24\"", i/256, i%256)
	}
	for _, tc := range []struct{ bucket, key, value string }{
		{bucketPresence, keyOf("bad1"), "{not json"},
		{bucketPresence, keyOf("bad2"), `{"key":"k"}`}, // no gateway
		{bucketPresence, keyOf("bad3"), `{"gateway":"x:1","advertise":[` + strings.Join(many, ",") + `]}`},
		{bucketPresence, "!!!", `{"gateway":"x:1"}`}, // not a name
		{bucketDirectory, keyOf("bad4"), "[]"},
		{bucketOverlay, "s." + keyOf("slot"), "not an address"},
		{bucketOverlay, "x.y", "z"},
		{bucketRevocations, "other", "serial:9"},
	} {
		kv, err := js.KeyValue(ctx, tc.bucket)
		if err != nil {
			t.Fatal(err)
		}
		before := g.Stats().Dropped
		if _, err := kv.Put(ctx, tc.key, []byte(tc.value)); err != nil {
			if strings.Contains(err.Error(), "invalid key") {
				continue
			}
			t.Fatalf("put %s/%s: %v", tc.bucket, tc.key, err)
		}
		eventually(t, 2*time.Second, "dropped counted for "+tc.bucket+"/"+tc.key, func() bool { return g.Stats().Dropped > before })
	}
	if len(g.Online()) != 0 || len(g.Directory()) != 0 || len(g.revocations()) != 0 {
		t.Fatalf("hostile entries cached: online %v directory %v revocations %v", g.Online(), g.Directory(), g.revocations())
	}
	if _, ok := g.PeekAddress("slot"); ok {
		t.Fatal("a malformed address was cached")
	}
}

// NATS away: lookups answer from the cache, known slots keep their
// addresses, unknown ones are refused, and writes go out once it is back.
func TestNATSAwayAndBack(t *testing.T) {
	dir := t.TempDir()
	s := startNATS(t, dir, 0)
	port := s.Addr().(interface{ String() string }).String()
	_, p, _ := strings.Cut(port, ":")
	portN, _ := strconv.Atoi(p)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	ctx := context.Background()
	prefix := netip.MustParsePrefix("100.64.0.0/10")
	known, err := g1.Address(ctx, "agent/miranda", prefix)
	if err != nil {
		t.Fatal(err)
	}
	if err := g2.Announce(ctx, "office", Presence{Key: "key-O"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "gateway 1 sees office", func() bool { _, ok := g1.Lookup("office"); return ok })

	s.Shutdown()
	eventually(t, 5*time.Second, "gateway 1 notices", func() bool { return !g1.Connected() })
	if a, err := g1.Address(ctx, "agent/miranda", prefix); err != nil || a != known {
		t.Fatalf("known slot while away: %s %v, want %s", a, err, known)
	}
	if _, err := g1.Address(ctx, "agent/stranger", prefix); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("unknown slot while away: %v, want ErrUnavailable", err)
	}
	time.Sleep(g1.ttl + 500*time.Millisecond) // past the TTL: the last state seen stands
	if p, ok := g1.Lookup("office"); !ok || p.Gateway != "198.18.0.2:4433" {
		t.Fatal("lookup while NATS is away forgot office")
	}
	if err := g1.Announce(ctx, "miranda", Presence{Key: "key-M"}); err != nil {
		t.Fatalf("announce while away: %v", err)
	}
	g1.Seen(ctx, "miranda", DirEntry{TokenID: "tm", LastSeen: 5})

	startNATS(t, dir, portN)
	eventually(t, 15*time.Second, "gateway 2 sees miranda and its directory entry once NATS is back", func() bool {
		p, ok := g2.Lookup("miranda")
		_, inDir := g2.Directory()["miranda"]
		return ok && p.Gateway == "198.18.0.1:4433" && inDir
	})
}

func TestKeyOfRoundTrip(t *testing.T) {
	for _, name := range []string{"miranda", "Office.LAN", "a b/c*>", "ünï"} {
		k := keyOf(name)
		if n, ok := nameOf(k); !ok || n != name {
			t.Errorf("nameOf(keyOf(%q)) = %q %v", name, n, ok)
		}
	}
	if _, ok := nameOf("!!"); ok {
		t.Error("nameOf accepted a key that is not base64")
	}
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

func TestEnrollAcrossGateways(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	ctx := context.Background()
	for _, tc := range []struct {
		g        *gw
		token    string
		uses     int
		key      string
		wantUsed bool
	}{
		{g1, "tok-1", 1, "key-A", false},
		{g2, "tok-1", 1, "key-A", false}, // the same machine on another gateway
		{g2, "tok-1", 1, "key-B", true},  // a copy on another machine
		{g1, "tok-2", 2, "key-A", false},
		{g2, "tok-2", 2, "key-B", false},
		{g1, "tok-2", 2, "key-C", true},
	} {
		err := tc.g.Enroll(ctx, tc.token, tc.uses, time.Now().Add(time.Hour), tc.key)
		if errors.Is(err, ErrTokenUsed) != tc.wantUsed || (err != nil && !tc.wantUsed) {
			t.Fatalf("Enroll(%s, %s) = %v, want used %v", tc.token, tc.key, err, tc.wantUsed)
		}
	}
}

// startNATSCluster runs three embedded nats-servers routed to each other,
// with JetStream (a meta group of three), on loopback.
func startNATSCluster(t *testing.T) []*server.Server {
	t.Helper()
	var ports [3]int
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports[i] = l.Addr().(*net.TCPAddr).Port
		l.Close()
	}
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	var servers []*server.Server
	for i := range 3 {
		s, err := server.NewServer(&server.Options{ServerName: fmt.Sprintf("n%d", i+1), Host: "127.0.0.1", Port: -1,
			JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
			Cluster: server.ClusterOpts{Name: "nlvpn", Host: "127.0.0.1", Port: ports[i]},
			Routes:  server.RoutesFromStr(strings.Join(routes, ","))})
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		t.Cleanup(s.Shutdown)
		servers = append(servers, s)
	}
	for _, s := range servers {
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats-server did not start")
		}
	}
	return servers
}

// With three NATS servers (buckets of three replicas), one may die: the
// gateways on it move to another, and addresses, presence and the
// directory carry on.
func TestOneNATSServerDies(t *testing.T) {
	servers := startNATSCluster(t)
	var urls []string
	for _, s := range servers {
		urls = append(urls, s.ClientURL())
	}
	all := strings.Join(urls, ",")
	mod := func(c *Config) { c.URLs = strings.Split(all, ","); c.JoinTimeout = 30 * time.Second }
	g1 := join(t, urls[0], "198.18.0.1:4433", mod)
	g2 := join(t, urls[0], "198.18.0.2:4433", mod)
	ctx := context.Background()
	prefix := netip.MustParsePrefix("100.64.0.0/10")
	before, err := g1.Address(ctx, "agent/miranda", prefix)
	if err != nil {
		t.Fatal(err)
	}
	// Kill the server g1 is on.
	var victim *server.Server
	for _, s := range servers {
		if s.ClientURL() == g1.nc.ConnectedUrl() {
			victim = s
		}
	}
	if victim == nil {
		t.Fatalf("gateway 1 on %s, none of %v", g1.nc.ConnectedUrl(), urls)
	}
	start := time.Now()
	victim.Shutdown()
	var a netip.Addr
	eventually(t, 20*time.Second, "gateway 1 binds a new address with one server dead", func() bool {
		a, err = g1.Address(ctx, "agent/ariel", prefix)
		return err == nil
	})
	t.Logf("one of three NATS servers killed: a new address bound after %s", time.Since(start).Round(time.Millisecond))
	if a == before {
		t.Fatalf("ariel got miranda's %s", a)
	}
	if err := g1.Announce(ctx, "ariel", Presence{Key: "key-ariel"}); err != nil {
		t.Fatal(err)
	}
	g1.Seen(ctx, "ariel", DirEntry{TokenID: "ta", LastSeen: 7})
	// A watch whose consumer was on the dead server is rebuilt after
	// seconds (up to 10 s seen): the bound leaves room for that.
	eventually(t, 30*time.Second, "gateway 2 sees ariel online and in the directory", func() bool {
		_, online := g2.Lookup("ariel")
		_, inDir := g2.Directory()["ariel"]
		return online && inDir
	})
	if b, err := g2.Address(ctx, "agent/ariel", prefix); err != nil || b != a {
		t.Fatalf("gateway 2's address for ariel: %s %v, want %s", b, err, a)
	}
}

// LookupNow answers from NATS what the watch has not delivered yet.
func TestLookupNowAsksNATS(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g := join(t, s.ClientURL(), "198.18.0.1:4433", nil)
	kv := bucketIn(t, s.ClientURL(), bucketPresence)
	// Stop the watches: the cache hears nothing from now on.
	g.stop()
	g.done.Wait()
	if _, err := kv.Put(context.Background(), keyOf("office"), []byte(`{"gateway":"198.18.0.2:4433","key":"k"}`)); err != nil {
		t.Fatal(err)
	}
	if _, ok := g.Lookup("office"); ok {
		t.Fatal("the cache knew office with its watches stopped")
	}
	if p, ok := g.LookupNow(context.Background(), "office"); !ok || p.Gateway != "198.18.0.2:4433" {
		t.Fatalf("LookupNow = %+v %v, want office on 198.18.0.2:4433", p, ok)
	}
	if _, ok := g.LookupNow(context.Background(), "nobody"); ok {
		t.Fatal("LookupNow found an agent nobody announced")
	}
}

// presenceIn reads name's presence straight from NATS.
func presenceIn(t *testing.T, url, name string) (Presence, bool) {
	t.Helper()
	e, err := bucketIn(t, url, bucketPresence).Get(context.Background(), keyOf(name))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Presence{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	var p Presence
	if err := json.Unmarshal(e.Value(), &p); err != nil {
		t.Fatal(err)
	}
	return p, true
}

// A split: gateway A is cut off from NATS while B is not. B takes a name
// with one key; A, not hearing of it, admits the name with another key
// from its cache. When A is back, the claim already in the cluster (B's)
// wins: A is told, lets its agent go, and from then on agrees with B;
// B keeps the name. A name only A took meanwhile stays A's and B learns it.
func TestNameTakenDuringSplit(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	link := clustertest.NewLink(t, s.ClientURL())
	const addrA, addrB = "198.18.0.1:4433", "198.18.0.2:4433"
	gA := join(t, link.URL(), addrA, nil)
	gB := join(t, s.ClientURL(), addrB, nil)
	ctx := context.Background()

	link.Cut()
	eventually(t, 5*time.Second, "gateway A notices it is cut off", func() bool { return !gA.Connected() })
	if err := gB.Announce(ctx, "x", Presence{Key: "key-B"}); err != nil {
		t.Fatalf("gateway B takes x: %v", err)
	}
	for _, name := range []string{"x", "y"} {
		if err := gA.Announce(ctx, name, Presence{Key: "key-A"}); err != nil {
			t.Fatalf("gateway A, cut off, admits %s from its cache: %v", name, err)
		}
	}
	link.Restore()

	eventually(t, 15*time.Second, "gateway A lets x go", func() bool { return len(gA.lostNames()) > 0 })
	eventually(t, 5*time.Second, "gateway A agrees with B on x and B learns y on A", func() bool {
		x, okx := gA.Lookup("x")
		y, oky := gB.Lookup("y")
		return okx && x.Gateway == addrB && x.Key == "key-B" && gA.Online()["x"].Key == "key-B" &&
			oky && y.Gateway == addrA && y.Key == "key-A"
	})
	if l := gA.lostNames(); len(l) != 1 || l[0].name != "x" || l[0].lost.Key != "key-A" || l[0].holder.Gateway != addrB || l[0].holder.Key != "key-B" {
		t.Fatalf("gateway A told %+v, want x lost once, key-A to key-B on %s", l, addrB)
	}
	if n := gA.Stats().NamesLost; n != 1 {
		t.Fatalf("gateway A counted %d names lost, want 1", n)
	}
	// A refreshes y but no longer x: NATS keeps B's claim, B lost nothing.
	if gA.homedHere("x") || !gA.homedHere("y") {
		t.Fatalf("gateway A homes x %v (want false), y %v (want true)", gA.homedHere("x"), gA.homedHere("y"))
	}
	if p, ok := presenceIn(t, s.ClientURL(), "x"); !ok || p.Gateway != addrB || p.Key != "key-B" {
		t.Fatalf("x in NATS: %+v %v, want B's", p, ok)
	}
	if p, ok := gB.Lookup("x"); !ok || p.Gateway != addrB || len(gB.lostNames()) != 0 || !gB.homedHere("x") {
		t.Fatalf("gateway B: x %+v %v, lost %+v; want x kept", p, ok, gB.lostNames())
	}
	// A's agent, reconnecting, is refused as at any registration.
	var held *ErrNameHeld
	if err := gA.Announce(ctx, "x", Presence{Key: "key-A"}); !errors.As(err, &held) || held.Gateway != addrB {
		t.Fatalf("gateway A announcing x again: %v, want held by %s", err, addrB)
	}
}

// NATS itself away: both gateways admit one name with two keys from their
// caches. When NATS is back, exactly one keeps it (the one whose claim
// NATS took first), the other is told, and both agree.
func TestNameTakenTwiceWhileNATSAway(t *testing.T) {
	dir := t.TempDir()
	s := startNATS(t, dir, 0)
	_, p, _ := strings.Cut(s.Addr().String(), ":")
	port, _ := strconv.Atoi(p)
	gws := []*gw{join(t, s.ClientURL(), "198.18.0.1:4433", nil), join(t, s.ClientURL(), "198.18.0.2:4433", nil)}
	ctx := context.Background()
	s.Shutdown()
	for i, g := range gws {
		eventually(t, 5*time.Second, "the gateways notice", func() bool { return !g.Connected() })
		if err := g.Announce(ctx, "x", Presence{Key: fmt.Sprintf("key-%d", i)}); err != nil {
			t.Fatalf("gateway %d admits x while NATS is away: %v", i+1, err)
		}
	}
	startNATS(t, dir, port)
	var winner, loser *gw
	eventually(t, 15*time.Second, "one gateway lets x go", func() bool {
		for i, g := range gws {
			if len(g.lostNames()) > 0 {
				loser, winner = g, gws[1-i]
				return true
			}
		}
		return false
	})
	eventually(t, 5*time.Second, "both gateways see x on the winner", func() bool {
		for _, g := range gws {
			if p, ok := g.Lookup("x"); !ok || p.Gateway != winner.PublicAddr() {
				return false
			}
		}
		return true
	})
	if !winner.homedHere("x") || loser.homedHere("x") || len(winner.lostNames()) != 0 {
		t.Fatalf("winner %s homes x %v, lost %+v; loser homes x %v", winner.PublicAddr(), winner.homedHere("x"), winner.lostNames(), loser.homedHere("x"))
	}
	if l := loser.lostNames(); len(l) != 1 || l[0].holder.Gateway != winner.PublicAddr() {
		t.Fatalf("loser told %+v, want x held by %s", l, winner.PublicAddr())
	}
	if p, ok := presenceIn(t, s.ClientURL(), "x"); !ok || p.Gateway != winner.PublicAddr() {
		t.Fatalf("x in NATS: %+v %v, want the winner's", p, ok)
	}
}

// Gateways with ACME certificates have no pin (nodes verify the chain and
// the name): a cluster of them joins, and a gateway with a pinned
// certificate is refused from it (and the other way round), with an error
// that says why, since the node holding a pin could not verify an ACME
// gateway it is sent to, nor a pinless node a self-signed one.
func TestJoinACMEGateways(t *testing.T) {
	for _, tc := range []struct {
		name, first, second, wantErr string
	}{
		{"both ACME", "", "", ""},
		{"pinned into ACME", "", "pin-1", "ACME"},
		{"ACME into pinned", "pin-1", "", "ACME"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startNATS(t, t.TempDir(), 0)
			join(t, s.ClientURL(), "gw1.example.test:4433", func(c *Config) { c.Pin = tc.first })
			c, err := Join(context.Background(), Config{URLs: []string{s.ClientURL()}, PublicAddr: "gw2.example.test:4433", Pin: tc.second, Authority: "auth-1", JoinTimeout: 5 * time.Second})
			if c != nil {
				c.Close()
			}
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Join: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Join error = %v, want one saying %q", err, tc.wantErr)
			}
			if err != nil {
				t.Logf("refused: %v", err)
			}
		})
	}
}

// enrolledIn says whether the cache of g has key as a use of token id.
func (g *gw) enrolledIn(id, key string) bool {
	g.Cluster.mu.Lock()
	defer g.Cluster.mu.Unlock()
	for _, k := range g.enrolled[keyOf(id)] {
		if k == key {
			return true
		}
	}
	return false
}

// jetStreamIn is JetStream through a connection of the test's own to the
// NATS server at url, closed when the test ends.
func jetStreamIn(t *testing.T, url string, opts ...nats.Option) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// bucketIn opens bucket straight from NATS, as a test's own client.
func bucketIn(t *testing.T, url, bucket string) jetstream.KeyValue {
	t.Helper()
	kv, err := jetStreamIn(t, url).KeyValue(context.Background(), bucket)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func inBucket(t *testing.T, kv jetstream.KeyValue, key string) bool {
	t.Helper()
	_, err := kv.Get(context.Background(), key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

// An enrolment goes from NATS and from every gateway's cache once its
// token expired (plus the grace, a millisecond here); one of a token
// still valid stays.
func TestEnrollmentsExpireWithToken(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	short := func(c *Config) { c.EnrollGrace = time.Millisecond }
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", short)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", short)
	ctx := context.Background()
	expires := time.Now().Add(time.Second)
	if err := g1.Enroll(ctx, "tok-short", 1, expires, "key-A"); err != nil {
		t.Fatal(err)
	}
	if err := g1.Enroll(ctx, "tok-long", 1, time.Now().Add(time.Hour), "key-B"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "gateway 2 caches both enrolments", func() bool {
		return g2.enrolledIn("tok-short", "key-A") && g2.enrolledIn("tok-long", "key-B")
	})
	kv := bucketIn(t, s.ClientURL(), bucketEnrollments)
	shortKey, longKey := keyOf("tok-short")+".0", keyOf("tok-long")+".0"
	eventually(t, 10*time.Second, "the expired token's enrolment gone from NATS", func() bool { return !inBucket(t, kv, shortKey) })
	t.Logf("enrolment gone from NATS %s after its token expired (grace 1 ms)", time.Since(expires).Round(time.Millisecond))
	for i, g := range []*gw{g1, g2} {
		eventually(t, 2*time.Second, fmt.Sprintf("gateway %d's cache drops it", i+1), func() bool { return !g.enrolledIn("tok-short", "key-A") })
		if !g.enrolledIn("tok-long", "key-B") {
			t.Fatalf("gateway %d forgot the enrolment of a valid token", i+1)
		}
		if n := g.Stats().EnrollmentsExpired; n != 1 {
			t.Fatalf("gateway %d: EnrollmentsExpired = %d, want 1", i+1, n)
		}
	}
	if !inBucket(t, kv, longKey) {
		t.Fatal("the valid token's enrolment is gone from NATS")
	}
	// Still one machine per token: a copy of the valid one is refused.
	if err := g2.Enroll(ctx, "tok-long", 1, time.Now().Add(time.Hour), "key-C"); !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("a copied valid token: Enroll = %v, want ErrTokenUsed", err)
	}
}

// A bucket of enrolments made by the previous build (no per-key TTL) is
// upgraded in place: what it held stays (the token it names is still
// used up), and new enrolments expire.
func TestEnrollmentBucketUpgraded(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	js := jetStreamIn(t, s.ClientURL())
	ctx := context.Background()
	old, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketEnrollments, MaxValueSize: maxValue, Storage: jetstream.FileStorage, Replicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	oldKey := keyOf("tok-old") + ".0"
	if _, err := old.Create(ctx, oldKey, []byte("key-A")); err != nil {
		t.Fatal(err)
	}
	before, _ := old.Status(ctx)
	if before.LimitMarkerTTL() != 0 {
		t.Fatal("the previous build's bucket should have no TTL markers")
	}

	g := join(t, s.ClientURL(), "198.18.0.1:4433", func(c *Config) { c.EnrollGrace = time.Millisecond })
	after, err := old.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.LimitMarkerTTL() != enrollMarkerTTL || after.Values() != before.Values() {
		t.Fatalf("bucket after Join: marker TTL %s, %d values; want %s and the %d it had", after.LimitMarkerTTL(), after.Values(), enrollMarkerTTL, before.Values())
	}
	if err := g.Enroll(ctx, "tok-old", 1, time.Now().Add(time.Hour), "key-B"); !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("a token the old bucket has as used: Enroll = %v, want ErrTokenUsed", err)
	}
	if err := g.Enroll(ctx, "tok-new", 1, time.Now().Add(time.Second), "key-C"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the new short enrolment expires", func() bool { return !inBucket(t, old, keyOf("tok-new")+".0") })
	if !inBucket(t, old, oldKey) {
		t.Fatal("the old entry is gone")
	}
	// A second gateway opens the upgraded bucket as it is.
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	if !g2.enrollTTL.Load() || !g2.enrolledIn("tok-old", "key-A") {
		t.Fatalf("second gateway: TTLs %v, old enrolment cached %v", g2.enrollTTL.Load(), g2.enrolledIn("tok-old", "key-A"))
	}
}

// The directory prune: an agent whose token expired more than
// DirectoryGrace ago and that has not been seen since goes from NATS and
// every gateway's directory; one online, one with a valid token, and one
// seen lately stay. Two gateways prune at once, and delete it once.
func TestDirectoryPruned(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	fast := func(c *Config) { c.PruneInterval = 50 * time.Millisecond }
	g1 := join(t, s.ClientURL(), "198.18.0.1:4433", fast)
	g2 := join(t, s.ClientURL(), "198.18.0.2:4433", fast)
	ctx := context.Background()
	now := time.Now()
	longAgo := now.Add(-DirectoryGrace - time.Hour).Unix()
	if err := g2.Announce(ctx, "online", Presence{Key: "k-online"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "gateway 1 sees the agent online", func() bool { _, ok := g1.Lookup("online"); return ok })
	// The keepers first: the pass that deletes "gone" has read them too.
	for name, d := range map[string]DirEntry{
		"online": {TokenID: "t1", LastSeen: longAgo, Expires: longAgo},
		"valid":  {TokenID: "t2", LastSeen: longAgo, Expires: now.Add(time.Hour).Unix()},
		"lately": {TokenID: "t3", LastSeen: now.Add(-time.Hour).Unix(), Expires: longAgo},
	} {
		g1.Seen(ctx, name, d)
	}
	g2.Seen(ctx, "gone", DirEntry{TokenID: "t4", LastSeen: longAgo, Expires: longAgo})
	kv := bucketIn(t, s.ClientURL(), bucketDirectory)
	eventually(t, 5*time.Second, "the stale entry gone from NATS", func() bool { return !inBucket(t, kv, keyOf("gone")) })
	for i, g := range []*gw{g1, g2} {
		eventually(t, 2*time.Second, fmt.Sprintf("gateway %d's directory drops it", i+1), func() bool { _, ok := g.Directory()["gone"]; return !ok })
	}
	for _, name := range []string{"online", "valid", "lately"} {
		if !inBucket(t, kv, keyOf(name)) {
			t.Fatalf("%s pruned", name)
		}
		for i, g := range []*gw{g1, g2} {
			if _, ok := g.Directory()[name]; !ok {
				t.Fatalf("%s gone from gateway %d's directory", name, i+1)
			}
		}
	}
	if n := g1.Stats().DirectoryPruned + g2.Stats().DirectoryPruned; n != 1 {
		t.Fatalf("DirectoryPruned summed over the gateways = %d, want 1", n)
	}
}

// A prune pass never deletes an entry written again after it judged it:
// the agent came back (with a new token) through another gateway.
func TestDirectoryPruneSparesFreshWrite(t *testing.T) {
	s := startNATS(t, t.TempDir(), 0)
	g := join(t, s.ClientURL(), "198.18.0.1:4433", nil) // default interval: no pass of its own here
	ctx := context.Background()
	longAgo := time.Now().Add(-DirectoryGrace - time.Hour).Unix()
	g.Seen(ctx, "back", DirEntry{TokenID: "t1", LastSeen: longAgo, Expires: longAgo})
	vs, err := g.staleEntries(ctx, time.Now())
	if err != nil || len(vs) != 1 || vs[0].name != "back" {
		t.Fatalf("staleEntries = %+v %v, want back", vs, err)
	}
	fresh := DirEntry{TokenID: "t2", LastSeen: time.Now().Unix(), Expires: time.Now().Add(time.Hour).Unix()}
	other := join(t, s.ClientURL(), "198.18.0.2:4433", nil)
	other.Seen(ctx, "back", fresh)
	if err := g.deleteStale(ctx, vs); err != nil {
		t.Fatal(err)
	}
	kv := bucketIn(t, s.ClientURL(), bucketDirectory)
	if !inBucket(t, kv, keyOf("back")) || g.Stats().DirectoryPruned != 0 {
		t.Fatalf("the entry written again was pruned (pruned %d)", g.Stats().DirectoryPruned)
	}
	eventually(t, 2*time.Second, "the directory has the fresh entry", func() bool { return g.Directory()["back"].TokenID == "t2" })
}

// A NATS user not allowed to change streams cannot upgrade an old
// enrolment bucket: the gateway joins anyway, says so, and enrols as the
// previous build did (no TTL, nothing lost).
func TestEnrollmentBucketUpgradeRefused(t *testing.T) {
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: []*server.User{
			{Username: "admin", Password: "a"},
			{Username: "gw", Password: "g", Permissions: &server.Permissions{Publish: &server.SubjectPermission{Allow: []string{">"}, Deny: []string{"$JS.API.STREAM.UPDATE.>"}}}},
		}})
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server did not start")
	}
	t.Cleanup(s.Shutdown)
	js := jetStreamIn(t, s.ClientURL(), nats.UserInfo("admin", "a"))
	ctx := context.Background()
	old, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucketEnrollments, MaxValueSize: maxValue, Storage: jetstream.FileStorage, Replicas: 1})
	if err != nil {
		t.Fatal(err)
	}
	creds := t.TempDir() + "/creds"
	if err := writeFile(creds, "gw:g"); err != nil {
		t.Fatal(err)
	}
	g := join(t, s.ClientURL(), "198.18.0.1:4433", func(c *Config) { c.Creds = creds })
	if g.enrollTTL.Load() {
		t.Fatal("the gateway believes the bucket takes TTLs")
	}
	if err := g.Enroll(ctx, "tok", 1, time.Now().Add(time.Hour), "key-A"); err != nil {
		t.Fatalf("Enroll on the old bucket: %v", err)
	}
	if !inBucket(t, old, keyOf("tok")+".0") {
		t.Fatal("enrolment not in NATS")
	}
}
