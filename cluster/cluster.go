// Package cluster is the state that the gateways of one network share
// through NATS JetStream key-value buckets: which gateway each agent is
// on (presence), the overlay addresses (unique across the cluster), the
// directory of agents for `nlvpn agents`, and the authority's signed
// revocation list. We build no consensus of our own: JetStream does that.
//
// What lies in NATS is only what a gateway may be trusted with; nothing
// there opens a tunnel. Whatever admits or revokes is signed by the
// authority and verified by each gateway itself (the revocation list); the
// rest (presence, directory, addresses) is the gateways' word, as it is on
// one gateway today. Every map fed from NATS is bounded, and a hit bound
// is counted (Stats), so a hostile NATS or gateway cannot make a gateway
// hold unbounded memory.
//
// Reads come from local caches that watches keep current, so a lookup
// costs no round trip and works while NATS is away (the last state seen);
// writes that fail while NATS is away are retried when it is back.
package cluster

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The buckets, one per kind of state: their limits differ.
const (
	bucketMeta        = "nlvpn_meta"        // the cluster's pin and authority
	bucketPresence    = "nlvpn_presence"    // agent name -> the gateway it is on (TTL)
	bucketOverlay     = "nlvpn_overlay"     // s.<slot> -> address, a.<address> -> slot
	bucketDirectory   = "nlvpn_directory"   // agent name -> subnets, last seen
	bucketRevocations = "nlvpn_revocations" // "list" -> the authority's signed list
	bucketEnrollments = "nlvpn_enrollments" // <token ID>.<use> -> the node key that used it
)

// Bounds on what the caches hold from NATS. Past one, new keys are not
// cached and Stats.Dropped counts them.
const (
	MaxPresence   = 1 << 16 // agents online across the cluster
	MaxAddresses  = 1 << 18 // overlay address bindings (slots)
	MaxDirectory  = 4096    // as a standalone gateway's directory
	MaxAdvertise  = 256     // prefixes one agent may advertise
	MaxEnrolled   = 100000  // tokens whose machines are cached
	MaxUses       = 64      // machines one token may enroll, as checked here
	maxValue      = 8 << 10 // one presence, directory or address value
	maxRevocValue = 1 << 20 // the signed revocation list
	claimAttempts = 64      // addresses tried for one new slot
)

// DefaultPresenceTTL is how long an agent's presence lasts without a
// refresh from its gateway: three refreshes, so a dead gateway's agents are
// gone from every other gateway within it.
const DefaultPresenceTTL = 15 * time.Second

// DefaultEnrollGrace is how long an enrolment stays in NATS past its
// token's expiry: the gateway refuses an expired token anyway, the hour is
// for clocks that disagree (a gateway behind would still admit the token,
// and must still see who used it).
const DefaultEnrollGrace = time.Hour

// enrollMarkerTTL is how long NATS keeps the marker of an enrolment that
// expired: a watch that starts again within it (NATS away, a server gone)
// still hears of the expiry and drops the entry from its cache.
const enrollMarkerTTL = 24 * time.Hour

// DirectoryGrace is how long past its token's expiry, and past when it was
// last seen, an offline agent stays in the cluster's directory. `nlvpn
// agents` shows no agent whose token expired (as a standalone gateway), so
// the entry serves nobody then; the week leaves it for an operator to look
// at, and an agent that comes back with a new token writes a new one.
const DirectoryGrace = 7 * 24 * time.Hour

// DefaultPruneInterval is how often each gateway looks for directory
// entries past DirectoryGrace. Every gateway does (no leader to elect):
// a delete is conditional on the revision read, so two passes at once, or
// a pass meeting a fresh write, delete nothing they should not.
const DefaultPruneInterval = time.Hour

// opTimeout bounds one round trip to NATS.
const opTimeout = 3 * time.Second

// ErrUnavailable says NATS is away and the answer is not in the cache.
var ErrUnavailable = errors.New("the cluster (NATS) is unreachable and this is not known locally")

// Config configures a Cluster.
type Config struct {
	// URLs are the NATS servers, e.g. nats://nats-1:4222.
	URLs []string
	// Creds is a file with the credentials for NATS: a NATS .creds file
	// (user JWT and nkey seed, as nsc writes it), or one line
	// user:password. Empty: none.
	Creds string
	// PublicAddr is this gateway's address as nodes reach it (HOST:PORT);
	// presence names it.
	PublicAddr string
	// Pin and Authority are checked against the cluster's at Join: every
	// gateway of a cluster shares one gateway key (so one pin) and admits
	// one authority. Pin is empty for a gateway with an ACME certificate;
	// a cluster is all ACME or all pinned.
	Pin, Authority string
	// PresenceTTL defaults to DefaultPresenceTTL; refreshes go out at a
	// third of it.
	PresenceTTL time.Duration
	// Replicas of each bucket when this gateway creates it; 0: three when
	// NATS knows three servers or more, else one.
	Replicas int
	// JoinTimeout bounds the wait for NATS at Join (default 30 s).
	JoinTimeout time.Duration
	// EnrollGrace defaults to DefaultEnrollGrace and PruneInterval to
	// DefaultPruneInterval; tests make them short.
	EnrollGrace, PruneInterval time.Duration
	Log                        *slog.Logger

	// OnRevocations is called with each revocation list that reaches the
	// cluster (signed text, not yet verified: the callee verifies).
	OnRevocations func(signed string)
	// OnMoved is called when an agent homed here shows up on another
	// gateway with the same key: the agent moved, its connection here is
	// stale.
	OnMoved func(name string, p Presence)
	// OnNameLost is called when an agent homed here (lost) finds its name
	// held in the cluster by another gateway with another key (holder):
	// both admitted it while they could not see each other (a NATS split,
	// or this gateway cut off past the presence TTL). The claim already in
	// the cluster wins, as at registration; the agent here is no longer
	// homed and its connection should end.
	OnNameLost func(name string, lost, holder Presence)
	// RevocationSerial verifies a signed list and returns its serial; used
	// to put a list into the cluster only over an older one.
	RevocationSerial func(signed string) (uint64, error)
}

// Presence says which gateway an agent is on.
type Presence struct {
	Gateway   string         `json:"gateway"` // the gateway's public address
	Advertise []netip.Prefix `json:"advertise,omitempty"`
	Key       string         `json:"key"`   // the agent's key (its string form)
	Since     int64          `json:"since"` // unix seconds
}

// DirEntry is what the directory keeps of an agent (see gateway's
// directory): its subnets, when last connected, and enough of its
// credential to forget it once that expired or was revoked.
type DirEntry struct {
	Advertise []netip.Prefix `json:"advertise,omitempty"`
	LastSeen  int64          `json:"last_seen"`
	TokenID   string         `json:"token_id"`
	Issued    int64          `json:"issued"`
	Expires   int64          `json:"expires"`
}

// Stats are the cluster's counters.
type Stats struct {
	Connected bool
	KVOps     uint64 // writes and reads that went to NATS
	KVErrors  uint64 // of those, failed
	Dropped   uint64 // entries from NATS not held: a bound hit, too large, or malformed
	NamesLost uint64 // agents homed here whose name another gateway held with another key (OnNameLost)
	// DirectoryPruned counts the directory entries this gateway deleted
	// (token expired and agent offline for DirectoryGrace);
	// EnrollmentsExpired the enrolments it saw NATS expire (their token's
	// expiry plus EnrollGrace passed) and dropped from its cache.
	DirectoryPruned, EnrollmentsExpired uint64
}

// Cluster is this gateway's link to the cluster.
type Cluster struct {
	cfg  Config
	log  *slog.Logger
	nc   *nats.Conn
	js   jetstream.JetStream
	kvs  map[string]jetstream.KeyValue
	ttl  time.Duration
	stop context.CancelFunc
	done sync.WaitGroup
	kick chan struct{} // a write is pending: flush now
	// rewatch is closed (and replaced) at each reconnect: the watches start
	// anew, since their consumers may be gone with the server we were on.
	rewatch chan struct{}
	closing atomic.Bool
	ready   chan struct{} // closed once every watch delivered its initial values

	connected          atomic.Bool
	ops, errs, dropped atomic.Uint64
	namesLost          atomic.Uint64
	dirPruned          atomic.Uint64
	enrollExpired      atomic.Uint64
	// enrollTTL: the enrolment bucket takes per-key TTLs (made so, or
	// upgraded). Until it does (NATS refused the upgrade: each prune pass
	// tries again), enrolments are written without one, as before, and
	// never expire.
	enrollTTL atomic.Bool

	mu       sync.Mutex
	presence map[string]presenceSeen      // by agent name
	slots    map[string]netip.Addr        // overlay: slot -> address
	owners   map[netip.Addr]string        // overlay: address -> slot
	dir      map[string]DirEntry          // by agent name
	local    map[string]homed             // agents homed here: refreshed
	dirty    map[string]DirEntry          // directory writes not yet in NATS
	revoc    string                       // a signed list not yet in NATS
	enrolled map[string]map[string]string // token ID (keyOf) -> use ("0", "1", ...) -> node key
}

// homed is an agent homed here: its presence, and the revision of this
// gateway's last write of it to NATS (0: none known). A refresh writes
// over that revision only, so it never replaces another gateway's claim.
type homed struct {
	Presence
	rev uint64
	// pending: Announce is writing it now and decides by itself what
	// NATS holds; the watch and refresh leave it alone meanwhile (else
	// the entry of the gateway an agent moves from, seen in that moment,
	// would let go the agent that just moved here).
	pending bool
}

type presenceSeen struct {
	Presence
	at time.Time // when the cache last heard of it
}

// Join connects to NATS, makes the buckets if they are missing, checks
// that the cluster's pin and authority are this gateway's, and starts the
// watches. It returns once the caches hold the cluster's state.
func Join(ctx context.Context, cfg Config) (*Cluster, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if len(cfg.URLs) == 0 {
		return nil, errors.New("no NATS server")
	}
	if cfg.PublicAddr == "" {
		return nil, errors.New("a gateway in a cluster needs its public address (--public-addr): other gateways send nodes there")
	}
	if cfg.PresenceTTL <= 0 {
		cfg.PresenceTTL = DefaultPresenceTTL
	}
	if cfg.JoinTimeout <= 0 {
		cfg.JoinTimeout = 30 * time.Second
	}
	if cfg.EnrollGrace <= 0 {
		cfg.EnrollGrace = DefaultEnrollGrace
	}
	if cfg.PruneInterval <= 0 {
		cfg.PruneInterval = DefaultPruneInterval
	}
	c := &Cluster{cfg: cfg, log: cfg.Log.With("cluster", strings.Join(cfg.URLs, ",")), ttl: cfg.PresenceTTL,
		kvs: map[string]jetstream.KeyValue{}, kick: make(chan struct{}, 1), ready: make(chan struct{}), rewatch: make(chan struct{}),
		presence: map[string]presenceSeen{}, slots: map[string]netip.Addr{}, owners: map[netip.Addr]string{},
		dir: map[string]DirEntry{}, local: map[string]homed{}, dirty: map[string]DirEntry{}, enrolled: map[string]map[string]string{}}
	opts := []nats.Option{
		nats.Name("nlvpn gateway " + cfg.PublicAddr),
		nats.MaxReconnects(-1), // forever: the gateway serves on meanwhile
		nats.ReconnectWait(time.Second),
		nats.Timeout(opTimeout),
		// A link that silently stops passing packets is noticed within
		// about three pings (the default is two minutes each).
		nats.PingInterval(2 * time.Second),
		nats.MaxPingsOutstanding(3),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if c.connected.Swap(false) && !c.closing.Load() {
				c.log.Warn("cluster unreachable; serving the sessions we have and the nodes we know until it is back", "err", err)
			}
		}),
		// Asynchronous errors (a watch's consumer gone with a server):
		// the watches recover by themselves; the default handler would
		// print them on stderr.
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			c.log.Debug("cluster: asynchronous NATS error", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			if !c.connected.Swap(true) {
				c.log.Info("cluster reachable again; catching up", "server", nc.ConnectedUrlRedacted())
			}
			c.mu.Lock()
			close(c.rewatch)
			c.rewatch = make(chan struct{})
			c.mu.Unlock()
			c.kickFlush()
		}),
	}
	auth, err := credsOption(cfg.Creds)
	if err != nil {
		return nil, err
	}
	if auth != nil {
		opts = append(opts, auth)
	}
	jctx, cancel := context.WithTimeout(ctx, cfg.JoinTimeout)
	defer cancel()
	for {
		c.nc, err = nats.Connect(strings.Join(cfg.URLs, ","), opts...)
		if err == nil {
			break
		}
		select {
		case <-jctx.Done():
			return nil, fmt.Errorf("cluster: cannot reach NATS at %s: %w", strings.Join(cfg.URLs, ","), err)
		case <-time.After(time.Second):
		}
	}
	c.connected.Store(true)
	fail := func(err error) (*Cluster, error) {
		c.closing.Store(true)
		c.nc.Close()
		return nil, err
	}
	if c.js, err = jetstream.New(c.nc); err != nil {
		return fail(err)
	}
	// A JetStream cluster that has just started takes a moment to elect
	// its meta leader: retry until the join's deadline.
	for logged := false; ; {
		actx, acancel := context.WithTimeout(jctx, opTimeout)
		err := c.openBuckets(actx)
		acancel()
		if err == nil {
			break
		}
		if !logged {
			c.log.Info("waiting for JetStream", "err", err)
			logged = true
		}
		select {
		case <-jctx.Done():
			return fail(fmt.Errorf("cluster: %w", err))
		case <-time.After(time.Second):
		}
	}
	if err := c.checkMeta(jctx); err != nil {
		return fail(err)
	}
	wctx, stop := context.WithCancel(context.Background())
	c.stop = stop
	var initial sync.WaitGroup
	for _, w := range []struct {
		bucket string
		apply  func(jetstream.KeyValueEntry)
	}{{bucketPresence, c.applyPresence}, {bucketOverlay, c.applyOverlay}, {bucketDirectory, c.applyDirectory},
		{bucketRevocations, c.applyRevocations}, {bucketEnrollments, c.applyEnrollment}} {
		initial.Add(1)
		c.done.Add(1)
		go func() {
			defer c.done.Done()
			c.watch(wctx, c.kvs[w.bucket], w.apply, initial.Done)
		}()
	}
	c.done.Add(1)
	go func() { defer c.done.Done(); c.refresh(wctx) }()
	c.done.Add(1)
	go func() { defer c.done.Done(); c.pruneLoop(wctx) }()
	caught := make(chan struct{})
	go func() { initial.Wait(); close(caught) }()
	select {
	case <-caught:
	case <-jctx.Done():
		c.Close()
		return nil, errors.New("cluster: the buckets' contents did not arrive in time")
	}
	close(c.ready)
	c.log.Info("joined the cluster", "server", c.nc.ConnectedUrlRedacted(), "agents_online", c.onlineCount())
	return c, nil
}

// credsOption reads the credentials file: a NATS .creds file, or one line
// user:password.
func credsOption(path string) (nats.Option, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster credentials: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if strings.Contains(s, "BEGIN NATS USER JWT") {
		return nats.UserCredentials(path), nil
	}
	user, pass, ok := strings.Cut(s, ":")
	if !ok || user == "" || strings.ContainsAny(s, "\n") {
		return nil, fmt.Errorf("cluster credentials %s: want a NATS .creds file or one line user:password", path)
	}
	return nats.UserInfo(user, pass), nil
}

// openBuckets opens the buckets, making those that are missing.
func (c *Cluster) openBuckets(ctx context.Context) error {
	replicas := c.cfg.Replicas
	if replicas <= 0 {
		replicas = 1
		if len(c.nc.Servers()) >= 3 {
			replicas = 3
		}
	}
	for _, b := range []jetstream.KeyValueConfig{
		{Bucket: bucketMeta, MaxValueSize: maxValue},
		// Presence expires on its own when its gateway stops refreshing;
		// the markers tell the watches.
		{Bucket: bucketPresence, MaxValueSize: maxValue, TTL: c.ttl, LimitMarkerTTL: c.ttl},
		{Bucket: bucketOverlay, MaxValueSize: maxValue},
		{Bucket: bucketDirectory, MaxValueSize: maxValue},
		{Bucket: bucketRevocations, MaxValueSize: maxRevocValue},
		// An enrolment expires by itself after its token (Enroll gives it
		// a TTL); the markers tell the watches.
		{Bucket: bucketEnrollments, MaxValueSize: maxValue, LimitMarkerTTL: enrollMarkerTTL},
	} {
		b.Storage = jetstream.FileStorage
		b.Replicas = replicas
		kv, err := c.js.KeyValue(ctx, b.Bucket)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			kv, err = c.js.CreateKeyValue(ctx, b)
			if errors.Is(err, jetstream.ErrBucketExists) {
				kv, err = c.js.KeyValue(ctx, b.Bucket) // another gateway was quicker
			}
		}
		if err != nil {
			return fmt.Errorf("bucket %s: %w", b.Bucket, err)
		}
		c.kvs[b.Bucket] = kv
		if b.Bucket == bucketEnrollments {
			if err := c.allowKeyTTL(ctx); err != nil {
				c.log.Warn("the enrolment bucket, made by an older gateway, could not be upgraded for per-key TTLs; enrolments will not expire until it is (retried every prune interval)",
					"bucket", b.Bucket, "err", err)
			}
		}
	}
	return nil
}

// allowKeyTTL upgrades in place an enrolment bucket made by an older
// gateway, without per-key TTLs: its stream is updated (the entries kept),
// never made anew. Entries written before have no TTL and stay, as they
// did. The update needs a NATS user allowed to change streams.
func (c *Cluster) allowKeyTTL(ctx context.Context) error {
	kv := c.kvs[bucketEnrollments]
	st, err := kv.Status(ctx)
	if c.kv(err) != nil {
		return err
	}
	if st.LimitMarkerTTL() > 0 {
		c.enrollTTL.Store(true)
		return nil
	}
	s, err := c.js.Stream(ctx, "KV_"+kv.Bucket())
	if c.kv(err) != nil {
		return err
	}
	cfg := s.CachedInfo().Config
	cfg.AllowMsgTTL = true
	cfg.SubjectDeleteMarkerTTL = enrollMarkerTTL
	// Two gateways upgrading at once make the same change: no harm.
	if _, err := c.js.UpdateStream(ctx, cfg); c.kv(err) != nil {
		return err
	}
	c.log.Info("enrolment bucket upgraded in place: enrolments now expire after their token", "bucket", kv.Bucket())
	c.enrollTTL.Store(true)
	return nil
}

// checkMeta stores this gateway's pin and authority if the cluster has
// none yet, else refuses to join a cluster whose differ: one pin in a
// token must verify every gateway of the network.
func (c *Cluster) checkMeta(ctx context.Context) error {
	kv := c.kvs[bucketMeta]
	for _, m := range []struct{ key, mine, what, fix string }{
		{"pin", c.cfg.Pin, "gateway pin", "every gateway of a cluster uses the same gateway key: copy STATE-DIR/gateway.key from the first gateway"},
		{"authority", c.cfg.Authority, "authority", "every gateway of a cluster admits the same authority (--authority, or authority.key in the state directory)"},
	} {
		_, err := kv.Create(ctx, m.key, []byte(m.mine))
		if err == nil || !errors.Is(err, jetstream.ErrKeyExists) {
			if err != nil {
				return fmt.Errorf("cluster: storing the %s: %w", m.what, err)
			}
			continue
		}
		e, err := kv.Get(ctx, m.key)
		if err != nil {
			return fmt.Errorf("cluster: reading the %s: %w", m.what, err)
		}
		if theirs := string(e.Value()); theirs != m.mine {
			if m.key == "pin" && (theirs == "" || m.mine == "") {
				// An ACME gateway has no pin. Mixed, a node holding the pin
				// could not verify an ACME gateway it is sent to, nor a
				// pinless node a self-signed one: the same key would not help.
				return fmt.Errorf("cluster: this gateway has %s and the cluster's gateways have %s; either every gateway of a cluster gets its certificate by ACME (--acme-domain) or none does",
					certKind(m.mine), certKind(theirs))
			}
			return fmt.Errorf("cluster: this gateway's %s %q differs from the cluster's %q; %s", m.what, m.mine, theirs, m.fix)
		}
	}
	return nil
}

// certKind names a gateway's certificate by its pin, for checkMeta.
func certKind(pin string) string {
	if pin == "" {
		return "an ACME certificate (no pin)"
	}
	return fmt.Sprintf("a pinned certificate (pin %q)", pin)
}

// Close leaves the cluster: the agents homed here are withdrawn (their
// presence goes at once instead of at its TTL).
func (c *Cluster) Close() {
	c.closing.Store(true)
	c.mu.Lock()
	names := make([]string, 0, len(c.local))
	for n := range c.local {
		names = append(names, n)
	}
	c.mu.Unlock()
	if c.connected.Load() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		for _, n := range names {
			c.withdraw(ctx, n)
		}
		cancel()
	}
	if c.stop != nil {
		c.stop()
	}
	c.nc.Close()
	c.done.Wait()
}

// Connected reports whether NATS is reachable now.
func (c *Cluster) Connected() bool { return c.connected.Load() && c.nc.IsConnected() }

// Stats reads the counters.
func (c *Cluster) Stats() Stats {
	return Stats{Connected: c.Connected(), KVOps: c.ops.Load(), KVErrors: c.errs.Load(), Dropped: c.dropped.Load(), NamesLost: c.namesLost.Load(),
		DirectoryPruned: c.dirPruned.Load(), EnrollmentsExpired: c.enrollExpired.Load()}
}

// PublicAddr is this gateway's address in presence entries.
func (c *Cluster) PublicAddr() string { return c.cfg.PublicAddr }

// kv runs one operation against NATS, counting it.
func (c *Cluster) kv(err error) error {
	c.ops.Add(1)
	if err != nil && !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyNotFound) && !isWrongRevision(err) {
		c.errs.Add(1)
	}
	return err
}

func (c *Cluster) kickFlush() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// keyOf is a name as a KV key: names may hold characters keys may not.
func keyOf(name string) string { return base64.RawURLEncoding.EncodeToString([]byte(name)) }

func nameOf(key string) (string, bool) {
	b, err := base64.RawURLEncoding.DecodeString(key)
	return string(b), err == nil && len(b) > 0
}

// watch keeps one bucket's cache current until ctx ends, starting again if
// the watch ends (NATS gone long enough for its consumer to go).
func (c *Cluster) watch(ctx context.Context, kv jetstream.KeyValue, apply func(jetstream.KeyValueEntry), initialDone func()) {
	first := true
	for ctx.Err() == nil {
		c.mu.Lock()
		rewatch := c.rewatch
		c.mu.Unlock()
		w, err := kv.WatchAll(ctx)
		if err != nil {
			c.kv(err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
	read:
		for {
			select {
			case e, ok := <-w.Updates():
				if !ok {
					break read
				}
				if e == nil {
					if first {
						first = false
						initialDone()
					}
					continue
				}
				apply(e)
			case <-rewatch:
				break read
			case <-ctx.Done():
				break read
			}
		}
		w.Stop()
	}
}

func deleted(e jetstream.KeyValueEntry) bool {
	return e.Operation() == jetstream.KeyValueDelete || e.Operation() == jetstream.KeyValuePurge
}

// decode parses a value from NATS, counting what does not fit.
func (c *Cluster) decode(e jetstream.KeyValueEntry, v any) bool {
	if len(e.Value()) > maxValue || json.Unmarshal(e.Value(), v) != nil {
		c.dropped.Add(1)
		c.log.Debug("malformed entry from the cluster ignored", "bucket", e.Bucket(), "key", e.Key())
		return false
	}
	return true
}

// --- presence ---

func (c *Cluster) applyPresence(e jetstream.KeyValueEntry) {
	name, ok := nameOf(e.Key())
	if !ok {
		c.dropped.Add(1)
		return
	}
	if deleted(e) {
		c.mu.Lock()
		delete(c.presence, name)
		c.mu.Unlock()
		return
	}
	var p Presence
	if !c.decode(e, &p) {
		return
	}
	if p.Gateway == "" || len(p.Advertise) > MaxAdvertise {
		c.dropped.Add(1)
		return
	}
	c.mu.Lock()
	if _, known := c.presence[name]; !known && len(c.presence) >= MaxPresence {
		c.mu.Unlock()
		c.dropped.Add(1)
		return
	}
	c.presence[name] = presenceSeen{Presence: p, at: time.Now()}
	mine, lost := c.local[name]
	switch {
	case !lost || mine.pending:
		lost = false
	case p.Gateway == c.cfg.PublicAddr:
		lost = false
		if p.Key == mine.Key && e.Revision() > mine.rev {
			mine.rev = e.Revision()
			c.local[name] = mine
		}
	case mine.rev != 0 && e.Revision() < mine.rev:
		lost = false // history from a lagging watch: our claim came after it
	case time.Since(e.Created()) >= c.ttl:
		lost = false // stale: its gateway stopped refreshing it
	default:
		// Another gateway holds the name now, fresh: its claim is the
		// cluster's (refresh never writes over one), so ours ends.
		delete(c.local, name)
	}
	c.mu.Unlock()
	if lost {
		c.let(name, mine.Presence, p)
	}
}

// let tells the gateway that the agent homed here as mine is no longer
// (it is out of c.local already): holder, on another gateway, has the
// name. The same key means the agent moved there; another key that the
// name was taken on both sides of a split.
func (c *Cluster) let(name string, mine, holder Presence) {
	if holder.Key == mine.Key {
		if c.cfg.OnMoved != nil {
			c.cfg.OnMoved(name, holder)
		}
		return
	}
	c.namesLost.Add(1)
	c.log.Info("agent name held on another gateway by another key; the cluster's claim wins", "name", name, "key", mine.Key, "gateway", holder.Gateway, "holder_key", holder.Key)
	if c.cfg.OnNameLost != nil {
		c.cfg.OnNameLost(name, mine, holder)
	}
}

// lose ends the claim of the agent homed here under name with key, if it
// is still homed here, because holder has the name in the cluster.
func (c *Cluster) lose(name, key string, holder Presence) {
	c.mu.Lock()
	mine, ok := c.local[name]
	ok = ok && mine.Key == key && !mine.pending
	if ok {
		delete(c.local, name)
		// The cache says what refresh just read, before the gateway hears
		// of it: what it does next (its directory entry, a redirect) must
		// not go by our own claim, which the watch may not have replaced
		// yet.
		if cur, seen := c.presence[name]; !seen || cur.Gateway == c.cfg.PublicAddr {
			c.presence[name] = presenceSeen{Presence: holder, at: time.Now()}
		}
	}
	c.mu.Unlock()
	if ok {
		c.let(name, mine.Presence, holder)
	}
}

// Lookup says where the agent name is online, from the cache: entries not
// refreshed within the TTL are gone (while NATS is away, the last state
// seen stands).
func (c *Cluster) Lookup(name string) (Presence, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.presence[name]
	if !ok || (c.Connected() && time.Since(p.at) > c.ttl) {
		return Presence{}, false
	}
	return p.Presence, true
}

// Online lists the agents online on any gateway (the cache).
func (c *Cluster) Online() map[string]Presence {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]Presence, len(c.presence))
	conn := c.Connected()
	for n, p := range c.presence {
		if !conn || time.Since(p.at) <= c.ttl {
			out[n] = p.Presence
		}
	}
	return out
}

// LookupNow is Lookup that, when the cache has no answer, asks NATS (one
// round trip, bounded by opTimeout): a watch can lag by several seconds
// while a NATS server dies and its consumer is rebuilt, and a client's
// connect should not be told an agent is unknown meanwhile.
func (c *Cluster) LookupNow(ctx context.Context, name string) (Presence, bool) {
	if p, ok := c.Lookup(name); ok || !c.Connected() {
		return p, ok
	}
	rctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	e, err := c.kvs[bucketPresence].Get(rctx, keyOf(name))
	if c.kv(err) != nil {
		return Presence{}, false
	}
	var p Presence
	if !c.decode(e, &p) || p.Gateway == "" || len(p.Advertise) > MaxAdvertise || time.Since(e.Created()) > c.ttl {
		return Presence{}, false
	}
	return p, true
}

func (c *Cluster) onlineCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.presence)
}

// ErrNameHeld says the name is online on another gateway under another key.
type ErrNameHeld struct{ Gateway string }

func (e *ErrNameHeld) Error() string {
	return "the agent name is online on gateway " + e.Gateway + " with a different key"
}

// Announce claims the agent name for key on this gateway: refused
// (*ErrNameHeld) while another key holds it online anywhere in the
// cluster, as a standalone gateway refuses a second key. The same key on
// another gateway means the agent moved here: this announcement replaces
// that one. While NATS is away the cache decides and the announcement goes
// out when NATS is back (where a claim made meanwhile on another gateway
// wins: OnNameLost). Presence is refreshed until Withdraw.
func (c *Cluster) Announce(ctx context.Context, name string, p Presence) error {
	p.Gateway = c.cfg.PublicAddr
	if p.Since == 0 {
		p.Since = time.Now().Unix()
	}
	if cur, ok := c.Lookup(name); ok && cur.Key != p.Key {
		return &ErrNameHeld{Gateway: cur.Gateway}
	}
	connected := c.Connected()
	c.mu.Lock()
	c.local[name] = homed{Presence: p, pending: connected}
	c.mu.Unlock()
	if !connected {
		return nil // refresh puts it when NATS is back
	}
	rctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	rev, cur, err := c.claim(rctx, name, p, 0, func(cur Presence) bool { return cur.Key != p.Key })
	switch {
	case cur != nil:
		c.unhome(name, p.Key)
		return &ErrNameHeld{Gateway: cur.Gateway}
	case isWrongRevision(err):
		c.unhome(name, p.Key)
		return &ErrNameHeld{Gateway: "(another gateway, at the same moment)"}
	case err != nil:
		c.wrote(rctx, name, p.Key, 0)
		return nil // NATS trouble: the cache admitted it; refresh retries
	}
	c.wrote(rctx, name, p.Key, rev)
	return nil
}

// claimRaces bounds the writes of one presence lost to other writers in a
// row; past it the claim waits for the next refresh.
const claimRaces = 4

// claim writes p as name's presence unless NATS holds a fresh entry of
// another that yields says wins: that one is returned instead. The write
// creates the key if absent, else updates the revision just read, so two
// gateways never both take a name, and never writes over an entry it has
// not judged. rev, if not 0, is this gateway's last write of it, tried
// first: a refresh costs one round trip while it is still the latest.
// err is a lost race (isWrongRevision) when every try lost one.
func (c *Cluster) claim(ctx context.Context, name string, p Presence, rev uint64, yields func(cur Presence) bool) (uint64, *Presence, error) {
	kv := c.kvs[bucketPresence]
	k := keyOf(name)
	b, _ := json.Marshal(p)
	var err error
	if rev != 0 {
		rev, err = kv.Update(ctx, k, b, rev)
		if c.kv(err) == nil || !isWrongRevision(err) {
			return rev, nil, err
		}
	}
	for range claimRaces {
		var e jetstream.KeyValueEntry
		e, err = kv.Get(ctx, k)
		switch {
		case errors.Is(c.kv(err), jetstream.ErrKeyNotFound): // absent, deleted or expired
			rev, err = kv.Create(ctx, k, b)
		case err != nil:
			return 0, nil, err
		default:
			var cur Presence
			if json.Unmarshal(e.Value(), &cur) == nil && cur.Gateway != "" && time.Since(e.Created()) < c.ttl && yields(cur) {
				return 0, &cur, nil
			}
			rev, err = kv.Update(ctx, k, b, e.Revision())
		}
		if c.kv(err) == nil || !isWrongRevision(err) {
			return rev, nil, err
		}
	}
	return 0, nil, err
}

// isWrongRevision says a write conditional on a revision (or on absence)
// found another: someone else wrote first.
func isWrongRevision(err error) bool {
	var ae *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) ||
		errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// unhome forgets the agent homed here under name with key.
func (c *Cluster) unhome(name, key string) {
	c.mu.Lock()
	if h, ok := c.local[name]; ok && h.Key == key {
		delete(c.local, name)
	}
	c.mu.Unlock()
}

// wrote records rev as this gateway's last write of name's presence for
// key (0: the write failed; refresh tries again), and that the claim is
// settled. If the agent left meanwhile (Withdraw ran before the write
// landed), the presence just written is taken out again.
func (c *Cluster) wrote(ctx context.Context, name, key string, rev uint64) {
	c.mu.Lock()
	h, ok := c.local[name]
	if ok && h.Key == key {
		if rev != 0 {
			h.rev = rev
		}
		h.pending = false
		c.local[name] = h
	}
	c.mu.Unlock()
	if !ok && rev != 0 {
		c.withdraw(ctx, name)
	}
}

// Withdraw says the agent left this gateway (if it is still homed here).
func (c *Cluster) Withdraw(name, key string) {
	c.mu.Lock()
	p, ok := c.local[name]
	if !ok || p.Key != key {
		c.mu.Unlock()
		return
	}
	delete(c.local, name)
	c.mu.Unlock()
	if c.Connected() {
		ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
		c.withdraw(ctx, name)
		cancel()
	}
}

// withdraw deletes the presence if it is still this gateway's.
func (c *Cluster) withdraw(ctx context.Context, name string) {
	kv := c.kvs[bucketPresence]
	e, err := kv.Get(ctx, keyOf(name))
	if c.kv(err) != nil {
		return
	}
	var cur Presence
	if json.Unmarshal(e.Value(), &cur) != nil || cur.Gateway != c.cfg.PublicAddr {
		return
	}
	if c.kv(kv.Delete(ctx, keyOf(name), jetstream.LastRevision(e.Revision()))) == nil {
		// Our own cache need not wait for the watch to hear it.
		c.mu.Lock()
		if cur, ok := c.presence[name]; ok && cur.Gateway == c.cfg.PublicAddr {
			delete(c.presence, name)
		}
		c.mu.Unlock()
	}
}

// refresh puts the presence of the agents homed here every third of the
// TTL, and the writes that failed, until ctx ends. A presence goes over
// this gateway's own last write only: where another gateway holds the name
// now, fresh (it took it while this one could not reach NATS), its claim
// wins and the agent here is let go (OnNameLost, or OnMoved for the same
// key).
func (c *Cluster) refresh(ctx context.Context) {
	t := time.NewTicker(c.ttl / 3)
	defer t.Stop()
	others := func(cur Presence) bool { return cur.Gateway != c.cfg.PublicAddr }
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.kick:
		}
		if !c.Connected() {
			continue
		}
		c.mu.Lock()
		local := maps.Clone(c.local)
		maps.DeleteFunc(local, func(_ string, h homed) bool { return h.pending })
		dirty := c.dirty
		c.dirty = map[string]DirEntry{}
		revoc := c.revoc
		c.revoc = ""
		c.mu.Unlock()
		for n, h := range local {
			rctx, cancel := context.WithTimeout(ctx, opTimeout)
			rev, holder, err := c.claim(rctx, n, h.Presence, h.rev, others)
			switch {
			case holder != nil:
				c.lose(n, h.Key, *holder)
			case err == nil:
				c.wrote(rctx, n, h.Key, rev)
			}
			cancel()
		}
		for n, e := range dirty {
			if err := c.putDirectory(ctx, n, e); err != nil {
				c.mu.Lock()
				if _, newer := c.dirty[n]; !newer {
					c.dirty[n] = e
				}
				c.mu.Unlock()
			}
		}
		if revoc != "" {
			if err := c.PublishRevocations(ctx, revoc); err != nil {
				c.log.Warn("revocation list not yet in the cluster; retrying", "err", err)
			}
		}
	}
}

func putErr(_ uint64, err error) error { return err }

// --- overlay addresses ---

func (c *Cluster) applyOverlay(e jetstream.KeyValueEntry) {
	k := e.Key()
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case strings.HasPrefix(k, "s."):
		slot, ok := nameOf(k[2:])
		a, err := netip.ParseAddr(string(e.Value()))
		if deleted(e) {
			delete(c.slots, slot)
			return
		}
		if !ok || err != nil || len(c.slots) >= MaxAddresses && !c.slots[slot].IsValid() {
			c.dropped.Add(1)
			return
		}
		c.slots[slot] = a
	case strings.HasPrefix(k, "a."):
		a, err := netip.ParseAddr(strings.ReplaceAll(k[2:], "-", "."))
		if err != nil {
			c.dropped.Add(1)
			return
		}
		if deleted(e) {
			delete(c.owners, a)
			return
		}
		if len(c.owners) >= MaxAddresses && c.owners[a] == "" {
			c.dropped.Add(1)
			return
		}
		c.owners[a] = string(e.Value())
	default:
		c.dropped.Add(1)
	}
}

func addrKey(a netip.Addr) string { return "a." + strings.ReplaceAll(a.String(), ".", "-") }

// PeekAddress returns the address bound to slot, from the cache.
func (c *Cluster) PeekAddress(slot string) (netip.Addr, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.slots[slot]
	return a, ok
}

// Address returns the overlay address bound to slot (a name such as
// "agent/miranda"), binding a free one in prefix if there is none: the
// address is claimed with create-if-absent, so two gateways never hand out
// one address, and the binding never changes after. While NATS is away
// only slots already known are answered (ErrUnavailable for the others).
func (c *Cluster) Address(ctx context.Context, slot string, prefix netip.Prefix) (netip.Addr, error) {
	if a, ok := c.PeekAddress(slot); ok {
		return a, nil
	}
	if !c.Connected() {
		return netip.Addr{}, ErrUnavailable
	}
	kv := c.kvs[bucketOverlay]
	rctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
	defer cancel()
	sk := "s." + keyOf(slot)
	if e, err := kv.Get(rctx, sk); c.kv(err) == nil {
		if a, err := netip.ParseAddr(string(e.Value())); err == nil {
			return a, nil
		}
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return netip.Addr{}, err
	}
	// .0 is the network and .1 is kept for a gateway, as standalone.
	a := prefix.Addr().Next().Next()
	for range claimAttempts {
		a = c.nextFree(a, prefix)
		if !a.IsValid() {
			return netip.Addr{}, errors.New("overlay address pool exhausted")
		}
		_, err := kv.Create(rctx, addrKey(a), []byte(slot))
		if c.kv(err) != nil {
			if !errors.Is(err, jetstream.ErrKeyExists) {
				return netip.Addr{}, err
			}
			c.mu.Lock()
			if len(c.owners) < MaxAddresses {
				c.owners[a] = "?" // taken; the watch will say by whom
			}
			c.mu.Unlock()
			a = a.Next()
			continue
		}
		_, err = kv.Create(rctx, sk, []byte(a.String()))
		if c.kv(err) == nil {
			c.mu.Lock()
			c.slots[slot], c.owners[a] = a, slot
			c.mu.Unlock()
			return a, nil
		}
		// Another gateway bound the slot at the same moment: give our
		// address back and take its.
		c.kv(kv.Delete(rctx, addrKey(a)))
		e, gerr := kv.Get(rctx, sk)
		if c.kv(gerr) != nil {
			return netip.Addr{}, err
		}
		return netip.ParseAddr(string(e.Value()))
	}
	return netip.Addr{}, fmt.Errorf("no free overlay address after %d attempts", claimAttempts)
}

// nextFree is the first address from a on that the cache does not know as
// taken, or the invalid address past the prefix.
func (c *Cluster) nextFree(a netip.Addr, prefix netip.Prefix) netip.Addr {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ; prefix.Contains(a); a = a.Next() {
		if _, taken := c.owners[a]; !taken {
			return a
		}
	}
	return netip.Addr{}
}

// --- directory ---

func (c *Cluster) applyDirectory(e jetstream.KeyValueEntry) {
	name, ok := nameOf(e.Key())
	if !ok {
		c.dropped.Add(1)
		return
	}
	if deleted(e) {
		c.mu.Lock()
		delete(c.dir, name)
		c.mu.Unlock()
		return
	}
	var d DirEntry
	if !c.decode(e, &d) {
		return
	}
	if len(d.Advertise) > MaxAdvertise {
		c.dropped.Add(1)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, known := c.dir[name]; !known && len(c.dir) >= MaxDirectory {
		c.dropped.Add(1)
		return
	}
	c.dir[name] = d
}

// Seen records an agent in the cluster's directory (now, or when NATS is
// back).
func (c *Cluster) Seen(ctx context.Context, name string, d DirEntry) {
	d.Advertise = slices.Clone(d.Advertise)
	c.mu.Lock()
	if _, ok := c.dir[name]; ok || len(c.dir) < MaxDirectory {
		c.dir[name] = d
	} else {
		c.dropped.Add(1)
	}
	c.mu.Unlock()
	if c.Connected() && c.putDirectory(ctx, name, d) == nil {
		return
	}
	c.mu.Lock()
	if len(c.dirty) < MaxDirectory {
		c.dirty[name] = d
	} else {
		c.dropped.Add(1)
	}
	c.mu.Unlock()
}

func (c *Cluster) putDirectory(ctx context.Context, name string, d DirEntry) error {
	b, _ := json.Marshal(d)
	rctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	return c.kv(putErr(c.kvs[bucketDirectory].Put(rctx, keyOf(name), b)))
}

// Directory is the cluster's directory of agents (the cache).
func (c *Cluster) Directory() map[string]DirEntry {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]DirEntry, len(c.dir))
	for n, d := range c.dir {
		out[n] = d
	}
	return out
}

// pruneLoop runs pruneDirectory soon after Join, then every
// PruneInterval, until ctx ends.
func (c *Cluster) pruneLoop(ctx context.Context) {
	wait := min(time.Minute, c.cfg.PruneInterval)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = c.cfg.PruneInterval
		if !c.Connected() {
			continue
		}
		if !c.enrollTTL.Load() {
			rctx, cancel := context.WithTimeout(ctx, opTimeout)
			if err := c.allowKeyTTL(rctx); err != nil {
				c.log.Debug("enrolment bucket still without per-key TTLs", "err", err)
			}
			cancel()
		}
		if err := c.pruneDirectory(ctx, time.Now()); err != nil && ctx.Err() == nil {
			c.log.Warn("pruning the cluster's directory", "err", err)
		}
	}
}

// stale says a directory entry is of no use to anyone: its token expired
// and the agent was last seen more than DirectoryGrace ago.
func stale(d DirEntry, now time.Time) bool {
	cut := now.Add(-DirectoryGrace).Unix()
	return d.Expires < cut && d.LastSeen < cut
}

// pruneDirectory deletes from NATS the directory entries that are stale
// and whose agent is not online (here or, by the cache, anywhere).
func (c *Cluster) pruneDirectory(ctx context.Context, now time.Time) error {
	rctx, cancel := context.WithTimeout(ctx, 10*opTimeout)
	defer cancel()
	vs, err := c.staleEntries(rctx, now)
	if err != nil {
		return err
	}
	return c.deleteStale(rctx, vs)
}

// staleEntry is a directory entry to delete: the revision it was judged at.
type staleEntry struct {
	name, key string
	rev       uint64
}

// staleEntries reads the bucket itself, not the cache, which may not hold
// every entry (its bound), and returns those to delete, MaxDirectory at
// most (the next pass takes the rest).
func (c *Cluster) staleEntries(ctx context.Context, now time.Time) ([]staleEntry, error) {
	w, err := c.kvs[bucketDirectory].WatchAll(ctx, jetstream.IgnoreDeletes())
	if c.kv(err) != nil {
		return nil, err
	}
	defer w.Stop()
	var out []staleEntry
	for e := range w.Updates() {
		if e == nil {
			break // the entries there were when the pass began, all read
		}
		name, ok := nameOf(e.Key())
		var d DirEntry
		if !ok || len(e.Value()) > maxValue || json.Unmarshal(e.Value(), &d) != nil || !stale(d, now) {
			continue // not ours to judge (malformed ones the cache counts)
		}
		c.mu.Lock()
		_, homedHere := c.local[name]
		c.mu.Unlock()
		if _, online := c.Lookup(name); online || homedHere {
			continue
		}
		if out = append(out, staleEntry{name, e.Key(), e.Revision()}); len(out) >= MaxDirectory {
			break
		}
	}
	return out, ctx.Err()
}

// deleteStale deletes each entry only if NATS still holds the revision it
// was judged at: an agent that another gateway has written again since
// (it came back) is never deleted, nor counted.
func (c *Cluster) deleteStale(ctx context.Context, vs []staleEntry) error {
	kv := c.kvs[bucketDirectory]
	for _, v := range vs {
		err := c.kv(kv.Delete(ctx, v.key, jetstream.LastRevision(v.rev)))
		switch {
		case isWrongRevision(err):
			continue // written again meanwhile (or pruned by another gateway)
		case err != nil:
			return err
		}
		c.dirPruned.Add(1)
		c.log.Info("agent pruned from the cluster's directory: its token expired and it has been offline since", "name", v.name, "grace", DirectoryGrace)
	}
	return nil
}

// --- revocations ---

const revocKey = "list"

func (c *Cluster) applyRevocations(e jetstream.KeyValueEntry) {
	if e.Key() != revocKey || deleted(e) || len(e.Value()) > maxRevocValue {
		if e.Key() != revocKey || len(e.Value()) > maxRevocValue {
			c.dropped.Add(1)
		}
		return
	}
	if c.cfg.OnRevocations != nil {
		c.cfg.OnRevocations(string(e.Value()))
	}
}

// PublishRevocations puts the signed list into the cluster unless the
// cluster has one with the same serial or a newer one; while NATS is away
// it is kept and put when NATS is back.
func (c *Cluster) PublishRevocations(ctx context.Context, signed string) error {
	if c.cfg.RevocationSerial == nil {
		return errors.New("no way to verify revocation lists")
	}
	serial, err := c.cfg.RevocationSerial(signed)
	if err != nil {
		return err
	}
	later := func() error {
		c.mu.Lock()
		c.revoc = signed
		c.mu.Unlock()
		return nil
	}
	if !c.Connected() {
		return later()
	}
	kv := c.kvs[bucketRevocations]
	rctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	for range 4 { // lost races with other gateways, each with a newer list
		e, err := kv.Get(rctx, revocKey)
		switch {
		case errors.Is(c.kv(err), jetstream.ErrKeyNotFound):
			_, err = kv.Create(rctx, revocKey, []byte(signed))
		case err != nil:
			return later()
		default:
			if cur, verr := c.cfg.RevocationSerial(string(e.Value())); verr == nil && cur >= serial {
				return nil // the cluster's is as new or newer
			}
			_, err = kv.Update(rctx, revocKey, []byte(signed), e.Revision())
		}
		if c.kv(err) == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !isWrongRevision(err) {
			return later()
		}
	}
	return later()
}

// --- enrollments ---

func (c *Cluster) applyEnrollment(e jetstream.KeyValueEntry) {
	id, use, ok := strings.Cut(e.Key(), ".")
	if !ok || len(e.Value()) > maxValue {
		c.dropped.Add(1)
		return
	}
	if deleted(e) {
		// Expired (the token's expiry and grace passed): NATS's marker.
		c.mu.Lock()
		if _, had := c.enrolled[id][use]; had {
			delete(c.enrolled[id], use)
			if len(c.enrolled[id]) == 0 {
				delete(c.enrolled, id)
			}
			c.enrollExpired.Add(1)
		}
		c.mu.Unlock()
		return
	}
	c.addEnrolled(id, use, string(e.Value()))
}

func (c *Cluster) addEnrolled(id, use, key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	uses, known := c.enrolled[id]
	if k, had := uses[use]; had && k == key {
		return
	}
	if _, had := uses[use]; (!known && len(c.enrolled) >= MaxEnrolled) || (!had && len(uses) >= MaxUses) {
		c.dropped.Add(1)
		return
	}
	if !known {
		uses = map[string]string{}
		c.enrolled[id] = uses
	}
	uses[use] = key
}

// ErrTokenUsed says a token enrolled as many other machines as it may.
var ErrTokenUsed = errors.New("token used by as many other machines as it may enroll")

// Enroll records that the node key used the token id, which may enroll
// uses machines and expires at expires, across the cluster: each use is a
// key created only if absent, so two gateways never let one token enroll
// more machines than it may, and a copied token is refused on every
// gateway. The key expires with the token (plus EnrollGrace): a gateway
// refuses an expired token anyway. While NATS is away only a machine
// already known is admitted (ErrUnavailable for a new one).
func (c *Cluster) Enroll(ctx context.Context, id string, uses int, expires time.Time, key string) error {
	uses = max(1, min(uses, MaxUses))
	tk := keyOf(id)
	c.mu.Lock()
	mine, n := false, len(c.enrolled[tk])
	for _, k := range c.enrolled[tk] {
		mine = mine || k == key
	}
	c.mu.Unlock()
	if mine {
		return nil
	}
	if n >= uses {
		return ErrTokenUsed
	}
	if !c.Connected() {
		return ErrUnavailable
	}
	var opts []jetstream.KVCreateOpt
	if c.enrollTTL.Load() && !expires.IsZero() {
		// JetStream counts a TTL in whole seconds, one at least.
		ttl := max(time.Until(expires)+c.cfg.EnrollGrace, time.Second)
		opts = append(opts, jetstream.KeyTTL(ttl.Round(time.Second)))
	}
	kv := c.kvs[bucketEnrollments]
	rctx, cancel := context.WithTimeout(ctx, 2*opTimeout)
	defer cancel()
	for i := range uses {
		use := strconv.Itoa(i)
		k := tk + "." + use
		_, err := kv.Create(rctx, k, []byte(key), opts...)
		if c.kv(err) == nil {
			c.addEnrolled(tk, use, key)
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return err
		}
		e, err := kv.Get(rctx, k)
		if c.kv(err) != nil {
			return err
		}
		if string(e.Value()) == key {
			c.addEnrolled(tk, use, key)
			return nil
		}
	}
	return ErrTokenUsed
}
