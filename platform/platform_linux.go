package platform

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Configure brings the interface up with its address, installs the policy
// rule (everything without the node's mark → Table first) and adds the
// routes to Table. A prefix the main table already routes exactly (say the
// machine's own LAN) is skipped and reported in skipped, and routes the
// main table has inside an advertised prefix keep winning (throw routes):
// taking over routes the user relies on would cut them off.
func Configure(cfg Config) (undo Undo, skipped []netip.Prefix, err error) {
	link, err := netlink.LinkByName(cfg.Interface)
	if err != nil {
		return nil, nil, fmt.Errorf("interface %s: %w", cfg.Interface, err)
	}
	var added []*netlink.Route
	var rules []*netlink.Rule
	var addrs []*netlink.Addr
	var once sync.Once
	undo = func() error {
		var errs []error
		once.Do(func() {
			for _, r := range added {
				if err := netlink.RouteDel(r); err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, syscall.ENODEV) {
					errs = append(errs, fmt.Errorf("remove route %s: %w", r.Dst, err))
				}
			}
			// The rule is shared with any other tunnel on this machine:
			// only the last one out removes it.
			if tableEmpty() {
				for _, r := range rules {
					if err := netlink.RuleDel(r); err != nil && !errors.Is(err, syscall.ENOENT) {
						errs = append(errs, fmt.Errorf("remove rule %d: %w", r.Priority, err))
					}
				}
			}
			for _, a := range addrs {
				if err := netlink.AddrDel(link, a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) && !errors.Is(err, syscall.ENODEV) {
					errs = append(errs, fmt.Errorf("remove address: %w", err))
				}
			}
		})
		return errors.Join(errs...)
	}
	a := &netlink.Addr{IPNet: ipNet(cfg.Addr)}
	if err := netlink.AddrAdd(link, a); err != nil && !errors.Is(err, syscall.EEXIST) {
		return nil, nil, fmt.Errorf("set address %s on %s: %w", cfg.Addr, cfg.Interface, err)
	}
	addrs = append(addrs, a)
	if cfg.Addr6.IsValid() {
		// No duplicate address detection: the address is ours alone, and
		// DAD would hold it "tentative" (unusable as a source) a while.
		a6 := &netlink.Addr{IPNet: ipNet(cfg.Addr6), Flags: unix.IFA_F_NODAD}
		if err := netlink.AddrAdd(link, a6); err != nil && !errors.Is(err, syscall.EEXIST) {
			undo()
			return nil, nil, fmt.Errorf("set address %s on %s: %w", cfg.Addr6, cfg.Interface, err)
		}
		addrs = append(addrs, a6)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		undo()
		return nil, nil, fmt.Errorf("bring %s up: %w", cfg.Interface, err)
	}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		r := policyRule(fam)
		// Another nlvpn up (another --tun) may have added the same rule;
		// it is shared, and removed by whoever leaves the table empty.
		if err := netlink.RuleAdd(r); err != nil && !errors.Is(err, syscall.EEXIST) {
			if fam == unix.AF_INET6 {
				continue // a machine without IPv6 has no v6 rules to set
			}
			undo()
			return nil, nil, fmt.Errorf("add policy rule %d: %w", r.Priority, err)
		}
		rules = append(rules, r)
	}
	// Routes the machine has inside an advertised prefix (its own LAN
	// inside a wide advertisement, a container bridge) stay the machine's:
	// a "throw" in our table sends their lookups on to the main table.
	for _, t := range throwsFor(cfg.Routes) {
		if err := netlink.RouteAdd(t); err == nil {
			added = append(added, t)
		}
	}
	for _, p := range cfg.Routes {
		if routedInMain(p) {
			skipped = append(skipped, p)
			continue
		}
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(p), Scope: netlink.SCOPE_LINK, Table: Table}
		switch {
		case p.Addr().Is4() == cfg.Addr.Addr().Is4():
			r.Src = net.IP(cfg.Addr.Addr().AsSlice())
		case cfg.Addr6.IsValid() && p.Addr().Is6():
			r.Src = net.IP(cfg.Addr6.Addr().AsSlice())
		}
		if err := netlink.RouteAdd(r); err != nil {
			if errors.Is(err, syscall.EEXIST) {
				skipped = append(skipped, p)
				continue
			}
			undo()
			return nil, nil, fmt.Errorf("add route %s dev %s: %w", p, cfg.Interface, err)
		}
		added = append(added, r)
	}
	return undo, skipped, nil
}

// policyRule sends every packet without the node's mark to Table first;
// marked packets (the tunnel's own) never see it, whatever the main or
// other tables hold.
func policyRule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Priority = RulePriority
	r.Mark = Mark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Invert = true
	r.Table = Table
	return r
}

// tableEmpty reports whether no tunnel has routes in Table any more.
func tableEmpty() bool {
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: Table}, netlink.RT_FILTER_TABLE)
		if err != nil || len(rs) > 0 {
			return false
		}
	}
	return true
}

// throwsFor returns throw routes for the main table's routes that lie
// strictly inside one of the advertised prefixes.
func throwsFor(adv []netip.Prefix) []*netlink.Route {
	var out []*netlink.Route
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue
		}
		for _, r := range rs {
			if r.Dst == nil {
				continue // the default route is what advertising a prefix overrides
			}
			dst, ok := netip.AddrFromSlice(r.Dst.IP)
			if !ok {
				continue
			}
			ones, _ := r.Dst.Mask.Size()
			d := netip.PrefixFrom(dst.Unmap(), ones)
			for _, p := range adv {
				if p.Addr().Is4() == d.Addr().Is4() && p.Bits() < d.Bits() && p.Contains(d.Addr()) {
					out = append(out, &netlink.Route{Dst: ipNet(d), Table: Table, Type: unix.RTN_THROW})
					break
				}
			}
		}
	}
	return out
}

// routedInMain reports whether the main table has a route for exactly p.
func routedInMain(p netip.Prefix) bool {
	fam := unix.AF_INET
	if p.Addr().Is6() {
		fam = unix.AF_INET6
	}
	rs, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN, Dst: ipNet(p)}, netlink.RT_FILTER_TABLE|netlink.RT_FILTER_DST)
	return err == nil && len(rs) > 0
}

// MarkSocket sets SO_MARK so the socket's packets bypass the tunnel's
// routes (see Table). It needs CAP_NET_ADMIN.
func MarkSocket(c *net.UDPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark)
	}); err != nil {
		return err
	}
	return serr
}

// MarkDialer is a net.Dialer's Control that sets SO_MARK as MarkSocket
// does, for the node's TCP connections (the gateway over TCP, a proxy).
func MarkDialer(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark)
	}); err != nil {
		return err
	}
	return serr
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// IPv6Enabled reports whether this machine (this network namespace) has
// IPv6 on: without it a TUN device takes no IPv6 address.
func IPv6Enabled() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6")
	return err == nil && strings.TrimSpace(string(b)) == "0"
}

// KernelStackID names the kernel network stack this process's sockets
// live in: this boot of this kernel, this network namespace. A TUN
// client restarted under the same ID finds its applications' TCP
// connections still open, so the agent keeps their flows.
func KernelStackID() (string, error) {
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	ns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(boot)) + " " + ns, nil
}
