package gateway

import (
	"encoding/json"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/wire"
)

// directory remembers every agent that registered here, with the subnets
// it advertised last and when it was last connected, so that a client can
// list the agents it may use while they are offline too (nlvpn agents).
// Kept in agents.json, written when an agent registers with something new
// and when it disconnects: a handful of writes per agent connection, never
// per packet.
type directory struct {
	file    *stateFile
	mu      sync.Mutex
	m       map[string]*dirEntry // by agent name
	changes uint64               // changes to m that file must hold
}

// dirEntry is what the directory keeps of an agent: its subnets, when it
// was last connected, and enough of its credential to forget it once that
// has expired or been revoked.
type dirEntry struct {
	Advertise []netip.Prefix `json:"advertise,omitempty"`
	LastSeen  int64          `json:"last_seen"` // unix seconds
	TokenID   string         `json:"token_id"`
	Issued    int64          `json:"issued"`
	Expires   int64          `json:"expires"`
}

// maxDirectory bounds the agents remembered; past it the one seen longest
// ago is forgotten. Agents need a token from the authority, so this is
// reached only by a very large network, never by a stranger.
const maxDirectory = 4096

func openDirectory(dir string) (*directory, error) {
	d := &directory{m: make(map[string]*dirEntry)}
	d.file = &stateFile{path: filepath.Join(dir, "agents.json"), snapshot: func() ([]byte, uint64, error) {
		d.mu.Lock()
		defer d.mu.Unlock()
		b, err := marshalState(d.m)
		return b, d.changes, err
	}}
	if err := readJSON(d.file.path, &d.m); err != nil {
		return nil, err
	}
	return d, nil
}

// seen records that the agent with claims is connected now, advertising adv.
func (d *directory) seen(c *token.Claims, adv []netip.Prefix, now time.Time) error {
	d.mu.Lock()
	e := d.m[c.Name]
	if e != nil && e.TokenID == c.ID && slices.Equal(e.Advertise, adv) {
		e.LastSeen = now.Unix() // in memory only: it is online now anyway
		d.mu.Unlock()
		return nil
	}
	if e == nil && len(d.m) >= maxDirectory {
		d.forgetOldest()
	}
	d.m[c.Name] = &dirEntry{Advertise: slices.Clone(adv), LastSeen: now.Unix(), TokenID: c.ID, Issued: c.Issued, Expires: c.Expires}
	d.changes++
	seq := d.changes
	d.mu.Unlock()
	return d.file.save(seq)
}

// left records that the agent disconnected at now.
func (d *directory) left(name string, now time.Time) error {
	d.mu.Lock()
	e := d.m[name]
	if e == nil {
		d.mu.Unlock()
		return nil
	}
	e.LastSeen = now.Unix()
	d.changes++
	seq := d.changes
	d.mu.Unlock()
	return d.file.save(seq)
}

// get returns a copy of the entry for name.
func (d *directory) get(name string) (dirEntry, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.m[name]
	if e == nil {
		return dirEntry{}, false
	}
	c := *e
	c.Advertise = slices.Clone(e.Advertise)
	return c, true
}

func (d *directory) forgetOldest() {
	var oldest string
	for name, e := range d.m {
		if oldest == "" || e.LastSeen < d.m[oldest].LastSeen {
			oldest = name
		}
	}
	delete(d.m, oldest)
}

// list returns the agents the client with claims may use, sorted by name:
// those remembered whose credential has neither expired nor been revoked
// (revoked says which), and online ones (by name) even if not remembered.
// The list is cut to fit one control message.
// In a cluster, shared is the cluster's directory: an entry there counts
// where this gateway has none, or an older one.
func (d *directory) list(c *token.Claims, online map[string][]netip.Prefix, shared map[string]dirEntry, revoked func(*token.Claims) bool, now time.Time) *wire.Agents {
	d.mu.Lock()
	all := make(map[string]*dirEntry, len(d.m)+len(shared))
	for name, e := range shared {
		all[name] = &e
	}
	for name, e := range d.m {
		if s, ok := all[name]; !ok || s.LastSeen <= e.LastSeen {
			all[name] = e
		}
	}
	byName := make(map[string]wire.AgentInfo, len(all)+len(online))
	for name, e := range all {
		if !c.MayUse(name) || e.Expires < now.Unix() {
			continue
		}
		if revoked(&token.Claims{ID: e.TokenID, Role: token.RoleAgent, Name: name, Issued: e.Issued, Expires: e.Expires}) {
			continue
		}
		byName[name] = wire.AgentInfo{Name: name, Advertise: slices.Clone(e.Advertise), LastSeen: e.LastSeen}
	}
	d.mu.Unlock()
	for name, adv := range online {
		if c.MayUse(name) {
			byName[name] = wire.AgentInfo{Name: name, Online: true, Advertise: adv}
		}
	}
	out := &wire.Agents{Agents: make([]wire.AgentInfo, 0, len(byName))}
	for _, a := range byName {
		out.Agents = append(out.Agents, a)
	}
	sort.Slice(out.Agents, func(i, j int) bool { return out.Agents[i].Name < out.Agents[j].Name })
	// Keep the reply within one control message (with room for the
	// envelope): drop from the end and say so.
	for len(out.Agents) > 0 {
		b, _ := json.Marshal(out)
		if len(b) <= wire.MaxMessageSize-256 {
			break
		}
		out.Agents = out.Agents[:len(out.Agents)*3/4]
		out.Truncated = true
	}
	return out
}
