package cluster

import (
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// entry is a KeyValueEntry as a hostile NATS could deliver it.
type entry struct {
	bucket, key string
	value       []byte
	op          jetstream.KeyValueOp
}

func (e entry) Bucket() string                  { return e.bucket }
func (e entry) Key() string                     { return e.key }
func (e entry) Value() []byte                   { return e.value }
func (e entry) Revision() uint64                { return 1 }
func (e entry) Created() time.Time              { return time.Now() }
func (e entry) Delta() uint64                   { return 0 }
func (e entry) Operation() jetstream.KeyValueOp { return e.op }

// FuzzApply feeds whatever a hostile NATS or gateway could put into the
// buckets through the watches' parsers: no panic, and nothing outside
// the bounds is cached.
func FuzzApply(f *testing.F) {
	f.Add(uint8(0), "bWlyYW5kYQ", []byte(`{"gateway":"198.18.1.2:4433","key":"k","advertise":["10.0.0.0/8"]}`), false)
	f.Add(uint8(1), "s.YWdlbnQvbWlyYW5kYQ", []byte("100.64.0.2"), false)
	f.Add(uint8(1), "a.100-64-0-2", []byte("agent/miranda"), true)
	f.Add(uint8(2), "b2ZmaWNl", []byte(`{"advertise":["192.168.1.0/24"],"last_seen":5}`), false)
	f.Add(uint8(3), "list", []byte("serial:1"), false)
	f.Add(uint8(4), "dG9r.0", []byte("ed25519:abc"), false)
	f.Fuzz(func(t *testing.T, which uint8, key string, value []byte, del bool) {
		var revoc []string
		// miranda is homed here, so a presence for it elsewhere takes
		// the path that lets it go.
		c := &Cluster{log: slog.New(slog.NewTextHandler(io.Discard, nil)), ttl: time.Minute, cfg: Config{PublicAddr: "198.18.1.2:4433",
			OnRevocations: func(s string) { revoc = append(revoc, s) }},
			presence: map[string]presenceSeen{}, slots: map[string]netip.Addr{}, owners: map[netip.Addr]string{},
			dir: map[string]DirEntry{}, local: map[string]homed{"miranda": {Presence: Presence{Gateway: "198.18.1.2:4433", Key: "k0"}}}, dirty: map[string]DirEntry{}, enrolled: map[string]map[string]string{}}
		op := jetstream.KeyValuePut
		if del {
			op = jetstream.KeyValueDelete
		}
		e := entry{key: key, value: value, op: op}
		switch which % 5 {
		case 0:
			c.applyPresence(e)
		case 1:
			c.applyOverlay(e)
		case 2:
			c.applyDirectory(e)
		case 3:
			c.applyRevocations(e)
		case 4:
			c.applyEnrollment(e)
		}
		for _, p := range c.presence {
			if p.Gateway == "" || len(p.Advertise) > MaxAdvertise {
				t.Fatalf("cached presence %+v", p)
			}
		}
		for _, d := range c.dir {
			if len(d.Advertise) > MaxAdvertise {
				t.Fatalf("cached directory entry with %d prefixes", len(d.Advertise))
			}
		}
		for _, a := range c.slots {
			if !a.IsValid() {
				t.Fatal("cached an invalid address")
			}
		}
		for _, r := range revoc {
			if len(r) > maxRevocValue {
				t.Fatal("passed on an oversized revocation list")
			}
		}
	})
}
