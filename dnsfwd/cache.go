package dnsfwd

import (
	"container/list"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Cache bounds and TTL ceilings.
const (
	cacheMaxEntries = 4096
	cacheMaxBytes   = 4 << 20
	// cacheMaxEntryBytes: bigger answers (a TCP answer may have 64 KiB)
	// are not cached.
	cacheMaxEntryBytes = 32 << 10
	// maxTTL: a LAN record changed by its admin is seen within minutes,
	// whatever TTL the zone gives. maxNegativeTTL: a name just added is
	// seen within a minute (RFC 2308 allows hours).
	maxTTL         = 5 * time.Minute
	maxNegativeTTL = time.Minute
	// entryOverhead is what an entry costs besides its message's wire size
	// (key, list element, decoded records), a rough figure for the bound.
	entryOverhead = 256
)

type cacheKey struct {
	name     string // lower case
	typ      dnsmessage.Type
	class    dnsmessage.Class
	dnssecOK bool // a DO query gets RRSIGs that others would not want
	// checkingDisabled: a validating resolver answers a CD query with
	// data it would refuse (SERVFAIL) to others.
	checkingDisabled bool
}

func cacheKeyOf(q *query) cacheKey {
	qq := q.question()
	return cacheKey{name: strings.ToLower(qq.Name.String()), typ: qq.Type, class: qq.Class, dnssecOK: q.dnssecOK,
		checkingDisabled: q.msg.Header.CheckingDisabled}
}

type cacheEntry struct {
	key     cacheKey
	msg     *dnsmessage.Message
	stored  time.Time
	expires time.Time
	size    int
}

// cache holds answers by question, least recently used first out when it
// is over its bounds.
type cache struct {
	mu      sync.Mutex
	entries map[cacheKey]*list.Element // of *cacheEntry
	lru     list.List                  // front: most recently used
	bytes   int
	evicted atomic.Uint64
}

func newCache() *cache { return &cache{entries: make(map[cacheKey]*list.Element)} }

// ttlOf is how long m may be cached: the smallest TTL of its answer and
// authority records, at most maxTTL; for a negative answer (NXDOMAIN,
// NODATA) the SOA's TTL or MINIMUM, whichever is smaller (RFC 2308 §5), at
// most maxNegativeTTL, and not at all without a SOA. Errors (SERVFAIL...)
// and truncated answers are not cached.
func ttlOf(m *dnsmessage.Message) time.Duration {
	if m.Header.Truncated {
		return 0
	}
	negative := m.Header.RCode == dnsmessage.RCodeNameError ||
		(m.Header.RCode == dnsmessage.RCodeSuccess && len(m.Answers) == 0)
	switch {
	case negative:
		for _, r := range m.Authorities {
			if soa, ok := r.Body.(*dnsmessage.SOAResource); ok && r.Header.Type == dnsmessage.TypeSOA {
				ttl := time.Duration(min(r.Header.TTL, soa.MinTTL)) * time.Second
				return min(ttl, maxNegativeTTL)
			}
		}
		return 0
	case m.Header.RCode != dnsmessage.RCodeSuccess:
		return 0
	}
	ttl := maxTTL
	for _, sec := range [][]dnsmessage.Resource{m.Answers, m.Authorities} {
		for _, r := range sec {
			ttl = min(ttl, time.Duration(r.Header.TTL)*time.Second)
		}
	}
	return ttl
}

// put stores m (a resolver's reply, OPT removed) if it may be cached.
func (c *cache) put(key cacheKey, m *dnsmessage.Message, now time.Time) {
	ttl := ttlOf(m)
	if ttl <= 0 {
		return
	}
	// Packed from a copy: Pack writes into the records (the caller
	// still uses m).
	c2 := *m
	c2.Answers, c2.Authorities, c2.Additionals = slices.Clone(m.Answers), slices.Clone(m.Authorities), slices.Clone(m.Additionals)
	packed, err := c2.Pack()
	if err != nil {
		return
	}
	size := len(packed) + entryOverhead
	if size > cacheMaxEntryBytes {
		return // one answer must not push out a big part of the cache
	}
	e := &cacheEntry{key: key, msg: m, stored: now, expires: now.Add(ttl), size: size}
	c.mu.Lock()
	defer c.mu.Unlock()
	if old, ok := c.entries[key]; ok {
		c.remove(old)
	}
	c.entries[key] = c.lru.PushFront(e)
	c.bytes += size
	for len(c.entries) > cacheMaxEntries || c.bytes > cacheMaxBytes {
		c.remove(c.lru.Back())
		c.evicted.Add(1)
	}
}

func (c *cache) remove(el *list.Element) {
	e := el.Value.(*cacheEntry)
	c.lru.Remove(el)
	delete(c.entries, e.key)
	c.bytes -= e.size
}

// get returns a copy of the cached answer for key with its TTLs lowered by
// the time it spent in the cache, or false when there is none or it
// expired.
func (c *cache) get(key cacheKey, now time.Time) (*dnsmessage.Message, bool) {
	c.mu.Lock()
	el, ok := c.entries[key]
	if !ok {
		c.mu.Unlock()
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.remove(el)
		c.mu.Unlock()
		return nil, false
	}
	c.lru.MoveToFront(el)
	c.mu.Unlock()

	age := uint32(now.Sub(e.stored) / time.Second)
	out := *e.msg
	out.Answers = aged(e.msg.Answers, age)
	out.Authorities = aged(e.msg.Authorities, age)
	out.Additionals = aged(e.msg.Additionals, age)
	return &out, true
}

// aged copies rs with age taken off each TTL. The records' bodies are
// shared: nothing changes them.
func aged(rs []dnsmessage.Resource, age uint32) []dnsmessage.Resource {
	if len(rs) == 0 {
		return nil
	}
	out := make([]dnsmessage.Resource, len(rs))
	for i, r := range rs {
		if r.Header.TTL > age {
			r.Header.TTL -= age
		} else {
			r.Header.TTL = 0
		}
		out[i] = r
	}
	return out
}

func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}
