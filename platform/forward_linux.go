package platform

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Forwarding makes this host a router for the packets that come out of a
// TUN device, as a WireGuard subnet router is: IP forwarding on, what
// leaves through another interface masqueraded to that interface's
// address (LAN hosts need no route back), and nothing a LAN host starts
// let into the device, only replies (conntrack established or related).
// The kernel then does the forwarding, and the LAN host's own TCP the
// congestion control and loss recovery.
//
// Only the overlay addresses of connected peers are routed into the
// device (Route, Unroute), never a whole range: this host's traffic to
// anything else, its gateway included, is untouched. When a peer's last
// route goes, so do its connections in the kernel's tracking: left there,
// the LAN's replies to them would be translated back to its overlay
// address and, with no route into the device any more, follow the host's
// default route out.
//
// Nothing from the device is for this host (the caller keeps packets for
// its own addresses out of it), so the input hook drops all of it; nor may
// this host's own processes start anything toward a peer (output hook);
// and what conntrack cannot place (invalid, untracked) is not forwarded.
//
// The rules live in one nftables table named for the device; Close deletes
// it by that name, removes the routes and puts the sysctls back.
type Forwarding struct {
	dev     string
	index   int
	table   *nftables.Table
	fwd, in *nftables.Chain
	// restore holds the sysctls this Forwarding changed, with their
	// values before.
	restore map[string]string

	mu     sync.Mutex
	routes map[netip.Addr]*peerRoute
}

// peerRoute is a peer address's route and how many sessions hold it (a
// peer's new session may start before its old one has ended).
type peerRoute struct {
	route *netlink.Route
	users int
}

// ForwardingConfig configures NewForwarding.
type ForwardingConfig struct {
	// Device is the TUN device whose packets are forwarded.
	Device string
	// IPv6 turns on IPv6 forwarding too. It is off unless needed: a Linux
	// host that forwards IPv6 stops taking router advertisements.
	IPv6 bool
	// PerPeer bounds the connections (conntrack entries: TCP, UDP and
	// ICMP flows) one source address may have open through the device;
	// beyond it new ones are dropped and counted. Total bounds those of
	// all sources together. 0: no bound but the kernel's own
	// (nf_conntrack_max).
	PerPeer, Total int
}

// forwardTableName is the table of TUN device dev.
func forwardTableName(dev string) string { return "nlvpn-forward-" + dev }

const (
	sysctlIPv4Forward = "net/ipv4/ip_forward"
	sysctlIPv6Forward = "net/ipv6/conf/all/forwarding"
)

// NewForwarding installs the forwarding of cfg.Device. It needs
// CAP_NET_ADMIN. A table of the same name left by a process that died is
// replaced.
func NewForwarding(cfg ForwardingConfig) (*Forwarding, error) {
	dev := cfg.Device
	if dev == "" || len(dev) >= unix.IFNAMSIZ {
		return nil, fmt.Errorf("forwarding: bad device name %q", dev)
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("forwarding: interface %s: %w", dev, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("forwarding: bring %s up: %w", dev, err)
	}
	f := &Forwarding{dev: dev, index: link.Attrs().Index, restore: make(map[string]string),
		routes: make(map[netip.Addr]*peerRoute),
		table:  &nftables.Table{Name: forwardTableName(dev), Family: nftables.TableFamilyINet}}
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("forwarding: nftables: %w", err)
	}
	replaceTable(c, f.table)
	f.fwd = acceptChain(c, f.table, "forward", nftables.ChainHookForward)
	// oifname dev ct state established,related accept; oifname dev
	// counter drop: a LAN host cannot start anything toward a peer.
	repliesOnly(c, f.table, f.fwd, oifIs(dev), dropLANStarted)
	// iifname dev ct state invalid,untracked counter drop: what conntrack
	// cannot place would leave unmasqueraded.
	c.AddRule(&nftables.Rule{Table: f.table, Chain: f.fwd, UserData: []byte(dropInvalid), Exprs: append(append(iifIs(dev),
		ctStateIs(expr.CtStateBitINVALID|expr.CtStateBitUNTRACKED, false)...), countDrop()...)})
	if cfg.PerPeer > 0 {
		if err := addPerPeerLimit(c, f.table, f.fwd, dev, cfg.PerPeer); err != nil {
			return nil, err
		}
	}
	if cfg.Total > 0 {
		// iifname dev ct state new ct count over Total counter drop: the
		// expression counts the connections that passed it.
		c.AddRule(&nftables.Rule{Table: f.table, Chain: f.fwd, UserData: []byte(dropTotalLimit), Exprs: append(append(append(iifIs(dev),
			ctStateIs(expr.CtStateBitNEW, false)...),
			&expr.Connlimit{Count: uint32(cfg.Total), Flags: connlimitOver}), countDrop()...)})
	}
	f.in = acceptChain(c, f.table, "input", nftables.ChainHookInput)
	// iifname dev counter drop
	c.AddRule(&nftables.Rule{Table: f.table, Chain: f.in, UserData: []byte(dropToHost), Exprs: append(iifIs(dev), countDrop()...)})
	out := acceptChain(c, f.table, "output", nftables.ChainHookOutput)
	// Likewise on output: the host's own errors about a peer's packets
	// pass, nothing new.
	repliesOnly(c, f.table, out, oifIs(dev), "")
	accept := nftables.ChainPolicyAccept
	nat := c.AddChain(&nftables.Chain{Name: "postrouting", Table: f.table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	// iifname dev oifname != dev masquerade. (The input interface of a
	// forwarded packet is known at postrouting.)
	c.AddRule(&nftables.Rule{Table: f.table, Chain: nat, Exprs: append(append(iifIs(dev),
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ifname(dev)}),
		&expr.Masq{})})
	if err := c.Flush(); err != nil {
		return nil, fmt.Errorf("forwarding: installing nftables table %s: %w", f.table.Name, err)
	}
	keys := []string{sysctlIPv4Forward}
	if cfg.IPv6 {
		keys = append(keys, sysctlIPv6Forward)
	}
	for _, k := range keys {
		if err := f.setSysctl(k, "1"); err != nil {
			f.Close()
			return nil, err
		}
	}
	if cfg.IPv6 {
		// A host (or namespace) whose new interfaces start without IPv6
		// would drop every IPv6 packet from the device. The device is
		// ours and goes with its setting.
		if err := writeSysctl("net/ipv6/conf/"+dev+"/disable_ipv6", "0"); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

// addPerPeerLimit adds, for each family: iifname dev ct state new
// add @peersN { saddr ct count over n } counter drop.
func addPerPeerLimit(c *nftables.Conn, t *nftables.Table, ch *nftables.Chain, dev string, n int) error {
	for _, fam := range []struct {
		name    string
		proto   byte
		key     nftables.SetDatatype
		off, ln uint32
	}{
		{"peers4", unix.NFPROTO_IPV4, nftables.TypeIPAddr, 12, 4},
		{"peers6", unix.NFPROTO_IPV6, nftables.TypeIP6Addr, 8, 16},
	} {
		set := &nftables.Set{Table: t, Name: fam.name, KeyType: fam.key, Dynamic: true}
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("forwarding: set %s: %w", fam.name, err)
		}
		exprs := append(iifIs(dev),
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam.proto}})
		exprs = append(exprs, ctStateIs(expr.CtStateBitNEW, false)...)
		exprs = append(exprs,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fam.off, Len: fam.ln},
			&expr.Dynset{SrcRegKey: 1, SetName: set.Name, Operation: uint32(unix.NFT_DYNSET_OP_ADD),
				Exprs: []expr.Any{&expr.Connlimit{Count: uint32(n), Flags: connlimitOver}}})
		exprs = append(exprs, countDrop()...)
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, UserData: []byte(dropPeerLimit), Exprs: exprs})
	}
	return nil
}

// ForwardingDrops are the packets the forwarding's rules dropped.
type ForwardingDrops struct {
	// LANStarted: packets toward a peer that were not replies.
	LANStarted uint64
	// Invalid: packets from the device that conntrack could not place.
	Invalid uint64
	// ToHost: packets from the device for this host itself.
	ToHost uint64
	// PeerLimit: new connections of a peer over ForwardingConfig.PerPeer;
	// TotalLimit: over ForwardingConfig.Total.
	PeerLimit, TotalLimit uint64
}

// The rules' names (their user data), by which Drops reads their counters.
const (
	dropLANStarted = "lan-started"
	dropInvalid    = "invalid"
	dropToHost     = "to-host"
	dropPeerLimit  = "peer-limit"
	dropTotalLimit = "total-limit"
)

// Drops reads the rules' counters.
func (f *Forwarding) Drops() (ForwardingDrops, error) {
	var d ForwardingDrops
	c, err := nftables.New()
	if err != nil {
		return d, err
	}
	for _, ch := range []*nftables.Chain{f.fwd, f.in} {
		rules, err := c.GetRules(f.table, ch)
		if err != nil {
			return d, err
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				ctr, ok := e.(*expr.Counter)
				if !ok {
					continue
				}
				switch string(r.UserData) {
				case dropLANStarted:
					d.LANStarted += ctr.Packets
				case dropInvalid:
					d.Invalid += ctr.Packets
				case dropToHost:
					d.ToHost += ctr.Packets
				case dropPeerLimit:
					d.PeerLimit += ctr.Packets
				case dropTotalLimit:
					d.TotalLimit += ctr.Packets
				}
			}
		}
	}
	return d, nil
}

// Route routes a peer's overlay address into the device. Each successful
// Route is undone by one Unroute; the route stays while any holds it.
func (f *Forwarding) Route(addr netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if pr, ok := f.routes[addr]; ok {
		pr.users++
		return nil
	}
	r := &netlink.Route{LinkIndex: f.index, Dst: ipNet(netip.PrefixFrom(addr, addr.BitLen())), Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteReplace(r); err != nil {
		return fmt.Errorf("route %s into %s: %w", addr, f.dev, err)
	}
	f.routes[addr] = &peerRoute{route: r, users: 1}
	return nil
}

// Unroute gives up one hold of a peer's route (Route). With the last, the
// route goes, and the peer's connections are dropped from the kernel's
// tracking.
func (f *Forwarding) Unroute(addr netip.Addr) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	pr := f.routes[addr]
	if pr == nil {
		return nil
	}
	if pr.users--; pr.users > 0 {
		return nil
	}
	delete(f.routes, addr)
	return unroute(addr, pr.route)
}

// unroute removes addr's route and forgets its connections.
func unroute(addr netip.Addr, r *netlink.Route) error {
	var errs []error
	if err := netlink.RouteDel(r); err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, syscall.ENODEV) {
		errs = append(errs, fmt.Errorf("remove route %s: %w", addr, err))
	}
	filter := &netlink.ConntrackFilter{}
	family := netlink.InetFamily(unix.AF_INET)
	if addr.Is6() {
		family = unix.AF_INET6
	}
	if err := filter.AddIP(netlink.ConntrackOrigSrcIP, addr.AsSlice()); err != nil {
		errs = append(errs, err)
	} else if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, family, filter); err != nil {
		errs = append(errs, fmt.Errorf("forget the connections of %s: %w", addr, err))
	}
	return errors.Join(errs...)
}

// Close removes the routes and the table and puts back the sysctls it
// changed.
func (f *Forwarding) Close() error {
	var errs []error
	f.mu.Lock()
	for a, pr := range f.routes {
		if err := unroute(a, pr.route); err != nil {
			errs = append(errs, err)
		}
	}
	clear(f.routes)
	f.mu.Unlock()
	if c, err := nftables.New(); err != nil {
		errs = append(errs, err)
	} else {
		c.DelTable(f.table)
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) && !strings.Contains(err.Error(), "no such file") {
			errs = append(errs, fmt.Errorf("removing nftables table %s: %w", f.table.Name, err))
		}
	}
	// Another routed agent on this host (its own table) still needs
	// forwarding: then the sysctls stay as they are.
	if others, err := otherForwardTables(f.table.Name); err != nil || !others {
		for k, v := range f.restore {
			if err := writeSysctl(k, v); err != nil {
				errs = append(errs, err)
			}
		}
	}
	clear(f.restore)
	return errors.Join(errs...)
}

// otherForwardTables reports whether a forwarding table other than ours
// exists.
func otherForwardTables(ours string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, err
	}
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, err
	}
	for _, t := range ts {
		if t.Name != ours && strings.HasPrefix(t.Name, forwardTableName("")) {
			return true, nil
		}
	}
	return false, nil
}

// setSysctl sets /proc/sys/key to v, remembering the value before if it
// differed.
func (f *Forwarding) setSysctl(key, v string) error {
	old, err := os.ReadFile("/proc/sys/" + key)
	if err != nil {
		return fmt.Errorf("forwarding: read %s: %w", key, err)
	}
	if strings.TrimSpace(string(old)) == v {
		return nil
	}
	if err := writeSysctl(key, v); err != nil {
		return err
	}
	f.restore[key] = strings.TrimSpace(string(old))
	return nil
}

func writeSysctl(key, v string) error {
	if err := os.WriteFile("/proc/sys/"+key, []byte(v+"\n"), 0o644); err != nil {
		return fmt.Errorf("forwarding: set %s to %s: %w", strings.ReplaceAll(key, "/", "."), v, err)
	}
	return nil
}

// connlimitOver is NFT_CONNLIMIT_F_INV: the connlimit expression matches
// when the count is over its bound ("ct count over N").
const connlimitOver = 1
